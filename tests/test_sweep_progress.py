"""What the sweep says while it runs: on a terminal one line updated in place (configurations done of
all, configurations per second, time left); in a log one line per configuration and nothing more."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import sys
import termios
from pathlib import Path

import pytest

from traces import save_trace, synthetic_trace

from conftest import sweep_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trace_path(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(synthetic_trace(num_tokens=300, num_layers=3, num_experts=6, top_k=2, num_requests=4, seed=5), path)
    return path


def test_a_log_gets_one_line_per_configuration(trace_path, tmp_path):
    r = sweep_cli(f"trace={trace_path}", "policy=lru,oracle", "cache_slots=2..4", "--no-plots", "--workers", "2",
                  "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    progress = [line for line in r.stdout.splitlines() if line.startswith("sweep: ")]
    assert len(progress) == 6
    for i, line in enumerate(progress, 1):
        assert re.fullmatch(rf"sweep: {i}/6 policy=(lru|oracle) cache_slots=[234] done in \d+\.\d s; "
                            r"[\d.e+-]+ configs/s, \d\d:\d\d left", line), line
    assert progress[-1].endswith("00:00 left")
    # the longest first: SimPy's oracle before the compiled lru (one worker may still finish an lru early)
    assert sum("oracle" in line for line in progress[:3]) >= 2


def test_a_terminal_gets_one_updating_line(trace_path, tmp_path):
    pid, fd = pty.fork()
    if pid == 0:                                   # the child: the sweep on a 120-column terminal
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "experiments.sweep", f"trace={trace_path}",
                                       "policy=lru,oracle", "cache_slots=2,3", "--no-plots", "--workers", "1",
                                       "--out", str(tmp_path / "out")], {**os.environ, "PYTHONPATH": str(REPO)})
        finally:
            os._exit(127)                          # only if exec failed
    output = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:                            # the child closed the terminal
            break
        if not data:
            break
        output += data
    _, status = os.waitpid(pid, 0)
    text = output.decode()
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert not re.search(r"sweep: \d+/\d+ ", text), text        # no log lines: the one line is redrawn
    renders = re.findall(r"\rsweep: [^\r\n]*", text)
    assert len(renders) >= 2, text                               # redrawn (at most every 0.1 s), then left
    assert re.search(r"4/4 configs \[\d\d:\d\d, [\d.e+-]+ configs/s, 00:00 left\]", renders[-1]), renders[-1]


SLOW = '''import time

from policies.lru import LRU


class Slow(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        time.sleep(0.001)
'''


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_slow_configuration_is_named_while_it_runs(trace_path, tmp_path, capsys, monkeypatch, workers):
    import pandas as pd

    import experiments.sweep as sweep

    monkeypatch.setattr(sweep, "_SLOW_S", 0.2)
    monkeypatch.setattr(sweep, "_SLOW_POLL_S", 0.02)
    policy = tmp_path / "slow.py"
    policy.write_text(SLOW)
    out = tmp_path / "out"
    code = sweep.main([f"trace={trace_path}", f"policy=lru,{policy}:Slow", "cache_slots=2", "max_tokens=100",
                       "--no-plots", "--workers", workers, "--out", out])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.out.splitlines() if line.startswith("still running: ")]
    assert all(re.fullmatch(r"still running: policy=\S+ cache_slots=2 "
                            r"\(\d+ s so far; [\d,]+ layer-steps to replay, about [\d.]+ s expected\)", n)
               for n in notes), notes
    slow = [n for n in notes if n.startswith(f"still running: policy={policy}:Slow ")]
    # Named once it has run _SLOW_S, again at twice that, not at every check (a run of ~1 s: 0.2, 0.4, 0.8 s).
    assert 1 <= len(slow) <= 4, notes
    # What it runs is untouched: an LRU that sleeps gives LRU's numbers.
    df = pd.read_csv(out / "results.csv")
    assert list(df["hits"]) == [df["hits"][0]] * 2 and list(df["tokens_per_s"]) == [df["tokens_per_s"][0]] * 2


_KERNEL_LOADS = '''
import sys

import experiments.sweep
from experiments.config import RunConfig
from experiments.runner import run_config
from sim import kernels

loaded_before_the_run = []


def run_config_counting(cfg):
    loaded_before_the_run.append(sum(kernels.compile_counts()))
    return run_config(cfg)


experiments.sweep.run_config = run_config_counting
cfg = RunConfig(trace=sys.argv[1], policy="lru", cache_slots=2)
assert experiments.sweep._run_one(cfg, "h", "lru", sys.argv[2])[0] is None
print(*loaded_before_the_run, sum(kernels.compile_counts()))
'''


def test_the_speed_of_a_run_does_not_count_loading_the_compiled_kernel(trace_path, tmp_path):
    """Each process's first fast-path run loaded numba's kernel (0.3-1 s, from its disk cache) inside its timed
    simulate(): the printed "simulator speed" and perf.csv counted each worker's start-up, ~100 times a run of the
    committed sample. The sweep's process loads it before the run; the run loads nothing; the line says what it
    counts."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", _KERNEL_LOADS, str(trace_path), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"], done.stdout      # loaded (or compiled) once, before the timed run
    r = sweep_cli(f"trace={trace_path}", "policy=lru,fifo", "cache_slots=2", "--out", tmp_path / "sweep",
                  "--no-plots", "--workers", 2)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("simulator speed: ")]
    assert line.endswith(" simulated layer-steps per wall second of the runs themselves (median over 2 configurations; "
                         "counted: each run from its policy's construction to its metrics, not the processes' start-up, "
                         "the traces' loading, the Belady bound or the row's writing)"), line
