"""The sweep at its edges: a crashing policy keeps its traceback, a signal stops the workers and keeps
the finished rows, broken policy files and misspelt policy parameters are refused in one line."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.config import ConfigError, RunConfig
from experiments.runner import PERF_COLUMNS, ROW_COLUMNS, validate_grid
from experiments.sweep import main
from offload.policy import Policy, check_params
from policies.registry import PolicyLoadError, resolve_policy
from traces import save_trace, synthetic_trace

from conftest import sweep_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "robust.npz"
    save_trace(synthetic_trace(num_tokens=1600, num_layers=4, num_experts=8, top_k=2, num_requests=16, seed=11),
               path)
    return path


CRASHING = '''from policies.lru import LRU


class Crash(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        if access.step > 40:
            raise KeyError(3)
'''


def test_crashing_policy_names_file_line_and_hook_and_keeps_the_traceback(trace_path, tmp_path, capsys):
    policy = tmp_path / "crash.py"
    policy.write_text(CRASHING)
    out = tmp_path / "out"
    code = main([f"trace={trace_path}", f"policy=lru,{policy}:Crash", "cache_slots=2,3", "max_tokens=300",
                 "--out", out, "--no-plots", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    # The console names the policy file, the line that raised and the hook.
    assert f"KeyError: 3 at {policy}:8 in on_access" in err
    assert "2 of 4 configurations failed" in err
    # The run folder keeps each failure's full traceback; the other configurations still finished.
    errors = sorted((out / "errors").glob("*.txt"))
    assert len(errors) == 2
    report = errors[0].read_text()
    assert "Traceback (most recent call last)" in report and "raise KeyError(3)" in report
    assert f'File "{policy}", line 8, in on_access' in report
    assert str(errors[0]) in err
    # one hash on each failure line: the report's file (the row's hash is in the report, labelled)
    line = next(x for x in err.splitlines() if "KeyError: 3" in x)
    assert line.startswith("error: config (") and len(re.findall(r"[0-9a-f]{16}", line)) == 1, line
    assert "its row, once it runs: " in report
    assert list(pd.read_csv(out / "results.csv")["policy"]) == ["lru", "lru"]

    # Fixed, the same command computes the rows and drops the stale reports.
    policy.write_text(CRASHING.replace("raise KeyError(3)", "pass"))
    code = main([f"trace={trace_path}", f"policy=lru,{policy}:Crash", "cache_slots=2,3", "max_tokens=300",
                 "--out", out, "--no-plots", "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    assert not list((out / "errors").glob("*.txt"))
    assert list(pd.read_csv(out / "results.csv")["policy"]) == ["lru", "lru", f"{policy}:Crash", f"{policy}:Crash"]


UNGUARDED = '''from policies import PrefetchRequest
from policies.lru import LRU


class Unguarded(LRU):
    def prefetch(self, access):
        base = (access.layer + 1) * self.ctx.num_experts
        return [PrefetchRequest(base + e, access.step + 1) for e in access.experts]
'''


def test_a_refused_return_value_is_reported_at_the_users_hook_not_the_controller(trace_path, tmp_path, capsys):
    policy = tmp_path / "unguarded.py"
    policy.write_text(UNGUARDED)
    code = main([f"trace={trace_path}", f"policy={policy}:Unguarded", "cache_slots=2", "max_tokens=100",
                 "--out", tmp_path / "out", "--no-plots", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"at {policy}:6 in prefetch" in err and "controller.py" not in err
    assert "a prefetch past the last layer" in err


def test_a_sweep_whose_every_configuration_fails_writes_readable_empty_tables(trace_path, tmp_path, capsys):
    policy = tmp_path / "crash.py"
    policy.write_text(CRASHING)
    out = tmp_path / "out"
    code = main([f"trace={trace_path}", f"policy={policy}:Crash", "cache_slots=2,3", "max_tokens=300",
                 "--out", out, "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1
    results, perf = pd.read_csv(out / "results.csv"), pd.read_csv(out / "perf.csv")
    assert results.empty and list(results.columns) == ROW_COLUMNS
    assert perf.empty and list(perf.columns) == PERF_COLUMNS
    assert pd.read_parquet(out / "results.parquet").empty
    assert (f"0 of 2 configurations in {out}/: results.csv, results.parquet, perf.csv "
            f"(headers only: no configuration finished), resolved_config.yaml") in captured.out
    # A finished run's perf records have those columns.
    main([f"trace={trace_path}", "policy=lru", "cache_slots=2", "max_tokens=300", "--out", out, "--no-plots"])
    assert sorted(pd.read_csv(out / "perf.csv").columns) == sorted(PERF_COLUMNS)
    assert "layer-steps per wall second of the runs themselves (one configuration; counted: " in capsys.readouterr().out


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:          # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_sweep(trace_path, out: Path, rows: int, **streams) -> tuple[subprocess.Popen, list[int]]:
    """A sweep of 21 configurations on the SimPy reference (the fast path would finish every configuration
    before the test acts) with two workers, in its own session, once ``rows`` rows are written: (the sweep,
    its workers). ``streams``: Popen's stdout/stderr/text. The sweep is killed when the wait fails."""
    args = [f"trace={trace_path}", "policy=lru,lfu,fifo", "cache_slots=2..8", "sim_path=reference", "--no-plots",
            "--workers", "2", "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True, **streams)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "rows").glob("*.json"))) < rows and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert len(workers) == 2, "the sweep finished before the signal: make the trace longer"
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return proc, workers


def _wait_gone(pids: list[int], seconds: float) -> None:
    """Until none of ``pids`` is alive, or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("signum, whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "kill"])
def test_signal_stops_workers_keeps_finished_rows_and_says_how_to_resume(trace_path, tmp_path, signum, whole_group):
    """Ctrl-C signals the whole process group; ``kill PID`` / ``timeout`` only the sweep itself."""
    out = tmp_path / "out"
    proc, workers = _start_sweep(trace_path, out, 2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = time.monotonic()
        (os.killpg if whole_group else os.kill)(proc.pid, signum)
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, stderr
    assert took < 5
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived the sweep"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in lines[0]
    assert "run the same command again" in lines[0] and f"--out {out}" in lines[0]
    rows = list((out / "rows").glob("*.json"))
    assert 2 <= len(rows) < 21
    for path in rows:                             # every finished row is whole
        assert json.loads(path.read_text())["config_hash"] == path.stem
    assert not list(out.rglob("*.tmp"))
    assert f"{len(rows)} of 21 configurations are done" in lines[0]


# -- broken policy files and unknown parameters, refused before anything runs -------------------

@pytest.mark.parametrize("source, line, what", [
    ("from policies.lru import LRU\n\n\nclass Mine(LRU)\n    pass\n", 4, "SyntaxError: expected ':'"),
    ("from policies.lru import LRU\nimport no_such_module_here\n", 2,
     "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("from policies.lru import LRU\n\nSCALE = 1 / 0\n", 3, "ZeroDivisionError: division by zero"),
], ids=["syntax", "import", "raises"])
def test_broken_policy_file_is_one_line_naming_file_and_line(trace_path, tmp_path, source, line, what):
    policy = tmp_path / "broken.py"
    policy.write_text(source)
    with pytest.raises(PolicyLoadError) as err:
        resolve_policy(f"{policy}:Mine")
    message = str(err.value)
    assert message.startswith(f"{policy}:{line}: ") and what in message and "fix the file" in message
    assert "\n" not in message

    r = sweep_cli(f"trace={trace_path}", f"policy={policy}:Mine", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_broken_policy_module_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "my_broken_policies.py").write_text("from policies.lru import LRU\n\n\nx = [\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PolicyLoadError, match=r"my_broken_policies.py:4: policy module 'my_broken_policies' "
                                          r"does not load: SyntaxError: .*fix the module"):
        resolve_policy("my_broken_policies:Mine")
    with pytest.raises(PolicyLoadError, match="cannot import module 'no_such_pkg_xyz'.*PYTHONPATH"):
        resolve_policy("no_such_pkg_xyz:Mine")


def test_policies_declare_the_parameters_they_read():
    check_params(resolve_policy("lookahead"), {"min_score": 0.1, "predictor": "pregate"})
    check_params(resolve_policy("mixtral-offloading"), {"predictor": "quasi"})
    with pytest.raises(ValueError) as err:
        check_params(resolve_policy("lru"), {"sed": 7})
    assert str(err.value).startswith("policy LRU has no parameter 'sed' (it declares: none)")
    with pytest.raises(ValueError, match=r"Lookahead has no parameter 'min_scor' \(it declares: min_score, predictor\)"):
        check_params(resolve_policy("lookahead"), {"min_scor": 0.1})
    # `predictor` only for a policy that reads a prediction track.
    with pytest.raises(ValueError, match="'predictor'"):
        check_params(resolve_policy("oracle"), {"predictor": "pregate"})

    class Tuned(Policy):
        parameters = {"alpha": "how much to trust the past"}

    check_params(Tuned, {"alpha": 0.5})
    with pytest.raises(ValueError, match=r"has no parameter 'alpah' \(it declares: alpha\)"):
        check_params(Tuned, {"alpah": 0.5})


def test_misspelt_policy_parameter_is_refused_before_anything_runs(trace_path, tmp_path):
    with pytest.raises(ConfigError, match=r"^policy=lru: policy LRU has no parameter 'sed'"):
        validate_grid([RunConfig(trace=str(trace_path), policy="lru", policy_params=(("sed", 7),))])
    r = sweep_cli(f"trace={trace_path}", "policy=lru", "policy.sed=7", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: policy=lru: policy LRU has no parameter 'sed' (it declares: none); "
        "fix the name, or declare it in the class's `parameters` (a policy.NAME goes to every policy of the grid: "
        "sweep a parameterised policy in a call of its own, with its own --out, to compare it with others)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens, line", [
    (["policy=lru,static", "train_fraction=0"],
     "error: policy=static (train_fraction=0.0): policy 'static' learns from a training slice but none was given; "
     "set train_fraction to a value in (0, 1)"),
    (["policy=affinity", "train_fraction=0"],
     "error: policy=affinity (train_fraction=0.0): policy 'affinity' learns from a training slice"),
    (["policy=lookahead"],
     "error: policy=lookahead reads the prediction track 'lookahead', which {trace} does not hold (it has: none); "
     "use a trace with prediction tracks (e.g. traces/moe-lm-h100.npz: lookahead, pregate, quasi) or compute "
     "them from a recording: python -m experiments.make_tracks"),
    (["policy=mixtral-offloading", "policy.predictor=quasi"],
     "error: policy=mixtral-offloading policy.predictor=quasi reads the prediction track 'quasi'"),
    (["policy=oracle", "policy.cross_tokens=maybe"],
     "error: policy=oracle policy.cross_tokens=maybe: policy oracle: cross_tokens='maybe' must be true or false"),
])
def test_what_would_fail_every_run_is_refused_before_anything_runs(trace_path, tmp_path, capsys, tokens, line):
    out = tmp_path / "out"
    code = main([f"trace={trace_path}", *tokens, "cache_slots=2", "--out", out, "--no-plots", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(line.format(trace=trace_path)), err
    assert not out.exists()


def test_train_fraction_zero_still_runs_the_policies_that_learn_nothing(trace_path, tmp_path, capsys):
    code = main([f"trace={trace_path}", "policy=lru,belady,oracle", "train_fraction=0",
                 "cache_slots=2", "max_tokens=100", "--out", tmp_path / "out", "--no-plots", "--workers", "1"])
    assert code == 0, capsys.readouterr().err



@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_workers_end_when_the_sweep_is_killed_outright(trace_path, tmp_path):
    """``kill -9`` of the sweep: its workers must not live on, adopted by init, waiting for work."""
    out = tmp_path / "out"
    proc, workers = _start_sweep(trace_path, out, 1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.kill()
        proc.wait()
        _wait_gone(workers, 5)
        assert not [pid for pid in workers if _alive(pid)], "a worker outlived the sweep killed by SIGKILL"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_without_prctl_ends_with_its_parent_too(tmp_path):
    """The portable fallback (not Linux): a thread that watches for a new parent."""
    script = f'''
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
import experiments.sweep as sweep
sweep._PARENT_POLL_S = 0.05
if os.fork() == 0:
    sys.platform = "darwin"
    sweep._end_with_parent(os.getppid())
    print(os.getpid(), flush=True)
    time.sleep(30)
    os._exit(0)
time.sleep(30)
'''
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert _alive(child)
        proc.kill()
        proc.wait()
        _wait_gone([child], 5)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("overrides, named", [
    ({"pcie_GBps": 1e-12}, "pcie_GBps=1e-12"),      # 1 MB experts: 11.6 days a copy
    ({"pcie_GBps": 50.0, "copy_latency_us": 1e13}, "copy_latency_us=10000000000000.0"),
])
def test_a_link_too_slow_for_the_clock_is_refused_and_a_slow_one_runs_exactly(trace_path, overrides, named):
    """Both clocks count int64 nanoseconds: a run whose time could pass 2**62 ns is refused before it starts,
    naming the override (it used to wrap into negative or infinite figures); a slow link that fits runs, with
    the same finite figures on the fast path and the reference."""
    from experiments.runner import run_config
    slow = dict(trace=str(trace_path), cache_slots=4, max_tokens=200)
    with pytest.raises(ConfigError, match=re.escape(named) + ".*nanosecond clock"):
        validate_grid([RunConfig(policy="lru", **slow, **overrides)])
    rows = [run_config(RunConfig(policy="lru", pcie_GBps=1e-3, sim_path=p, **slow))[0] for p in ("auto", "reference")]
    assert rows[0]["sim_path_ran"] == "fast" and rows[1]["sim_path_ran"] == "reference"
    for key in ("tokens_per_s", "decode_s", "link_utilisation", "stall_ms_per_token"):
        assert 0 <= rows[0][key] < float("inf") and rows[0][key] == rows[1][key], key


def test_a_prefetching_run_past_the_clock_fails_instead_of_wrapping():
    """What the up-front bound leaves to the run (a prefetching policy's copies beyond the demand ones): the
    simulator refuses a result past its clock's range instead of storing it."""
    from hardware.profile import ConstantCopyCost, load_hardware
    from offload.session import RunSettings
    from sim.simulator import CLOCK_LIMIT_NS, simulate
    import dataclasses
    trace = synthetic_trace(num_tokens=40, num_layers=4, num_experts=8, top_k=2, num_requests=2, seed=3)
    copy_us = CLOCK_LIMIT_NS / 1e3 / 20          # a few copies pass the limit
    slow = dataclasses.replace(load_hardware("h100-pcie5"), copy=ConstantCopyCost(copy_latency_us=copy_us, pcie_GBps=50.0))
    with pytest.raises(ValueError, match="64-bit nanosecond counts"):
        simulate(trace, resolve_policy("oracle"), slow, RunSettings(2, "per_layer"), path="reference")


def test_an_integer_past_int64_is_refused(trace_path):
    with pytest.raises(ConfigError, match="max_tokens=99999999999999999999999 does not fit a 64-bit integer"):
        validate_grid([RunConfig(policy="lru", trace=str(trace_path), cache_slots=4, max_tokens=99999999999999999999999)])


# -- --timeline beside failing configurations ------------------------------------------------------------

RAISING = '''from policies.lru import LRU


class Raising(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        if {when}:
            raise {raises}
'''


def _timeline_sweep(trace_path, out, *tokens):
    return main([f"trace={trace_path}", *tokens, "cache_slots=2", "max_tokens=300", "--timeline", "--no-plots",
                 "--out", out, "--workers", "1"])


@pytest.mark.parametrize("raises, what", [("RuntimeError('boom')", "RuntimeError: boom"),
                                          ("SystemExit(3)", "SystemExit: 3"),
                                          ("KeyboardInterrupt('x')", "KeyboardInterrupt: x")])
def test_timeline_is_of_the_first_configuration_that_finished(trace_path, tmp_path, capsys, raises, what):
    """A failing configuration first in the grid: reported as without --timeline (one line, exit code 1, the
    others finish, the table and summary print); the timeline is the next configuration's."""
    policy = tmp_path / "bad.py"
    policy.write_text(RAISING.format(when="True", raises=raises))
    out = tmp_path / "out"
    assert _timeline_sweep(trace_path, out, f"policy={policy}:Raising,lru") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count(f"{what} at {policy}:8 in on_access") == 2     # as it happens, and at the end
    assert "1 of 2 configurations failed" in captured.err
    assert "timeline: of policy=lru cache_slots=2, the first configuration that finished" in captured.out
    assert "tok/s | hit | %Belady" in captured.out and "timeline.json, timeline.png" in captured.out
    assert json.loads((out / "timeline.json").read_text()) and (out / "timeline.png").is_file()


def test_timeline_with_no_configuration_finished_is_one_line(trace_path, tmp_path, capsys):
    policy = tmp_path / "bad.py"
    policy.write_text(RAISING.format(when="True", raises="RuntimeError('boom')"))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "timeline.json").write_text("{}")      # an earlier call's: not this grid's
    assert _timeline_sweep(trace_path, out, f"policy={policy}:Raising") == 1
    captured = capsys.readouterr()
    assert "timeline: not recorded: no configuration finished" in captured.out
    assert "Traceback" not in captured.err and "1 of 1 configurations failed" in captured.err
    assert not (out / "timeline.json").exists() and not (out / "timeline.png").exists()


def test_a_policy_failing_while_the_timeline_is_recorded_is_a_failure_like_any_other(trace_path, tmp_path, capsys):
    """The policy finishes its run (300 tokens) but raises on the timeline's shorter replay: one line with
    file, line and hook, its traceback in OUT/errors/, the table still printed, exit code 1; fixed, the
    timeline is written and the report removed."""
    policy = tmp_path / "short.py"
    policy.write_text(RAISING.format(when="self.ctx.trace.num_tokens < 300", raises="SystemExit(3)"))
    out = tmp_path / "out"
    assert _timeline_sweep(trace_path, out, f"policy={policy}:Raising") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "tok/s | hit | %Belady" in captured.out
    (line,) = [x for x in captured.err.splitlines() if "SystemExit" in x]
    assert line.startswith(f"error: timeline of config (policy={policy}:Raising cache_slots=2) failed: SystemExit: 3 "
                           f"at {policy}:8 in on_access (traceback: {out / 'errors'}"), line
    (report,) = (out / "errors").glob("*.timeline.txt")
    assert "Traceback (most recent call last)" in report.read_text()
    assert not (out / "timeline.json").exists()

    policy.write_text(RAISING.format(when="False", raises="SystemExit(3)"))
    assert _timeline_sweep(trace_path, out, f"policy={policy}:Raising") == 0, capsys.readouterr().err
    assert (out / "timeline.json").is_file() and not list((out / "errors").glob("*.txt"))


ENDS_ITS_PROCESS = '''import os
import signal

from policies.lru import LRU


class Ends(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        if access.step > 40:
            {ends}
'''


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("ends, how", [("os._exit(7)", "exit code 7"),
                                       ("os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL")],
                         ids=["os._exit", "sigkill"])
def test_a_policy_that_ends_its_process_fails_its_configurations_only(trace_path, tmp_path, ends, how, workers):
    """A worker that dies breaks the pool, which fails every task it holds without saying whose it was: the
    configurations the dead worker ran are named, the others finish. With one worker the user's policy runs in a
    worker process too (in the sweep's own process its os._exit ended the sweep with no word)."""
    policy = tmp_path / "ends.py"
    policy.write_text(ENDS_ITS_PROCESS.format(ends=ends))
    out = tmp_path / "out"
    done = sweep_cli(f"trace={trace_path}", f"policy=lru,{policy}:Ends,belady", "cache_slots=2,3", "max_tokens=300",
                     "--out", out, "--no-plots", "--workers", workers)
    assert done.returncode == 1, done.stderr
    assert "BrokenProcessPool" not in done.stdout + done.stderr
    assert "2 of 6 configurations failed" in done.stderr
    for slots in (2, 3):
        line = next(x for x in done.stderr.splitlines()
                    if x.startswith(f"  config (policy={policy}:Ends cache_slots={slots}) failed: "))
        assert f"its worker process died ({how})" in line and "report: " in line, line
        report = Path(line.rsplit("report: ", 1)[1].rstrip(")")).read_text()
        assert how in report and str(policy) in report
    assert len(list((out / "errors").glob("*.txt"))) == 2
    assert sorted(pd.read_csv(out / "results.csv")["policy"]) == ["belady", "belady", "lru", "lru"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_a_worker_killed_outright_loses_no_configuration(trace_path, tmp_path):
    """``kill -9`` of one worker (what the OOM killer does): what it ran runs again alone, the rest in a fresh
    pool; every configuration finishes."""
    out = tmp_path / "out"
    proc, workers = _start_sweep(trace_path, out, 2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "a worker process died; running alone the configuration" in stdout
    assert "21 of 21 configurations" in stdout
    assert len(list((out / "rows").glob("*.json"))) == 21
    assert not (out / "errors").exists() or not list((out / "errors").iterdir())


ENDS_WHEN_BUILT = '''import os

from policies.lru import LRU


class EndsWhenBuilt(LRU):
    def __init__(self, ctx):
        super().__init__(ctx)
        if {when}:
            os._exit(7)
'''


@pytest.mark.parametrize("when, failing", [("ctx.cache_slots == 3", [3]), ("True", [2, 3])],
                         ids=["at-one-slot-count", "at-every-one"])
def test_a_constructor_that_ends_its_process_fails_its_configurations_only(trace_path, tmp_path, when, failing):
    """The sweep builds each policy once before anything runs, in its own process: an os._exit there ended the
    sweep with no word. Now each configuration whose policy's constructor ends its process fails in one line
    naming the policy's file and the cause, the others finish, and the exit code is 1."""
    policy = tmp_path / "ends_when_built.py"
    policy.write_text(ENDS_WHEN_BUILT.format(when=when))
    out = tmp_path / "out"
    done = sweep_cli(f"trace={trace_path}", f"policy=lru,{policy}:EndsWhenBuilt", "cache_slots=2,3", "max_tokens=300",
                     "--out", out, "--no-plots", "--workers", 1)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and f"{len(failing)} of 4 configurations failed" in done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith(f"  config (policy={policy}:EndsWhenBuilt ")]
    assert len(lines) == len(failing), done.stderr
    for slots, line in zip(failing, lines):
        assert line.startswith(f"  config (policy={policy}:EndsWhenBuilt cache_slots={slots}) failed: the process "
                               f"that built its policy before the runs died (exit code 7): the policy's code ended "
                               f"the process (os._exit) (report: {out / 'errors'}"), line
    assert len(list((out / "errors").glob("*.txt"))) == len(failing)
    assert len(pd.read_csv(out / "results.csv")) == 4 - len(failing)


def test_a_policy_that_ends_its_process_while_the_timeline_is_recorded_fails_the_timeline_only(trace_path, tmp_path):
    """The policy finishes its run (300 tokens) but calls os._exit on the timeline's shorter replay, which ran in
    the sweep's own process and ended it with no word: now one line naming the policy's file and the cause, the
    table and summary printed, exit code 1."""
    policy = tmp_path / "short.py"
    policy.write_text(ENDS_ITS_PROCESS.replace("access.step > 40", "self.ctx.trace.num_tokens < 300")
                      .format(ends="os._exit(7)"))
    out = tmp_path / "out"
    done = sweep_cli(f"trace={trace_path}", f"policy={policy}:Ends,lru", "cache_slots=2", "max_tokens=300",
                     "--timeline", "--no-plots", "--out", out, "--workers", 1)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "tok/s | hit | %Belady" in done.stdout
    assert "2 of 2 configurations in" in done.stdout
    (line,) = [x for x in done.stderr.splitlines() if "timeline" in x]
    assert line.startswith(f"error: timeline of config (policy={policy}:Ends cache_slots=2) failed: its process died "
                           f"(exit code 7) while it recorded the timeline: the policy's code ended the process "
                           f"(os._exit) (report: {out / 'errors'}"), line
    (report,) = (out / "errors").glob("*.timeline.txt")
    assert "exit code 7" in report.read_text() and str(policy) in report.read_text()
    assert not (out / "timeline.json").exists()
