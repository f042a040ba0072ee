"""Figures are written and readable; the Chrome trace has the structure Perfetto expects."""
import json

import pandas as pd
import pytest

from experiments.config import RunConfig
from experiments.results import ResultStore, config_hash
from experiments.runner import ROW_COLUMNS, record_timeline, run_config
from plots.figures import busy_share, plot_hit_rate_vs_belady, plot_timeline, plot_tokens_vs_slots
from sim.chrome_trace import to_chrome_trace, write_chrome_trace
from traces import save_trace, synthetic_trace

PNG = b"\x89PNG\r\n\x1a\n"
TOKENS = 6


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "plots.npz"
    save_trace(synthetic_trace(num_tokens=300, num_layers=4, num_experts=8, top_k=2, num_requests=6, seed=5), path)
    return path


@pytest.fixture(scope="module")
def results(trace_path, tmp_path_factory):
    store = ResultStore(tmp_path_factory.mktemp("out"))
    configs = [RunConfig(trace=str(trace_path), policy=p, cache_slots=s, max_tokens=120)
               for p in ("lru", "belady", "oracle") for s in (2, 4, 6)]
    for cfg in configs:
        store.write(*run_config(cfg))
    return store.collect([config_hash(c) for c in configs], ROW_COLUMNS)


@pytest.fixture(scope="module")
def timeline(trace_path):
    # A prefetching policy on two copy engines: both lanes and both kinds of copy appear.
    cfg = RunConfig(trace=str(trace_path), policy="oracle", cache_slots=3, copy_engines=2)
    return record_timeline(cfg, TOKENS)


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 5_000


def test_result_figures_are_written(results, tmp_path):
    plot_tokens_vs_slots(results, tmp_path / "tokens_vs_slots.png")
    plot_hit_rate_vs_belady(results, tmp_path / "hit_rate_vs_belady.png")
    assert _is_png(tmp_path / "tokens_vs_slots.png")
    assert _is_png(tmp_path / "hit_rate_vs_belady.png")


def test_figures_split_lines_by_other_varying_keys(results, tmp_path):
    two = pd.concat([results, results.assign(precision="fp8")], ignore_index=True)
    plot_tokens_vs_slots(two, tmp_path / "t.png")
    assert _is_png(tmp_path / "t.png")


def test_timeline_figure_is_written(timeline, tmp_path):
    plot_timeline(timeline, tmp_path / "timeline.png", config="policy=lru cache_slots=4")
    plot_timeline(timeline, tmp_path / "cropped.png", max_ms=0.2)
    assert _is_png(tmp_path / "timeline.png") and _is_png(tmp_path / "cropped.png")


def test_timeline_is_cut_to_whole_tokens(timeline):
    assert len(timeline.token_end_ns) == TOKENS
    # Every (token, layer, chosen expert) of those tokens is computed exactly once.
    assert len(timeline.compute) == TOKENS * 4 * 2
    assert len({(e.token, e.layer, e.key) for e in timeline.compute}) == len(timeline.compute)
    assert {c.demand for c in timeline.copies} == {True, False}
    assert {c.engine for c in timeline.copies} == {0, 1}


def test_chrome_trace_structure(timeline, tmp_path):
    path = tmp_path / "timeline.json"
    write_chrome_trace(timeline, path, key_names=lambda k: f"L{k // 8} E{k % 8}", num_experts=8)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(to_chrome_trace(timeline, lambda k: f"L{k // 8} E{k % 8}", 8)))
    events = data["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert complete and all(e["ph"] in ("X", "M") for e in events)
    for e in complete:
        for field in ("name", "ph", "ts", "dur", "pid", "tid", "args"):
            assert field in e, (field, e)
        assert isinstance(e["ts"], float) and isinstance(e["dur"], float)
        assert e["ts"] >= 0 and e["dur"] >= 0 and e["pid"] == 0
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in complete} <= set(names)
    assert {"compute stream", "copy engine 0", "copy engine 1"} <= set(names.values())
    assert any(e["name"] == "process_name" and e["args"]["name"] == "GPU" for e in events)

    compute = [e for e in complete if e["cat"] == "compute"]
    copies = [e for e in complete if e["cat"].endswith("copy")]
    assert len(compute) == len(timeline.compute) and len(copies) == len(timeline.copies)
    first = timeline.compute[0]
    assert compute[0]["ts"] == first.start_ns / 1000 and compute[0]["dur"] == (first.end_ns - first.start_ns) / 1000
    assert compute[0]["args"] == {"token": first.token, "layer": first.layer, "expert": first.key % 8,
                                  "slot": first.slot}
    assert compute[0]["name"] == f"L{first.layer} E{first.key % 8}"
    for e in copies:
        assert {"layer", "expert", "slot", "demand"} <= set(e["args"])
        assert e["args"]["demand"] == (e["cat"] == "demand copy")
    assert not list(tmp_path.glob(".*.tmp"))


def test_busy_share_is_the_covered_fraction(timeline):
    """The lanes' labels: the compute stream's busy share is its experts' total time over the window (its
    spans do not overlap), cut at a shorter window."""
    end = timeline.token_end_ns[-1]
    spans = [(e.start_ns, e.end_ns) for e in timeline.compute]
    assert busy_share(spans, end) == pytest.approx(sum(e - s for s, e in spans) / end)
    assert 0 < busy_share(spans, end) < 1
    assert busy_share([(0, 10), (20, 30)], 25) == pytest.approx(15 / 25)
    assert busy_share(spans, 0) == 0.0


def test_every_series_has_its_own_style_and_a_lossy_policy_is_named_so():
    """Eleven policies: no two lines look alike (tab10 alone repeats its first colour at the eleventh); a policy
    that ran other experts than the routed ones (replaced > 0) is labelled lossy."""
    import pandas as pd
    from plots.figures import _series
    rows = [{"policy": f"p{i}", "cache_slots": s, "tokens_per_s": 1.0, "replaced": 5 if i == 3 else 0}
            for i in range(11) for s in (2, 4)]
    series = list(_series(pd.DataFrame(rows)))
    styles = [tuple(sorted(style.items())) for _, _, style in series]
    assert len(set(styles)) == 11
    assert [label for label, _, _ in series][3] == "p3 (lossy)"
