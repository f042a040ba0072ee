"""One sweep at a time writes in an OUT (its lock, OUT/.lock); one file, however its path is spelt, is one input
(the same rows, the same default OUT)."""
import fcntl
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import experiments.sweep as sweep
from experiments.overrides import build_spec
from experiments.results import config_hash
from hardware.profile import PROFILES_DIR
from traces import DEFAULT_TRACE, save_trace, synthetic_trace

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["policy=lru", "cache_slots=2", "max_tokens=40", "--no-plots", "--workers", "1"]
# Holds OUT/.lock as a sweep does, writes its pid there, says so, and waits for stdin to close.
HOLDER = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, str(os.getpid()).encode()); "
          "print('held', flush=True); sys.stdin.read()")


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "lock.npz"
    save_trace(synthetic_trace(num_tokens=400, num_layers=2, num_experts=4, top_k=2, num_requests=8, seed=3), path)
    return path


def _free(lock: Path) -> bool:
    """Whether a new descriptor of ``lock`` can take its lock now (taken and given back at once)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_sweep_on_an_out_in_use_is_refused_in_one_line_and_runs_once_the_holder_is_gone(trace_path, tmp_path,
                                                                                            capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / sweep.LOCK)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert sweep.main([f"trace={trace_path}", *CHEAP, "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [f"error: {out} is in use by another sweep (pid {holder.pid}); wait "
                                             f"for it, or pass another --out"]
        assert captured.out == ""
        assert [p.name for p in out.iterdir()] == [sweep.LOCK]     # nothing written
    finally:
        holder.kill()           # as kill -9: the kernel drops its lock, which is never stale
        holder.wait()
    assert sweep.main([f"trace={trace_path}", *CHEAP, "--out", str(out)]) == 0
    assert len(list((out / "rows").glob("*.json"))) == 1
    assert (out / sweep.LOCK).read_text() == f"{os.getpid()}\n"      # the last holder's pid
    assert _free(out / sweep.LOCK)      # given back when the sweep returned


def _worker_then_wait(ready, done, parent: int) -> None:
    sweep._as_worker(parent)
    ready.set()
    done.wait(30)


def test_a_forked_worker_neither_keeps_nor_breaks_the_lock(tmp_path):
    """A worker inherits the lock's descriptor when forked: it closes its copy, which leaves the sweep's lock held
    while the sweep runs, and lets it go the moment the sweep does, though the worker lives on (a kill -9 of the
    sweep: its workers end only when the kernel's SIGTERM reaches them)."""
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    with sweep._holding_out(tmp_path / "out"):
        worker = context.Process(target=_worker_then_wait, args=(ready, done, os.getpid()))
        worker.start()
        try:
            assert ready.wait(30)
            assert not _free(tmp_path / "out" / sweep.LOCK)    # the worker's close did not give it back
        except BaseException:
            done.set()
            worker.join()
            raise
    try:
        assert worker.is_alive() and _free(tmp_path / "out" / sweep.LOCK)
    finally:
        done.set()
        worker.join()


SLOW = '''import time
from policies.lru import LRU


class Slow(LRU):
    def on_access(self, access, index, key, hit):
        time.sleep(0.002)
        return super().on_access(access, index, key, hit)
'''


def test_a_sweep_killed_outright_leaves_out_to_the_next_which_resumes_and_removes_its_traces(trace_path, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    out = tmp_path / "out"
    args = [f"trace={trace_path}", f"policy={tmp_path / 'slow.py'}:Slow", "cache_slots=2,3", "--no-plots",
            "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    running = out / sweep.SHARED_TRACES / sweep.RUNNING
    try:
        deadline = time.monotonic() + 60
        while not (running.is_dir() and any(running.iterdir())) and time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before its workers ran: make the policy slower"
            time.sleep(0.01)
        assert running.is_dir() and any(running.iterdir()), "no worker said what it ran within 60 s"
    finally:
        proc.send_signal(signal.SIGKILL)    # the sweep alone: its workers live until the kernel's SIGTERM
        proc.wait()
    assert _free(out / sweep.LOCK)
    assert sweep.main(args) == 0
    assert not (out / sweep.SHARED_TRACES).exists()
    assert len(pd.read_csv(out / "results.csv")) == 2


def _spell(trace: Path, how: str, cwd: Path) -> str:
    relative = os.path.relpath(trace, cwd)
    return {"relative": relative, "dot": f".{os.sep}{relative}", "absolute": str(trace)}[how]


def test_every_spelling_of_one_trace_resumes_the_same_rows_in_the_same_default_out(trace_path, tmp_path,
                                                                                  monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for i, how in enumerate(["relative", "dot", "absolute"]):
        assert sweep.main([f"trace={_spell(trace_path, how, work)}", *CHEAP]) == 0
        stdout = capsys.readouterr().out
        assert ("resumed: 1 of 1 already done" in stdout) == (i > 0), (how, stdout)
    [out] = (work / "runs").iterdir()
    table = pd.read_csv(out / "results.csv")
    assert table["trace"].tolist() == [os.path.realpath(trace_path)]   # not how one call spelt it


def test_the_default_trace_named_is_the_default_trace(monkeypatch, tmp_path):
    """``trace=<the committed sample>``, in any spelling, has the rows' keys and the default OUT of no trace=."""
    monkeypatch.chdir(DEFAULT_TRACE.parents[1])
    plans = []
    for tokens in ([], [f"trace={os.path.relpath(DEFAULT_TRACE)}"], [f"trace=./{os.path.relpath(DEFAULT_TRACE)}"],
                   [f"trace={DEFAULT_TRACE}"]):
        spec = sweep.canonical_spec(build_spec([*tokens, "policy=lru", "cache_slots=4"], sweep.DEFAULT_CONFIG))
        [cfg] = spec.grid()
        inputs = {"trace_sha256": "t", "hardware_sha256": "h", "policy_sha256": "p", "code_sha256": "c"}
        plans.append((sweep.default_out(spec), config_hash(cfg, inputs)))
    assert len(set(plans)) == 1, plans


def test_hardware_and_policy_files_are_keyed_by_one_path(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n    pass\n")
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "h.yaml").write_bytes((PROFILES_DIR / "h100-pcie5.yaml").read_bytes())
    monkeypatch.chdir(tmp_path / "hw")
    specs = [sweep.canonical_spec(build_spec([f"policy={policy}", f"hardware={hardware}"]))
             for policy, hardware in (("../mine.py:Mine", "h.yaml"), (f"{tmp_path}/mine.py:Mine", "./h.yaml"),
                                      (f"{tmp_path}/hw/../mine.py:Mine", str(tmp_path / "hw" / "h.yaml")))]
    assert {spec.to_dict()["policy"][0] for spec in specs} == {f"{tmp_path / 'mine.py'}:Mine"}
    assert {spec.to_dict()["hardware"][0] for spec in specs} == {os.path.realpath(tmp_path / "hw" / "h.yaml")}
    # A profile's name and the registry's names are no paths: left as they are.
    named = sweep.canonical_spec(build_spec(["policy=lru,policies.lru:LRU", "hardware=h100-pcie5"])).to_dict()
    assert named["policy"] == ["lru", "policies.lru:LRU"] and named["hardware"] == ["h100-pcie5"]


def test_a_path_that_names_no_file_stays_as_given_for_its_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = sweep.canonical_spec(build_spec(["trace=missing.npz", "hardware=./none.yaml", "policy=no.py:C"]))
    assert spec.to_dict() == {"trace": ["missing.npz"], "hardware": ["./none.yaml"], "policy": ["no.py:C"]}
    assert sweep.main(["trace=missing.npz", *CHEAP]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: missing.npz: file: no such trace file: check the path (traces.DEFAULT_TRACE is the committed sample)"]
    assert not (tmp_path / "runs").exists()


def test_a_shipped_profile_given_by_its_file_is_keyed_by_its_name(tmp_path, monkeypatch):
    """hardware=a100-pcie4 and hardware=hardware/profiles/a100-pcie4.yaml were two keys, two folders, two rows."""
    monkeypatch.chdir(PROFILES_DIR.parent.parent)
    spellings = ["a100-pcie4", "hardware/profiles/a100-pcie4.yaml", str(PROFILES_DIR / "a100-pcie4.yaml"),
                 "./hardware/../hardware/profiles/a100-pcie4.yaml"]
    keyed = {sweep.canonical_spec(build_spec([f"hardware={h}"])).to_dict()["hardware"][0] for h in spellings}
    assert keyed == {"a100-pcie4"}
    copy = tmp_path / "a100-pcie4.yaml"        # the same name elsewhere is another file: its path
    copy.write_bytes((PROFILES_DIR / "a100-pcie4.yaml").read_bytes())
    assert sweep.canonical_spec(build_spec([f"hardware={copy}"])).to_dict()["hardware"] == [os.path.realpath(copy)]
