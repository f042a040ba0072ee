"""SIGTERM (``timeout``, a scheduler, the device's call limit) ends an engine command as Ctrl-C does: one line,
exit code 130, every finished run kept. It used to kill the process outright, with no word (exit 143)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.interrupts import sigterm_as_interrupt

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_raises_keyboard_interrupt_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)        # the handler runs at the next bytecode: never reached
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_ends_engine_bench_in_one_line_keeping_finished_runs(tiny_replay_trace, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.engine_bench", "replay", "--trace", str(tiny_replay_trace),
                             "--device", "cpu", "--max-tokens", "8", "--repeats", "50", "--slots", "2",
                             "--policies", "lru", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    def rows() -> int:
        table = out / "engine.csv"
        return len(table.read_text().splitlines()) - 1 if table.exists() else 0
    while rows() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)           # a row is written once a round ends: the command is measuring
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines()[-1] == f"interrupted: the tables in {out} hold every run that finished", stderr
    assert "Traceback" not in stderr
    assert pd.read_csv(out / "engine.csv")["runs"].min() >= 1
