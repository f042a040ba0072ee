"""The calibration records the host's speed beside each timed part (``host_cal_ms``), so that the validation can
read every engine run against the calibration of its own host state (``validation.report``)."""
from __future__ import annotations

from conftest import lru_engine_counting_copies

from policies.lru import LRU
from offload.session import RunSettings
from traces.synthetic import pattern_trace


def _positive_pair(values):
    return len(values) == 2 and all(v > 0 for v in values)


def test_every_timed_part_of_the_calibration_records_the_host_loop_before_and_after_it():
    from real.calibration import decision_costs, resident_live, run_pattern
    from validation.report import calibration_host_ms
    model, shape, _, _ = lru_engine_counting_copies("cpu")
    hits = run_pattern(model, shape, "hits", 3).to_dict()
    assert _positive_pair(hits["host_cal_ms"])
    train = pattern_trace(shape, 3, "misses")
    costs = decision_costs(model, shape, LRU, RunSettings(cache_slots=shape.top_k), train)
    assert _positive_pair(costs["host_cal_ms"])
    live = resident_live(model, shape, [[1, 2, 3]], 2)
    assert _positive_pair(live["host_cal_ms"])
    calibration = {"patterns": {"hits": hits, "resident-live": live}, "decisions": {"lru": costs}}
    assert calibration_host_ms(calibration) > 0
