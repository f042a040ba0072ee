"""The measurement discipline's bookkeeping (real.measurement), with fake runs: interleaving, the spread
and steadiness figures, outlier causes, nothing lost when a run raises, thread placement, the clock
sampler process (with a fake NVML), and one session of real engine runs on the CPU."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from real.measurement import (ClockSampler, Config, Discipline, Measurement, RunOutput, halves_against_runs_pct,
                              halves_drift_pct, place_threads, spread_pct)

CONFIGS = [Config({"policy": p, "cache_slots": 2}) for p in ("a", "b", "c")]


class FakeClocks:
    """A sampler without a process: every window at ``sm`` MHz, or at ``low`` for the runs named."""

    def __init__(self, sm=1980.0, low_runs=()):
        self.info, self.pid = {"ok": True, "sm_mhz_max": 1980}, None
        self.sm, self.low_runs, self.windows = sm, set(low_runs), 0

    def window(self, start_ns, end_ns):
        sm = 1500.0 if self.windows in self.low_runs else self.sm
        self.windows += 1
        return {"clock_samples": 10, "sm_mhz_min": sm, "sm_mhz_median": sm, "sm_mhz_max": sm,
                "mem_mhz_min": 2619.0, "mem_mhz_median": 2619.0, "mem_mhz_max": 2619.0, "clock_event_reasons": "0x0"}


class FakeRuns:
    """Records every call; a run's steps take 10 ms, except the (policy, measured-run index) pairs in
    ``slow`` (12 ms) and ``raises``; after the runs in ``host`` the host calibration reads twice as slow."""

    def __init__(self, slow=(), raises=(), host=()):
        self.calls, self.slow, self.raises, self.host = [], set(slow), set(raises), set(host)
        self.measured = {}
        self.host_slow_now = False

    def __call__(self, config, warmup):
        self.calls.append((config.label, warmup))
        if warmup:
            return RunOutput([10.0] * 8)
        n = self.measured.get(config.label, 0)
        self.measured[config.label] = n + 1
        self.host_slow_now = (config.fields["policy"], n) in self.host
        if (config.fields["policy"], n) in self.raises:
            raise RuntimeError("broken on purpose")
        step = 12.0 if (config.fields["policy"], n) in self.slow else 10.0
        return RunOutput([step] * 8, {"hit_rate": 0.5})

    def calibrate(self, samples):
        slow, self.host_slow_now = self.host_slow_now, False
        return 4.0 if slow else 2.0


def measure(runs, configs=CONFIGS, clocks=None, **discipline):
    d = Discipline(**{"repeats": 4, **discipline})
    progress = []
    m = Measurement(runs, configs, d, on_progress=lambda r: progress.append(len(r.rows)),
                    clocks=clocks or FakeClocks(), calibrate=runs.calibrate)
    return m.run_all(), progress


def test_repeats_are_interleaved_and_the_order_rotates_each_round():
    runs = FakeRuns()
    report, _ = measure(runs)
    labels = [c.label for c in CONFIGS]
    warm = [label for label, warmup in runs.calls if warmup]
    assert warm == [label for label in labels for _ in range(2)]    # steady at once: two passes each
    assert all(w["steady"] and w["passes"] == 2 for w in report.warmups.values())
    measured = [label for label, warmup in runs.calls if not warmup]
    expected = [labels[(r + i) % 3] for r in range(4) for i in range(3)]
    assert measured == expected
    assert [(row["round"], row["position"]) for row in report.rows] == [(r, i) for r in range(4) for i in range(3)]
    assert not any(row["cold"] for row in report.rows)


def test_before_mode_runs_back_to_back_in_a_fixed_order_and_marks_cold_runs():
    runs = FakeRuns()
    report, _ = measure(runs, warmup=False, rotate=False)
    assert all(not warmup for _, warmup in runs.calls)
    assert [row["config"] for row in report.rows] == [c.label for c in CONFIGS] * 4
    assert [row["cold"] for row in report.rows] == [True] * 3 + [False] * 9
    assert all("cold" in row["causes"] for row in report.rows[:3])


def test_spread_and_halves():
    assert spread_pct([10.0, 11.0, 9.0, 10.0]) == pytest.approx(20.0)
    assert np.isnan(spread_pct([5.0])) and np.isnan(spread_pct([])) and np.isnan(spread_pct([5.0, float("nan")]))   # one run: no spread
    assert halves_drift_pct([1.0] * 10 + [1.1] * 10) == pytest.approx(100 * 0.1 / 1.05)
    assert halves_drift_pct([3.0, 1.0, 2.0, 3.0, 1.0, 2.0]) == 0.0
    assert np.isnan(halves_drift_pct([1.0]))


def request_steps(requests=3, steps=48, seed=0, jitter=0.002):
    """A stationary run's step times: in each request the first steps slower (a cold cache) and the rest
    growing with the context, the same profile in every request, with a little multiplicative jitter."""
    rng = np.random.default_rng(seed)
    profile = 10.0 + 0.05 * np.arange(steps)
    profile[:4] += 6.0
    return np.concatenate([profile * (1 + jitter * rng.standard_normal(steps)) for _ in range(requests)])


def test_halves_compare_steps_at_the_same_position_in_their_requests():
    steady = request_steps()            # 3 requests of 48: the time halves cut the middle request
    starts = [0, 48, 96]
    assert halves_drift_pct(steady) > 2.0      # the time halves compare early steps with late ones
    assert halves_drift_pct(steady, starts) < 0.5
    assert halves_drift_pct(steady, starts + [144]) == halves_drift_pct(steady, starts)   # engine convention
    slow = steady.copy()
    slow[72:] *= 1.05                   # the machine 5 % slower from the middle of the run on
    assert halves_drift_pct(slow, starts) == pytest.approx(5.0, abs=0.5)
    # uneven requests (a replay cut at its token budget): positions only some requests reach compare those
    cut = np.concatenate([request_steps(2, 48, seed=1), request_steps(1, 20, seed=2)])
    assert halves_drift_pct(cut, [0, 48, 96]) < 0.5
    # one request: the time halves, in % of the median step
    assert halves_drift_pct([1.0] * 10 + [1.1] * 10, [0]) == pytest.approx(100 * 0.1 / 1.05)


def test_halves_against_the_configurations_other_runs_cancel_what_every_run_decodes_alike():
    rng = np.random.default_rng(3)
    content = 10.0 + 20.0 * (rng.random(144) < 0.3)      # the steps with a miss: the same in every repeat
    content[:72] += 5.0                                  # and a first half with more of them
    runs = [content * (1 + 0.003 * rng.standard_normal(144)) for _ in range(5)]
    assert halves_drift_pct(runs[0]) > 2.0 and halves_drift_pct(runs[0], [0, 48, 96]) > 2.0
    assert all(halves_against_runs_pct(r, runs[:i] + runs[i + 1:]) < 0.5 for i, r in enumerate(runs))
    slow = runs[4].copy()
    slow[72:] *= 1.04
    assert halves_against_runs_pct(slow, runs[:4]) == pytest.approx(4.0, abs=0.5)
    assert all(halves_against_runs_pct(r, runs[:i] + runs[i + 1:4] + [slow]) < 0.5 for i, r in enumerate(runs[:4]))
    assert np.isnan(halves_against_runs_pct(runs[0], [])) and np.isnan(halves_against_runs_pct(runs[0], [runs[1][:10]]))


def test_a_session_flags_a_run_that_slowed_down_midway_and_not_its_steady_siblings():
    rng = np.random.default_rng(4)
    content = np.concatenate([request_steps(1, 48, seed=5) * 1.3, request_steps(2, 48, seed=6)])  # request 0 misses more
    made = {}

    def run(config, warmup):
        n = made.get(config.label, 0)
        made[config.label] = n + (not warmup)
        steps = content * (1 + 0.002 * rng.standard_normal(len(content)))
        if config.fields["policy"] == "b" and n == 3 and not warmup:
            steps[72:] *= 1.06
        return RunOutput(steps.tolist(), request_starts=[0, 48, 96, 144])

    report = Measurement(run, CONFIGS[:2], Discipline(repeats=5), clocks=FakeClocks(), calibrate=lambda n: 1.0).run_all()
    rows = {(r["policy"], r["round"]): r for r in report.rows}
    first = rows[("a", 0)]
    assert first["halves_drift_within_pct"] > 2.0       # against itself the content shows
    assert all(r["halves_basis"] == "runs" for r in report.rows)     # by the end, every run has siblings
    slowed = rows[("b", 3)]
    assert not slowed["long_enough"] and "halves" in slowed["causes"] and slowed["halves_drift_pct"] > 4.0
    others = [r for r in report.rows if r is not slowed]
    assert all(r["long_enough"] and "halves" not in r["causes"] for r in others)
    floor = {f["policy"]: f for f in report.floor()}
    assert floor["a"]["long_enough"] == "5/5" and floor["b"]["long_enough"] == "4/5"


@pytest.mark.parametrize("medians, passes, steady", [([10.0, 5.0, 4.99, 1.0], 3, True),
                                                      ([1.0, 2.0] * 5, 5, False)])
def test_warm_up_runs_until_two_passes_agree_or_the_cap(medians, passes, steady):
    calls = iter(medians)

    def run(config, warmup):
        return RunOutput([next(calls)] * 4 if warmup else [1.0] * 4)

    m = Measurement(run, CONFIGS[:1], Discipline(repeats=1), clocks=FakeClocks(), calibrate=lambda n: 1.0)
    warm = m.run_all().warmups[CONFIGS[0].label]
    assert (warm["passes"], warm["steady"]) == (passes, steady)
    assert warm["median_step_ms"] == medians[:passes]


def test_an_injected_slow_run_is_an_outlier_with_its_cause():
    # b's third run is slow on a slow host; c's second is slow with nothing to show for it; the sixth
    # run overall (a in round 1, position 2) has a low SM clock but is not slow
    runs = FakeRuns(slow=[("b", 2), ("c", 1)], host=[("b", 2)])
    report, _ = measure(runs, repeats=5, clocks=FakeClocks(low_runs=[5]))
    rows = {(r["policy"], r["round"]): r for r in report.rows}
    slow = rows[("b", 2)]
    assert slow["outlier"] and slow["causes"] == "host_slow"
    assert slow["deviation_pct"] == pytest.approx(100 * (1 / 12 - 1 / 10) / (1 / 10))
    assert (slow["host_cal_before_ms"], slow["host_cal_after_ms"]) == (2.0, 4.0)
    assert rows[("c", 1)]["outlier"] and rows[("c", 1)]["causes"] == ""
    assert report.rows[5]["causes"] == "clock_low" and not report.rows[5]["outlier"]
    assert sum(r["outlier"] for r in report.rows) == 2
    floor = {f["policy"]: f for f in report.floor()}
    assert floor["b"]["outliers"] == 1 and floor["b"]["outlier_causes"] == "host_slow:1"
    assert floor["c"]["outlier_causes"] == "unexplained:1"
    assert floor["b"]["spread_pct"] == pytest.approx(100 * (100 - 1e3 / 12) / 100)
    assert floor["b"]["n_clean"] == 4 and floor["b"]["spread_clean_pct"] == 0.0
    assert floor["a"]["n"] == 5 and floor["a"]["spread_pct"] == 0.0 and floor["a"]["median_tokens_per_s"] == 100.0
    assert floor["a"]["long_enough"] == "5/5" and floor["a"]["hit_rate_identical"]


def test_a_run_that_raises_loses_nothing():
    runs = FakeRuns(raises=[("b", 1)])
    report, progress = measure(runs)
    assert progress == [0, 0, 0] + list(range(1, 13))     # after each warm-up, then after every run
    assert len(report.rows) == 12
    failed = [r for r in report.rows if r["error"]]
    assert len(failed) == 1 and failed[0]["policy"] == "b" and "broken on purpose" in failed[0]["error"]
    assert failed[0]["causes"] == "error" and not failed[0]["outlier"]
    assert all(r["tokens_per_s"] == 100.0 for r in report.rows if not r["error"])
    floor = {f["policy"]: f for f in report.floor()}
    assert (floor["b"]["n"], floor["b"]["errors"]) == (3, 1)
    assert (floor["a"]["n"], floor["a"]["errors"]) == (4, 0)


def test_a_deadline_stops_between_whole_rounds():
    def run(config, warmup):
        time.sleep(0.01)
        return RunOutput([1.0] * 4)

    m = Measurement(run, CONFIGS, Discipline(repeats=50, warmup=False), deadline_s=0.15, clocks=FakeClocks(),
                    calibrate=lambda n: 1.0)
    report = m.run_all()
    assert 3 <= len(report.rows) < 150 and len(report.rows) % 3 == 0
    assert "past the deadline" in report.info["stopped"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinity and two CPUs")
def test_the_decode_thread_gets_a_core_of_its_own_and_gives_it_back():
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        placed = place_threads(core, allowed)
        assert os.sched_getaffinity(threading.get_native_id()) == {core}
        assert os.sched_getaffinity(helper.native_id) == allowed - {core}
        assert placed["decode_cpus"] == str(core) and placed["threads"] >= 2
        place_threads(None, allowed)
        assert os.sched_getaffinity(threading.get_native_id()) == allowed
        assert os.sched_getaffinity(helper.native_id) == allowed
    finally:
        place_threads(None, allowed)
        stop.set()
        helper.join()


FAKE_NVML = '''
class NVMLError(Exception):
    pass
NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
def nvmlInit():
    if {fail}:
        raise NVMLError("Driver Not Loaded")
def nvmlDeviceGetHandleByIndex(i):
    return i
def nvmlDeviceGetName(h):
    return b"Fake GPU"
def nvmlDeviceGetMaxClockInfo(h, kind):
    return 1980 if kind == NVML_CLOCK_SM else 3201
def nvmlDeviceGetClockInfo(h, kind):
    return 1410 if kind == NVML_CLOCK_SM else 3201
def nvmlDeviceGetCurrentClocksThrottleReasons(h):
    return 0x1 | 0x4
'''


@pytest.mark.parametrize("fail", [False, True])
def test_the_clock_sampler_process_reads_nvml_or_reports_it_missing(tmp_path, monkeypatch, fail):
    (tmp_path / "pynvml.py").write_text(FAKE_NVML.format(fail=fail))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with ClockSampler(tmp_path / "clocks.txt", period_s=0.005) as clocks:
        start = time.monotonic_ns()
        time.sleep(0.1)
        window = clocks.window(start, time.monotonic_ns())
    if fail:
        assert clocks.info["ok"] is False and "Driver Not Loaded" in clocks.info["reason"] and clocks.pid is None
        assert window["clock_samples"] == 0 and np.isnan(window["sm_mhz_median"])
    else:
        assert clocks.info == {"ok": True, "index": 0, "name": "Fake GPU", "sm_mhz_max": 1980, "mem_mhz_max": 3201,
                               "period_s": 0.005}
        assert window["clock_samples"] >= 3 and window["sm_mhz_median"] == 1410 and window["mem_mhz_max"] == 3201
        assert window["clock_event_reasons"] == "0x4"       # the idle bit is routine, left out
    assert clocks.proc.poll() is not None


def test_real_engine_runs_on_the_cpu(tmp_path):
    """A whole session on the tiny random model: every run measured, host time per layer found."""
    from experiments.noise import configurations, replay_runs
    from real.shape_model import random_model
    from traces import synthetic_trace
    trace = synthetic_trace(num_tokens=24, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=3)
    shape = trace.model
    model = random_model(shape, "cpu", torch.float32, max_len=16)
    # without the engine's frozen collector: its full collection per run costs ~0.3 s beside pytest
    configs = configurations([("lru", 2), ("belady", 3)], None, False, None)
    report = Measurement(replay_runs(model, shape, trace, 6, 3), configs, Discipline(repeats=2),
                         clocks=FakeClocks()).run_all()
    assert len(report.rows) == 4 and not any(r["error"] for r in report.rows)
    assert all(r["steps"] == 6 and r["tokens_per_s"] > 0 for r in report.rows)
    assert all(0 <= r["routing_wait_ms_per_layer"] and r["host_ms_per_layer"] > 0 for r in report.rows)
    assert all(w["passes"] >= 2 for w in report.warmups.values())
    assert "read_routing" not in model.__dict__         # the timing wrapper is gone
    floor = report.floor()
    assert [f["policy"] for f in floor] == ["lru", "belady"] and all(f["hit_rate_identical"] for f in floor)


def test_engine_runs_tell_where_each_request_begins_among_the_timed_steps():
    """A live run times each request's generated steps only; a replay every step: the halves check gets the
    request boundaries of the steps it is given."""
    from real.bench.engine_runs import EngineRuns, generated_steps
    from real.engine import OffloadEngine
    from offload.session import RunSettings
    from policies.lru import LRU
    from real.shape_model import random_model
    from traces import synthetic_trace
    trace = synthetic_trace(num_tokens=24, num_layers=2, num_experts=4, top_k=2, num_requests=3, seed=3)
    shape = trace.model
    model = random_model(shape, "cpu", torch.float32, max_len=24)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    config = Config({"policy": "lru", "cache_slots": 2})
    build = lambda c: OffloadEngine(model, shape, LRU, RunSettings(cache_slots=2))     # noqa: E731
    live = EngineRuns(model, shape, build, lambda e, warmup: e.generate(prompts, 4),
                      timed=generated_steps(prompts, 4))(config, False)
    assert len(live.step_ms) == 8 and live.request_starts == [0, 4]
    replay = EngineRuns(model, shape, build, lambda e, warmup: e.replay(trace, 20))(config, False)
    assert len(replay.step_ms) == 20
    ends = trace.request_starts.tolist()
    assert replay.request_starts == [s for s in ends if s < 20]


def test_a_ctrl_c_landing_in_the_gc_callback_still_stops_the_command():
    """Python discards what a gc callback raises: a Ctrl-C landing while GcWatch's callback ran was lost and
    validate / engine_bench ran on to exit 0. While the watch is on, a signal landing in that callback is
    delivered again 10 ms later; anywhere else it acts at once, as before; afterwards the handlers are back."""
    import signal
    import sys
    from types import SimpleNamespace

    from real.measurement import GcWatch
    before = signal.getsignal(signal.SIGINT)
    with GcWatch():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, sys._getframe())                  # an ordinary frame: at once
        in_callback = SimpleNamespace(f_code=GcWatch.__call__.__code__)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, in_callback)                      # deferred, not raised in the callback...
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:                       # ...and delivered again
                time.sleep(0.001)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_resumed_measurement_runs_only_the_repeats_each_configuration_lacks():
    """``runs_wanted``: a configuration that already holds some of its runs takes part in fewer rounds (a resumed
    validate gave every configuration the full count again, so some ended with more runs than asked)."""
    ran = []

    def run(config, warmup):
        if not warmup:
            ran.append(config.label)
        return RunOutput(step_ms=[1.0] * 8)
    a, b, c = CONFIGS
    Measurement(run, CONFIGS, Discipline(repeats=3, warmup=False), clocks=FakeClocks(), calibrate=lambda n: 1.0,
                runs_wanted={a.label: 1, b.label: 0}).run_all()
    assert ran.count(a.label) == 1 and ran.count(b.label) == 0 and ran.count(c.label) == 3
