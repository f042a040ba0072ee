"""``experiments/bench_layer.py`` in its CPU smoke mode: every metric for both attention
implementations at both contexts, written and tabulated; and its memory-bound arithmetic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import bench_layer
from traces import ModelShape


def test_smoke_run_writes_every_metric_for_both_implementations(tmp_path, capsys):
    summary = bench_layer.main(["--out", str(tmp_path), "--smoke"])
    times = pd.read_csv(tmp_path / "layer_times.csv")
    assert set(times["impl"]) == set(bench_layer.SMOKE_IMPLS) and set(times["context"]) == {4, 16}
    assert set(times["metric"]) == set(bench_layer.METRICS) and set(times["repeat"]) == {0, 1}
    assert len(times) == len(bench_layer.SMOKE_IMPLS) * 2 * 2 * len(bench_layer.METRICS)
    assert np.isfinite(times["value"]).all()
    # no NVML on a CPU: the clock columns are there, empty, and the run says so in one line
    assert times[list(bench_layer.CLOCK_COLUMNS)].isna().all().all()
    positive = times[times["metric"] != "host_us"]        # the host's share is a difference of two times
    assert (positive["value"] > 0).all()
    assert len(summary) == len(times) // 2 and (summary["low"] <= summary["median"]).all()
    saved = pd.read_csv(tmp_path / "layer_summary.csv")
    assert list(saved.columns) == list(summary.columns) and len(saved) == len(summary)
    printed = capsys.readouterr().out.strip().splitlines()
    assert "GPU clocks: not recorded (no NVML here: the CPU, or pynvml missing)" in printed
    last = printed[-1]
    assert last.startswith("tiny") and "sdpa" in last
    # no device clock on the CPU: engine wall - "device" time (a wall too) is no host time; said so, not printed
    table = printed[printed.index(next(line for line in printed if line.startswith("shape"))):]
    assert all(line.split()[3 + bench_layer.METRICS.index("host_us")] == "n/a" for line in table[1:]), table
    assert any(line.startswith("host: n/a without a device clock") for line in printed)


def test_implementation_names():
    assert bench_layer.parse_impl("sdpa+compiled") == ("sdpa", True, False)
    assert bench_layer.parse_impl("sdpa+reductions") == ("sdpa", True, True)
    assert bench_layer.parse_impl("masked_window") == ("masked_window", False, False)
    with pytest.raises(ValueError, match="optionally \\+compiled or \\+reductions"):
        bench_layer.parse_impl("sdpa+fast")


def test_active_bytes_counts_weights_experts_kv_and_head():
    shape = ModelShape("s", num_layers=2, num_experts=4, top_k=2, hidden_size=8, expert_intermediate_size=16,
                       num_attention_heads=2, num_kv_heads=1, head_dim=4, vocab_size=10)
    attention = 8 * 4 * (2 * 2 + 2 * 1) + 2 * 8          # q, o, k, v and two norms
    per_layer = attention + 4 * 8 + 2 * 3 * 8 * 16      # + router + two experts
    head = 10 * 8 + 2 * 8                               # lm_head, embedding row, final norm
    assert bench_layer.active_bytes(shape, 0) == 2 * (2 * per_layer + head)
    assert bench_layer.active_bytes(shape, 5) - bench_layer.active_bytes(shape, 0) == 2 * 2 * (2 * 5 * 1 * 4)


RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "h200" / "bench_layer_compiled"


def test_gpu_table_prints_as_committed(capsys):
    """The H200 run's summary prints exactly the table its log holds (the host column included)."""
    bench_layer._print_table(pd.read_csv(RESULTS / "layer_summary.csv"), device_clock=True)
    printed = capsys.readouterr().out.strip().splitlines()
    log = (RESULTS / "bench_layer.log").read_text().splitlines()
    assert printed == log[-len(printed):]


def test_a_negative_host_time_on_the_gpu_is_flagged(capsys):
    summary = pd.read_csv(RESULTS / "layer_summary.csv")
    row = (summary["metric"] == "host_us") & (summary["context"] == 16) & (summary["impl"] == "sdpa")
    summary.loc[row & (summary["shape"] == "moe-lm"), "median"] = -3.0
    bench_layer._print_table(summary, device_clock=True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "host: n/a in 1 row(s) where the engine's wall per layer was below the device time"
    flagged = [line for line in printed if line.split()[3 + bench_layer.METRICS.index("host_us"):][:1] == ["n/a"]]
    assert len(flagged) == 1 and flagged[0].startswith("moe-lm") and " 16 sdpa " in flagged[0]


def test_clock_line_gives_the_sm_range_and_the_reasons_seen():
    times = pd.DataFrame({"sm_mhz_min": [1980.0, 1965.0], "sm_mhz_median": [1980.0, 1980.0],
                          "mem_mhz_min": [3201.0, 3201.0], "clock_event_reasons": ["0x0", "0x4"]})
    assert bench_layer._clock_line(times) == ("GPU clocks while timed (NVML, read only): SM min 1965 MHz, median 1980 "
                                              "MHz; memory min 3201 MHz; clock-event reasons 0x4")


@pytest.mark.parametrize("argv, words", [
    (["--smoke", "--shapes", "gpt-oss-20b"], ["--shapes", "--smoke runs its own tiny shape"]),
    (["--smoke", "--contexts", "5000", "--repeats", "3"], ["--contexts, --repeats", "drop them"]),
    (["--smoke", "--impls", "sdpa+foo"], ["--impls", "'sdpa+foo'", "sdpa+reductions"]),
    (["--smoke", "--contexts", "0"], ["--contexts", "at least 1 position"]),
])
def test_arguments_the_run_would_ignore_or_fail_on_are_refused(tmp_path, capsys, argv, words):
    """--smoke replaced --shapes and --contexts silently; an unknown --impls failed with a traceback after set-up."""
    from conftest import refused
    refused(capsys, lambda: bench_layer.main(["--out", str(tmp_path / "o"), *argv]), *words)
    assert not (tmp_path / "o").exists()
