"""Sweep a grid of configurations through the simulator.

    python -m experiments.sweep [key=value ...] [--config FILE.yaml] [--out DIR] [--workers N]
                                [--no-plots] [--timeline]

With no ``--config`` the scenario is ``experiments/configs/default.yaml`` (every baseline policy,
cache_slots 4..8, the committed gpt-oss-20b sample trace on h100-pcie5). ``key=value`` tokens replace
the scenario's keys: ``cache_slots=4..8``, ``policy=lru,belady``, ``cache_slots=range(4,12,2)``,
``pcie_GBps=25``, ``policy.NAME=value`` for a policy parameter.

Each finished configuration is written at once as ``OUT/rows/<config_hash>.json``; running the same
command again skips the configurations already done, so a killed sweep resumes where it stopped.
The default OUT is ``runs/sweep-<hash of the spec>/``. A file's path (the trace, a hardware profile's YAML, a
policy's FILE.py) counts as the file's absolute path however it is spelt, in the key, the default OUT and
results.csv: ``trace=t.npz`` and ``trace=./t.npz`` resume the same rows, and naming the committed sample trace
is the same as naming no trace. A row is keyed by its configuration and
every input it depends on that the sweep can see (trace, hardware profile, policy source, the code that
computes a row; not a data file a policy reads at run time): a row
computed from other inputs is recomputed, and the sweep says how many and why. A damaged file there (a
truncated row, one holding no whole row of its name) is named in one line: its configuration is
recomputed, which rewrites it; one that is no configuration's row is left alone. A row whose perf record
(``OUT/perf/<hash>.json``) is missing is kept as it is and named in one line (perf.csv lacks it; deleting the row
recomputes both). A call that draws no
figure (``--no-plots``) keeps an earlier call's figures while they show its table (``OUT/figures.json`` records
what each was drawn from) and removes, saying why, those that show other results.

One sweep at a time writes in an OUT: it holds a lock there (``OUT/.lock``, which the system drops when the sweep
ends, even killed outright), and another sweep given that OUT exits with code 2 and one line naming the
holder's pid. Bad input (an ``--out`` that is a file included, and whatever a policy's constructor raises at every
configuration of that policy in the grid) exits with code 2 and one line on stderr. A configuration that
fails at run time (SystemExit from a policy too, or its constructor at some configurations only) is
reported by name with the file and line where it raised, its traceback is kept in
``OUT/errors/``, the others are still written, and the exit code is 1. A configuration whose worker process dies
(a policy's os._exit, a signal, the OOM killer) is run again alone: where it dies again it fails like one that raised
(its exit code or signal in place of a traceback), while the others finish in a fresh pool. The printed table keeps
every configuration of the grid, a failed one as a ``failed`` cell; each failure is named as it happens and listed once
in the final block. A policy of the user's
is built before anything runs, and records ``--timeline``, in a process of its own too: a constructor that ends it
fails its configurations, a timeline that ends it fails the timeline, each in one line. SIGINT
(Ctrl-C) or SIGTERM stops the workers at once, keeps every finished row, says how to resume, and
exits with 130 or 143.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import re
import shlex
import signal
import statistics
import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from experiments.config import ConfigError, RunConfig, SweepSpec, valid_keys_text
from experiments.figure_sources import RECORD, row_source, settle, table_source
from experiments.overrides import DEFAULT_SCENARIO, build_spec
from experiments.results import ResultStore, config_hash, row_inputs
from experiments.runner import (PERF_COLUMNS, ROW_COLUMNS, cached_trace, compute_notes, expected_seconds, hardware_for,
                                record_timeline, run_config, share_traces, trace_slices, use_shared_traces,
                                validate_grid)
from hardware.profile import PROFILES_DIR, hardware_to_dict, is_profile_name
from offload.session import RunSettings
from policies.registry import (BUILTIN, POLICY_PARAM_PREFIX, RUN_FAILURES, failure_site, param_text, policy_label,
                               resolve_policy)
from traces.io import output_problem

DEFAULT_CONFIG = DEFAULT_SCENARIO
TIMELINE_TOKENS = 20
SHARED_TRACES = ".traces"      # in OUT while workers run: the traces they map (runner.share_traces)
RUNNING = "running"            # in SHARED_TRACES: one file per worker naming the task it runs (_run_task)
LOCK = ".lock"                 # in OUT: locked by the sweep that writes there, naming its pid (_holding_out)
_lock_fd: int | None = None    # this process's hold on OUT/LOCK while its sweep runs; a forked worker drops its copy
_WORKER_GRACE_S = 2.0
_PARENT_POLL_S = 1.0
# A configuration running longer than this is named (and again at twice it, four times...); checked so often.
_SLOW_S = 10.0
_SLOW_POLL_S = 1.0


def _user_path(text: str) -> Path:
    return Path(text).expanduser()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"keys: {valid_keys_text()}\nvalues: a..b (inclusive), a,b,c (items may be "
                                       "ranges: 4..5,7), range(a,b[,step]) (stop exclusive), null, or a scalar; "
                                       "see experiments/configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. cache_slots=4..8 policy=lru,belady")
    # --out=~/x is one word whose ~ no shell expands: the sweep made a folder named ~ in the current one.
    p.add_argument("--config", type=_user_path, default=DEFAULT_CONFIG, help="scenario YAML (default: %(default)s)")
    p.add_argument("--out", type=_user_path, help="output dir (default: runs/sweep-<hash of the spec>)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the CPU count; 1 runs the project's policies in this process, "
                        "a policy of your own in one worker)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--timeline", action="store_true",
                   help=f"also write the first ~{TIMELINE_TOKENS} tokens of the first configuration that finished "
                        "as timeline.json (Chrome trace, opens in ui.perfetto.dev) and timeline.png")
    return p


def describe(cfg: RunConfig, keys: list[str]) -> str:
    """``policy=NAME policy.P=V cache_slots=N`` and the other ``keys``: every parameter given to the
    policy is shown, varied or not (a single ``policy.cross_tokens=false`` changes the policy)."""
    shown = dict.fromkeys(["cache_slots", *keys])
    values = cfg.to_dict()
    return " ".join([f"policy={policy_label(cfg.policy, cfg.policy_params)}",
                     *(f"{k}={param_text(values[k])}" for k in shown if k in values and k != "policy")])


def _value_text(value) -> str:
    """A table column's value as written on the command line: null for NaN (None in a column that also holds
    numbers), 2 for 2.0 (an integer column widened to floats by such a NaN)."""
    if isinstance(value, float):
        if value != value:
            return "null"
        if value.is_integer():
            return str(int(value))
    return param_text(value)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt: no ``except Exception``
    that reports a failed configuration may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Writes:
    """A signal that arrives while a result file is written waits until the write is done, so a row
    being written is finished, not lost. (Masking the signal would not do: a signal sent to a
    process goes to any of its threads that does not mask it, and workers run library threads.)"""
    active = False
    pending: tuple[Callable[[int], None], int] | None = None


def _deferring(action: Callable[[int], None]):
    def handler(signum, frame) -> None:
        if _Writes.active:
            _Writes.pending = (action, signum)
        else:
            action(signum)
    return handler


@contextlib.contextmanager
def _whole_write():
    _Writes.active = True
    try:
        yield
    finally:
        _Writes.active = False
        if _Writes.pending is not None:
            action, signum = _Writes.pending
            _Writes.pending = None
            action(signum)


def _raise_interrupted(signum: int) -> None:
    raise Interrupted(signum)


def _exit_worker(signum: int) -> None:
    # Nothing to clean up: a write in progress was finished first (_whole_write).
    os._exit(128 + signum)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted in this process while the block runs."""
    handler = _deferring(_raise_interrupted)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _end_with_parent(parent: int) -> None:
    """SIGTERM to this worker once the sweep's process ``parent`` is gone, even killed outright (SIGKILL),
    instead of living on, adopted by init, waiting for work that never comes. Linux: the kernel sends it
    (prctl PR_SET_PDEATHSIG); elsewhere a thread looks for a new parent every second."""
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(_PARENT_POLL_S)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, name="sweep-parent-watch", daemon=True).start()
    if os.getppid() != parent:      # it died before the request above was made
        os.kill(os.getpid(), signal.SIGTERM)


def _as_worker(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the sweep stops the workers, they do not stop
    # themselves (each with a traceback). SIGTERM, which the sweep sends them (or the kernel, when the
    # sweep is gone: _end_with_parent), ends them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _deferring(_exit_worker))
    _drop_out_lock()
    _end_with_parent(parent)


def _init_worker(shared_traces: str, parent: int) -> None:
    _as_worker(parent)
    use_shared_traces(Path(shared_traces))


def _call_alone(conn, parent: int, fn: Callable, args: tuple) -> None:
    """``_in_own_process``'s process: ``fn(*args)``'s value goes back through ``conn``."""
    _as_worker(parent)
    conn.send(fn(*args))
    conn.close()


def _in_own_process(fn: Callable, *args) -> tuple[object, int | None]:
    """``fn(*args)`` in a process of its own, for a policy's code that may end its process (os._exit, a signal,
    the OOM killer) outside a configuration's run: (its value, None), or (None, the process's exit code, minus
    the signal that killed it) where the process ended without returning one."""
    context = multiprocessing.get_context()
    receive, send = context.Pipe(duplex=False)
    proc = context.Process(target=_call_alone, args=(send, os.getpid(), fn, args), name="sweep-policy-alone")
    proc.start()
    send.close()
    try:
        try:
            value = receive.recv()
        except EOFError:        # it ended before it sent its value
            proc.join()
            return None, proc.exitcode
        proc.join()
        return value, None
    finally:
        _end_processes([proc] if proc.exitcode is None else [])


class OutInUse(Exception):
    """Another process holds OUT's lock (``_holding_out``); ``holder``: its pid as text, or "pid unknown"."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def _holding_out(out: Path):
    """Hold an exclusive advisory lock (flock) on ``out``/LOCK, creating ``out``, while the block runs: a second
    sweep on the same OUT is refused (OutInUse) instead of writing beside this one and removing the traces its
    workers map (SHARED_TRACES). The kernel drops the lock when this process ends, a kill -9 included: a lock is
    never stale. The file, naming the holder's pid, is left in place: removing it would let a third sweep lock a
    new file while a second holds the old one. OSError where the file cannot be opened or locked."""
    global _lock_fd
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise OutInUse(holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _lock_fd = fd
        yield
    finally:
        _lock_fd = None
        os.close(fd)        # the lock goes with the last descriptor of it: workers closed theirs (_drop_out_lock)


def _lock_holder(fd: int) -> str:
    """``pid N`` of the process that holds the lock on ``fd``'s file, as it wrote there; "pid unknown" where it
    wrote none within a second (it writes it just after it locks)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.05)
    return "pid unknown"


def _drop_out_lock() -> None:
    """In a forked worker: close its inherited copy of the sweep's lock descriptor. Closing a copy leaves the lock
    held (it goes with the last descriptor, or an explicit unlock, which no worker makes); without this, workers
    still ending after a kill -9 of the sweep would hold OUT a moment longer."""
    global _lock_fd
    if _lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_lock_fd)
        _lock_fd = None


def _run_task(task: int, cfg: RunConfig, h: str, label: str, out: Path) -> tuple[str | None, float]:
    """``_run_one`` in a pool's worker, which says meanwhile, in a file of its own, which task it runs: a worker
    that dies (a policy's os._exit, the OOM killer) takes its task with it, and the pool only says it broke."""
    marker = out / SHARED_TRACES / RUNNING / str(os.getpid())
    marker.write_text(str(task))
    result = _run_one(cfg, h, label, out)
    marker.unlink()
    return result


def _run_alone(conn, shared_traces: str, parent: int, cfg: RunConfig, h: str, label: str, out: Path) -> None:
    """A process of its own for one configuration (``_run_isolated``): its result goes back through ``conn``."""
    _init_worker(shared_traces, parent)
    conn.send(_run_one(cfg, h, label, out))
    conn.close()


def _run_one(cfg: RunConfig, h: str, label: str, out: Path) -> tuple[str | None, float]:
    """Run one configuration and store what it gives, in whichever process runs it: the row (so a
    finished row survives the sweep being killed) or the failure's report with its traceback.
    (None when the row is written, else the failure as one line; the seconds it took)."""
    store = ResultStore(out)
    start = time.perf_counter()
    try:
        _warm_fast_path(cfg)
        row, perf = run_config(cfg)
    except (*RUN_FAILURES, KeyboardInterrupt) as err:  # reported by name; the other configs go on
        # A SystemExit can come only from the policy's code (a worker ends by os._exit), and so can a
        # KeyboardInterrupt (workers ignore SIGINT; the sweep's own process turns it into Interrupted while it
        # runs a configuration): failures like any other.
        # One hash on the console: the report's file, named by the configuration alone (it keeps the latest
        # attempt); the row's hash (the configuration and its inputs) is in the report, labelled.
        return _failed(store, cfg, f"config ({label})", err, f"its row, once it runs: {store.row_path(h)}",
                       "run"), time.perf_counter() - start
    with _whole_write():
        store.write(row, perf)
    return None, time.perf_counter() - start


_warmed: set[str] = set()      # the traces whose fast-path kernel this process has loaded (_warm_fast_path)


def _warm_fast_path(cfg: RunConfig) -> None:
    """Load the fast path's compiled kernel for ``cfg``'s routing once per process, before the run that would
    otherwise be timed with it: a configuration's speed (perf.csv, the summary's "simulator speed") is then its run's,
    not the process's start-up (numba's kernel loaded from its disk cache, or compiled on a fresh checkout: ~0.3-1 s,
    30-100 times a run of the committed sample)."""
    from sim.fast_path import fast_replay_untimed, kernel_for    # numba's import, as runner.expected_seconds'
    if cfg.trace in _warmed or cfg.sim_path != "auto" or kernel_for(cfg.policy, dict(cfg.policy_params)) is None:
        return
    head = trace_slices(cfg)[1].head_tokens(1)      # a view of the run's own routing: the kernel's signature
    fast_replay_untimed(head, "lru", RunSettings(cache_slots=head.model.top_k))
    _warmed.add(cfg.trace)


def _failed(store: ResultStore, cfg: RunConfig, what: str, err: BaseException, note: str, kind: str) -> str:
    """Keep the report of ``cfg``'s failure ``err`` (``kind``: its run or its timeline) with its traceback in
    OUT/errors/; the failure as one line: the error, the file and line in the policy where it raised, the
    report's path."""
    # A value the controller refused left the policy by returning: the hook's site names the user's code.
    site = failure_site(resolve_policy(cfg.policy), err)
    error = f"{type(err).__name__}: {' '.join(str(err).split())}"
    report = f"{what} failed at {site}: {error}\n{note}\n\n{''.join(traceback.format_exception(err))}"
    with _whole_write():
        path = store.write_error(cfg, report, kind)
    return f"{error} at {site} (traceback: {path})"


def _died(store: ResultStore, cfg: RunConfig, what: str, exitcode: int, died: str, note: str, kind: str = "run") -> str:
    """Keep the report of ``what``, ``cfg``'s run (``kind``: or its timeline) that ended its process (``exitcode``: its
    exit status, or minus the signal that killed it), in OUT/errors/; the failure as one line. ``died``: which process
    died while it did what, with ``{how}`` for the way it ended."""
    how, cause = _death_cause(exitcode)
    error = f"{died.format(how=how)}: {cause}"
    report = (f"{what} failed: {error}\n{note}\n\nNo traceback: the process ended without raising. Look in the policy "
              f"({cfg.policy}) for os._exit, os.kill or memory that grows with the trace; the kernel's log (dmesg, "
              f"journalctl -k) names a process the OOM killer ended.\n")
    with _whole_write():
        path = store.write_error(cfg, report, kind)
    return f"{error} (report: {path})"


def _death_cause(exitcode: int) -> tuple[str, str]:
    """How a process that ran a policy's code ended (``exitcode``: its exit status, or minus the signal that killed
    it), and the likely cause."""
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        cause = ("the system killed it (the OOM killer sends SIGKILL: memory) or a kill -9, the policy's own included"
                 if name == "SIGKILL" else f"the policy's code sent it {name} or crashed in compiled code")
        how = f"killed by {name}"
    elif exitcode == 128 + signal.SIGTERM:      # a worker's own way to end on SIGTERM (_exit_worker)
        how, cause = f"SIGTERM, exit code {exitcode}", "something sent it SIGTERM (kill PID), the policy's code included"
    else:
        how, cause = f"exit code {exitcode}", "the policy's code ended the process (os._exit)"
    return how, cause


def _write_timeline(grid: list[RunConfig], hashes: list[str], store: ResultStore, varying: list[str]
                    ) -> tuple[list[str], str | None, str | None]:
    """``--timeline``: the first ~TIMELINE_TOKENS tokens of the first configuration that finished, as
    timeline.json and timeline.png. (The files written; the row hash of the configuration they show; the
    failure as one line where the policy raised while the timeline was recorded, reported like a failed
    configuration.) With no configuration finished, one line
    says there is none to record."""
    first, h = next(((cfg, h) for cfg, h in zip(grid, hashes) if store.done(h)), (None, None))
    if first is None:
        print("timeline: not recorded: no configuration finished")
        return [], None, None
    label = describe(first, varying)
    if first != grid[0]:
        print(f"timeline: of {label}, the first configuration that finished")
    if first.policy in BUILTIN:
        timeline, failure = _timeline_or_failure(first, h, label, store.out)
    else:   # a policy of the user's records in a process of its own: its os._exit fails the timeline, not the sweep
        result, exitcode = _in_own_process(_timeline_or_failure, first, h, label, store.out)
        timeline, failure = result if exitcode is None else (None, f"timeline of config ({label}) failed: " + _died(
            store, first, f"timeline of config ({label})", exitcode,
            "its process died ({how}) while it recorded the timeline", f"its row: {store.row_path(h)}", "timeline"))
    if failure is not None:
        return [], None, failure
    store.error_path(first, "timeline").unlink(missing_ok=True)
    from plots.figures import plot_timeline
    from sim.chrome_trace import write_chrome_trace
    experts = cached_trace(first.trace).model.num_experts
    write_chrome_trace(timeline, store.out / "timeline.json", lambda k: f"L{k // experts} E{k % experts}", experts)
    plot_timeline(timeline, store.out / "timeline.png", config=label)
    return ["timeline.json", "timeline.png"], h, None


def _timeline_or_failure(cfg: RunConfig, h: str, label: str, out: Path) -> tuple[object, str | None]:
    """(``cfg``'s timeline, None), or (None, the failure as one line) where the policy raised while it was recorded,
    its report kept in OUT/errors/ as a failed run's is; in whichever process records it."""
    try:
        return record_timeline(cfg, TIMELINE_TOKENS), None
    except (*RUN_FAILURES, KeyboardInterrupt) as err:    # as in _run_one: a failure of the policy's code
        what = f"timeline of config ({label})"
        store = ResultStore(out)
        return None, f"{what} failed: {_failed(store, cfg, what, err, f'its row: {store.row_path(h)}', 'timeline')}"


def _layer_steps(run) -> int:
    return run.num_tokens * run.num_layers


class _Progress:
    """What the sweep says while it runs. On a terminal: one line, updated in place, with the
    configurations done of all, configurations per second and the time left (on stderr). In a log
    (stderr not a terminal): one line per finished configuration with the same figures on stdout,
    beside the results, and nothing else; stderr keeps errors only. In both, a configuration that has run
    ``_SLOW_S`` seconds is named where the progress goes ("still running: ..."), again at twice that...

    The time left: each configuration still to finish weighs its expected cost
    (``runner.expected_seconds``: per layer-step the fast path is ~100x cheaper than SimPy), scaled by
    how the finished ones' measured times compare with theirs, shared among the workers."""

    def __init__(self, pending: list[tuple[RunConfig, str]], varying: list[str], workers: int):
        self.expected = {h: expected_seconds(cfg) for cfg, h in pending}
        self.layer_steps = {h: _layer_steps(trace_slices(cfg)[1]) for cfg, h in pending}
        self.running: dict[object, tuple[float, float]] = {}    # key -> (when it was first seen running, next report)
        self.varying = varying
        self.workers = workers
        self.total, self.done = len(pending), 0
        self.expected_left = sum(self.expected[h] for _, h in pending)
        self.expected_done = self.measured_done = 0.0
        self.start = time.monotonic()
        self.live = sys.stderr.isatty()
        self.bar = tqdm(total=self.total, desc="sweep", file=sys.stderr, disable=not self.live,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} configs [{elapsed}{postfix}]")

    def finished(self, cfg: RunConfig, h: str, failure: str | None, seconds: float) -> None:
        self.done += 1
        self.expected_done += self.expected[h]
        self.expected_left -= self.expected[h]
        self.measured_done += seconds
        scale = self.measured_done / self.expected_done if self.expected_done > 0 else 1.0
        sharing = max(1, min(self.workers, self.total - self.done))
        left = max(self.expected_left, 0.0) * scale / sharing
        elapsed = time.monotonic() - self.start
        figures = f"{self.done / elapsed if elapsed > 0 else 0:.3g} configs/s, {tqdm.format_interval(left)} left"
        if self.live:
            self.bar.set_postfix_str(figures, refresh=False)
            self.bar.update()
        else:
            outcome = "failed" if failure is not None else "done"
            print(f"sweep: {self.done}/{self.total} {describe(cfg, self.varying)} {outcome} in {seconds:.1f} s; "
                  f"{figures}", flush=True)

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def note(self, line: str) -> None:
        """A line about the run, where the progress goes: above the bar on a terminal, else on stdout."""
        if self.live:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def still_running(self, running: list[tuple[object, RunConfig, str]]) -> None:
        """Say, for each of ``running`` ((key, configuration, hash), the configurations running now), that it
        is still running once it has run ``_SLOW_S`` seconds, again at twice that, four times...: a slow
        policy is seen while it runs, not only at its end."""
        now = time.monotonic()
        watched = {}
        for key, cfg, h in running:
            start, due = self.running.get(key, (now, _SLOW_S))
            if now - start >= due:
                self.note(f"still running: {describe(cfg, self.varying)} ({now - start:.0f} s so far; "
                          f"{self.layer_steps[h]:,} layer-steps to replay, about {self.expected[h]:.1f} s expected)")
                due *= 2
            watched[key] = (start, due)
        self.running = watched

    def close(self) -> None:
        self.bar.close()


def _run_all(pending: list[tuple[RunConfig, str]], out: Path, workers: int, varying: list[str],
             plots: bool = False) -> list[tuple[str, str]]:
    """Run ``pending``; the failures, each as (its configuration's hash, one line). On Interrupted the workers
    are ended before it propagates: what they finished is on disk, what they were running is lost. ``plots``: the
    sweep draws its figures afterwards (worker processes: this process imports what that needs meanwhile)."""
    failures = []
    workers = min(workers, len(pending))
    progress = _Progress(pending, varying, workers)

    def report(cfg: RunConfig, h: str, failure: str | None, seconds: float) -> None:
        if failure is not None:
            line = f"config ({describe(cfg, varying)}) failed: {failure}"
            failures.append((h, line))
            progress.say(f"error: {line}")
        progress.finished(cfg, h, failure, seconds)

    try:
        # A policy of the user's runs in a worker process even with one worker: an os._exit in its code, or the
        # OOM killer, then fails its configuration instead of ending the sweep with no word.
        if workers <= 1 and all(cfg.policy in BUILTIN for cfg, _ in pending):
            current: list[tuple[object, RunConfig, str]] = []
            with _watching(progress, lambda: list(current)):
                for i, (cfg, h) in enumerate(pending):
                    current[:] = [(i, cfg, h)]
                    report(cfg, h, *_run_one(cfg, h, describe(cfg, varying), out))
        else:
            # Longest first, so that the workers run out of work together instead of one finishing a
            # long SimPy configuration while the other idles.
            longest_first = sorted(pending, key=lambda ch: -progress.expected[ch[1]])
            _run_pool(longest_first, out, workers, varying, report, plots, progress)
    finally:
        progress.close()
    return failures


@contextlib.contextmanager
def _watching(progress: _Progress, running_now: Callable[[], list[tuple[object, RunConfig, str]]]):
    """A thread that tells ``progress`` every ``_SLOW_POLL_S`` which configurations are running
    (``running_now``), while the block runs: it reads and prints, and touches no run."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(_SLOW_POLL_S):
            progress.still_running(running_now())
    thread = threading.Thread(target=watch, name="sweep-slow-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_pool(pending, out: Path, workers: int, varying: list[str], report, plots: bool,
              progress: _Progress) -> None:
    # The workers map one copy of each trace (runner.share_traces) instead of decompressing their own. The
    # copies live in OUT, named by the trace's digest: a sweep killed outright leaves them where its resume
    # uses them again and then removes them.
    shared = out / SHARED_TRACES
    # The markers a sweep killed outright left for its workers would name tasks of its own as this call's: gone.
    # No other sweep's workers write there (this one holds OUT's lock).
    shutil.rmtree(shared / RUNNING, ignore_errors=True)
    try:
        share_traces([cfg.trace for cfg, _ in pending], shared)
        _run_workers(pending, out, workers, varying, report, str(shared), plots, progress)
    finally:
        use_shared_traces(None)
        shutil.rmtree(shared, ignore_errors=True)


def _run_workers(pending, out: Path, workers: int, varying: list[str], report, shared: str, plots: bool,
                 progress: _Progress) -> None:
    """Run ``pending`` in a pool of ``workers`` processes. A worker that dies (a policy's os._exit, the OOM killer)
    breaks the pool, which fails every task it has not finished, naming none: the configurations its workers were
    running (RUNNING) are the suspects, each run again alone in a process of its own (``_run_isolated``), where
    one whose process dies again is the culprit, reported failed; the rest, innocent, go on in a fresh pool."""
    todo = pending
    on_start: Callable[[], None] | None = lambda: _import_for_results(plots)
    while todo:
        broken, started = _pool_round(todo, out, workers, varying, report, shared, progress, on_start)
        on_start = None
        if not broken:
            return
        # No worker had said what it ran (it died starting): one configuration at a time alone still ends the loop.
        alone = {i for i, _, _ in broken if i in started} or {broken[0][0]}
        suspects = [(cfg, h) for i, cfg, h in broken if i in alone]
        todo = [(cfg, h) for i, cfg, h in broken if i not in alone]
        progress.note(f"a worker process died; running alone the configuration{'s' * (len(suspects) > 1)} it may have "
                      f"been running: {'; '.join(describe(cfg, varying) for cfg, _ in suspects)}")
        _run_isolated(suspects, out, varying, report, shared, progress)


def _pool_round(tasks, out: Path, workers: int, varying: list[str], report, shared: str, progress: _Progress,
                on_start: Callable[[], None] | None) -> tuple[list[tuple[int, RunConfig, str]], set[int]]:
    """Run ``tasks`` in a fresh pool until each is reported or the pool breaks; ``on_start`` once the workers are
    started. (The tasks the broken pool did not finish: (index, configuration, hash); the indices its workers
    said they were running.)"""
    running = Path(shared) / RUNNING
    running.mkdir(parents=True, exist_ok=True)
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_init_worker,
                               initargs=(shared, os.getpid()))
    futures: dict[object, tuple[int, RunConfig, str]] = {}
    broken = []

    def running_now() -> list[tuple[object, RunConfig, str]]:
        # A future is "running" once in the pool's call queue, which holds one more than the workers run;
        # the workers take them in submission order: the first ``workers`` of them are the ones running.
        return [(f, *futures[f][1:]) for f in futures if f.running()][:workers]
    try:
        for i, (cfg, h) in enumerate(tasks):
            try:
                futures[pool.submit(_run_task, i, cfg, h, describe(cfg, varying), out)] = (i, cfg, h)
            except BrokenProcessPool:       # a worker died already: the rest wait for the next pool
                broken.append((i, cfg, h))
        if on_start is not None:
            on_start()
        with _watching(progress, running_now):  # started after the workers are: none is forked with it
            for future in as_completed(futures):
                i, cfg, h = futures[future]
                err = future.exception()    # only a pool failure: _run_one reports the rest
                if isinstance(err, BrokenProcessPool):
                    broken.append((i, cfg, h))
                    continue
                report(cfg, h, *(future.result() if err is None else (f"{type(err).__name__}: {err}", 0.0)))
    except BaseException:
        # The executor has no public way to stop running tasks: end its processes ourselves.
        pool.shutdown(wait=False, cancel_futures=True)
        _end_processes([p for p in multiprocessing.active_children() if p not in before])
        raise
    pool.shutdown()
    started = set()
    for marker in running.iterdir():
        task = marker.read_text()
        if task.isdigit():      # empty where a worker died writing it
            started.add(int(task))
        marker.unlink()
    return sorted(broken), started


def _run_isolated(suspects: list[tuple[RunConfig, str]], out: Path, varying: list[str], report, shared: str,
                  progress: _Progress) -> None:
    """Run each of ``suspects`` at once, each alone in a process of its own (there are at most as many as the
    workers), and report it: its result, or, where its process died, the configuration that killed it."""
    context = multiprocessing.get_context()
    store = ResultStore(out)
    alive: list[tuple[object, RunConfig, str]] = []
    started = []
    try:
        for cfg, h in suspects:
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(target=_run_alone, args=(send, shared, os.getpid(), cfg, h, describe(cfg, varying),
                                                            out), name=f"sweep-alone-{h[:8]}")
            proc.start()
            send.close()
            started.append((proc, receive, cfg, h, time.perf_counter()))
            alive.append((proc, cfg, h))
        with _watching(progress, lambda: list(alive)):
            for proc, receive, cfg, h, start in started:
                try:
                    result = receive.recv()
                except EOFError:        # the process ended before it sent its result
                    result = None
                proc.join()
                alive[:] = [a for a in alive if a[0] is not proc]
                if result is None:
                    result = (_died(store, cfg, f"config ({describe(cfg, varying)})", proc.exitcode,
                                    "its worker process died ({how}) while it ran this configuration alone",
                                    f"its row, once it runs: {store.row_path(h)}"), time.perf_counter() - start)
                report(cfg, h, *result)
    finally:
        _end_processes([proc for proc, *_ in started if proc.exitcode is None])


def _end_processes(processes) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        # A worker acts on SIGTERM between Python steps; one stuck in a long compiled kernel is killed.
        p.join(timeout=_WORKER_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


def _import_for_results(figures: bool) -> None:
    """Import what writing the results needs (pandas and pyarrow for the tables, matplotlib for the
    figures), about 0.6 s of one core, while this process only waits for the workers, instead of after
    the last configuration. Called once the workers are started: none is forked during an import."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    if figures:
        import plots.figures  # noqa: F401


def _resolved(spec: SweepSpec, grid: list[RunConfig], done: int) -> dict:
    """What resolved_config.yaml records: the spec, the grid, each hardware profile and trace in full."""
    hardware, traces = {}, {}
    for cfg in grid:
        overrides = cfg.hardware_overrides()
        label = cfg.hardware + "".join(f" {k}={v}" for k, v in overrides.items())
        if label not in hardware:
            hardware[label] = hardware_to_dict(hardware_for(cfg))
        if cfg.trace not in traces:
            trace = cached_trace(cfg.trace)
            meta = trace.meta
            traces[cfg.trace] = {
                "source": meta.source, "licence": meta.licence, "recorded_on": meta.recorded_on,
                "description": meta.description, "tokens": trace.num_tokens, "requests": trace.num_requests,
                "model": meta.model.to_dict(),
            }
        slices = traces[cfg.trace].setdefault("slices", {})
        train, run = trace_slices(cfg)
        slices[f"train_fraction={cfg.train_fraction} max_tokens={cfg.max_tokens}"] = {
            "train_tokens": train.num_tokens if train is not None else 0, "eval_tokens": run.num_tokens}
    return {"spec": spec.to_dict(), "grid_size": len(grid), "rows_done": done,
            "hardware": hardware, "traces": traces}


def _missing_perf_note(store: ResultStore, done: list[str], others_timed: bool) -> str | None:
    """One line naming the rows among ``done`` (their hashes) that have no perf record (deleted, or rows copied
    without OUT/perf/), which perf.csv leaves out and the speed summary does not count; None when every row has
    one. Such a row is kept, not recomputed as a damaged record's is: it is whole (ResultStore.done), its run may be
    long, and recomputing it would replace a row the user kept; the line says how to recompute it."""
    missing = [h for h in dict.fromkeys(done) if not store.perf_path(h).is_file()]
    if not missing:
        return None
    n = len(missing)
    names = ", ".join(f"{h}.json" for h in missing[:3]) + (f" and {n - 3} more" if n > 3 else "")
    them, their = ("it", "its") if n == 1 else ("them", "their")
    above = " (the speed above is the other rows')" if others_timed else ""
    return (f"note: {n} of {len(dict.fromkeys(done))} rows {'has' if n == 1 else 'have'} no perf record (missing in "
            f"{store.perf_dir}/: {names}): perf.csv leaves {them} out and {their} simulator speed is unknown{above}; "
            f"to measure it, delete the row{'s' * (n > 1)} of the same name{'s' * (n > 1)} in {store.rows_dir}/ and "
            f"run the same command again, which recomputes {them}")


FAILED_CELL = "failed"      # the table's cell for a configuration of the grid that failed (it has no row)
_FAILED = "_failed"         # table_frame's column: True on a failed configuration's stand-in row


def table_frame(df, grid: list[RunConfig], hashes: list[str], failed: set[str]):
    """What ``format_table`` shows: the rows of ``df`` (the done configurations) and, for each configuration of
    ``grid`` whose hash is in ``failed``, a stand-in of its configuration's columns marked ``_FAILED``; in grid order
    (policy as the grid first names it, then cache_slots), as results.csv orders its rows."""
    import pandas as pd

    rows = dict(zip(df["config_hash"], df.to_dict("records")))
    records = []
    for h, cfg in dict(zip(hashes, grid)).items():
        if h in rows:
            records.append({**rows[h], _FAILED: False})
        elif h in failed:
            # policy_params as a row holds it (JSON text, keys sorted: runner.run_config), so that the stand-in
            # joins its policy's row of the table.
            values = cfg.to_dict()
            records.append({**values, "policy_params": json.dumps(values["policy_params"], sort_keys=True),
                            "config_hash": h, _FAILED: True})
    frame = pd.DataFrame(records)
    rank = {p: i for i, p in enumerate(dict.fromkeys(frame["policy"]))}
    return (frame.assign(_rank=frame["policy"].map(rank)).sort_values(["_rank", "cache_slots"], kind="stable")
                 .drop(columns="_rank").reset_index(drop=True))


# What a slot count means in each cache mode: in global mode the number is still per layer, but the
# slots form one pool of cache_slots x layers that any layer's experts may take.
_SLOTS_MEANING = {"per_layer": "expert slots per MoE layer",
                  "global": "slots per layer, shared globally (one pool of slots x layers for all layers)"}


def format_table(df, varying: list[str]) -> str:
    """Rows: policy (and any other varying key); columns: cache_slots; cells: tok/s | hit rate | % of Belady,
    or FAILED_CELL for a configuration that failed (``table_frame``'s stand-in rows). The last lines say what
    the slot counts mean in the table's cache mode(s), and what a failed cell means where there is one."""
    # A row is a policy with the parameters given to it (the one policy_params column, JSON text), and
    # any other varying key.
    others = [k for k in varying if k in df.columns and k not in ("policy", "cache_slots", "policy_params")]
    row_keys = ["policy", "policy_params", *others]
    slots = sorted(df["cache_slots"].unique())
    labels, cells = [], []
    for values, group in df.groupby(row_keys, sort=False, dropna=False):
        # a lossy policy ran other experts than the routed ones: its hits are not a lossless policy's
        lossy = ["(lossy)"] if "replaced" in group.columns and group["replaced"].fillna(0).sum() > 0 else []
        labels.append(" ".join([policy_label(values[0], json.loads(values[1])), *lossy,
                                *(f"{k}={_value_text(v)}" for k, v in zip(row_keys[2:], values[2:]))]))
        by_slots = group.set_index("cache_slots")
        row = []
        for s in slots:
            if s not in by_slots.index:
                row.append("-")
                continue
            r = by_slots.loc[s]
            if r.get(_FAILED, False) == True:   # noqa: E712: a NaN there (a frame without the flag) is no failure
                row.append(FAILED_CELL)
                continue
            frac = r["belady_hit_fraction"]
            pct = "n/a" if frac is None or frac != frac else f"{100 * frac:.0f}%"
            row.append(f"{r['tokens_per_s']:.1f} | {r['hit_rate']:.3f} | {pct:>4}")
        cells.append(row)
    label_w = max(len("policy"), *map(len, labels))
    cell_w = max(len("tok/s | hit | %Belady"), *(len(c) for row in cells for c in row))
    header = f"{'policy':<{label_w}}  " + "  ".join(f"{f'slots={s}':>{cell_w}}" for s in slots)
    legend = f"{'':<{label_w}}  " + "  ".join(f"{'tok/s | hit | %Belady':>{cell_w}}" for _ in slots)
    lines = [header, legend, "-" * len(header)]
    lines += [f"{label:<{label_w}}  " + "  ".join(f"{c:>{cell_w}}" for c in row) for label, row in zip(labels, cells)]
    modes = list(dict.fromkeys(df["cache_mode"]))
    meanings = [_SLOTS_MEANING[m] + (f" (cache_mode={m})" if len(modes) > 1 else "") for m in modes]
    lines.append(f"slots = {'; '.join(meanings)}")
    if any(c == FAILED_CELL for row in cells for c in row):
        lines.append(f"{FAILED_CELL}: the configuration failed, so it has no row in results.csv or the figures; the "
                     f"failures are listed at the end, each with its report")
    if any("(lossy)" in label for label in labels):
        lines.append("(lossy): the policy ran other experts than the routed ones where it chose to (`replaced`), so "
                     "its hit rate and %Belady count hits of its own choices; its accuracy cost is measured by the "
                     "engine (experiments.engine_bench live, measure_policies: held-out perplexity, top-1 agreement)")
    return "\n".join(lines)


def _refusal(grid: list[RunConfig]) -> str | None:
    """What ``validate_grid`` refuses in ``grid``, as its message; None where it passes."""
    try:
        validate_grid(grid)
    except ValueError as err:
        return str(err)
    return None


def _check_grid(grid: list[RunConfig]) -> dict[RunConfig, int]:
    """``validate_grid`` (ValueError for bad input), which builds each policy once: a grid holding a policy of the
    user's is checked in a process of its own, so that a constructor that ends its process (os._exit) fails its
    configurations instead of ending the sweep with no word. Returns those configurations, each with the exit code
    (minus the signal) of the process that built its policy; the rest of the grid is checked as before."""
    if all(cfg.policy in BUILTIN for cfg in grid):
        validate_grid(grid)
        return {}
    refusal, exitcode = _in_own_process(_refusal, grid)
    ended: dict[RunConfig, int] = {}
    if exitcode is not None:
        # Every trace is sound (they are checked before any policy is built): loaded once here, not in each process.
        for trace in dict.fromkeys(cfg.trace for cfg in grid):
            cached_trace(trace)
        for cfg in dict.fromkeys(cfg for cfg in grid if cfg.policy not in BUILTIN):
            if (code := _in_own_process(_refusal, [cfg])[1]) is not None:
                ended[cfg] = code
        refusal, exitcode = _in_own_process(_refusal, [cfg for cfg in grid if cfg not in ended])
        if exitcode is not None:
            how, cause = _death_cause(exitcode)
            yours = ", ".join(dict.fromkeys(cfg.policy for cfg in grid if cfg.policy not in BUILTIN))
            raise ConfigError(f"building the grid's policies ended the process that built them ({how}), though no "
                              f"configuration's policy built alone did: {cause}; one of {yours} ends its process "
                              f"when built after another")
    if refusal is not None:
        raise ConfigError(refusal)
    return ended


def _check_labels(grid: list[RunConfig]) -> None:
    """ConfigError where two values of one policy parameter print as one (YAML's "1" and 1, "true" and true): the
    sweep labels a configuration by its values as text (``policy_label``: the console, the table, the figures), so
    their rows could not be told apart."""
    values: dict[str, dict[tuple[str, str], object]] = {}
    for cfg in grid:
        for name, value in cfg.policy_params:
            values.setdefault(name, {})[(type(value).__name__, repr(value))] = value
    for name, typed in values.items():
        by_text: dict[str, list] = {}
        for value in typed.values():
            by_text.setdefault(param_text(value), []).append(value)
        for text, same in by_text.items():
            if len(same) > 1:
                shown = " and ".join(f"{v!r} ({type(v).__name__})" for v in same)
                raise ConfigError(f"{POLICY_PARAM_PREFIX}{name}: the values {shown} are both labelled "
                                  f"{POLICY_PARAM_PREFIX}{name}={text} in the table, its figures and its lines, so "
                                  f"their rows could not be told apart; give one of them, or each in a sweep of "
                                  f"its own (--out apart)")


_POLICY_FILE = re.compile(r"^(.+\.py):([A-Za-z_]\w*)$")     # a policy given as FILE.py:Class (policies.registry)
_DEFAULT_TRACE = RunConfig().trace      # what a sweep given no trace= runs: traces.DEFAULT_TRACE, resolved


def _canonical_path(text: str) -> str:
    """``text``, a file's path, as the absolute path with no symbolic link or ``..`` in it (traces.DEFAULT_TRACE's
    form): one file, however spelt, gives one value. A path that names no file stays as given, for the error at its
    load to name it as the user wrote it."""
    return os.path.realpath(text) if os.path.isfile(text) else text


def _canonical_value(key: str, value):
    """``value`` of ``key`` with the file it names, if it names one, as its canonical path (``_canonical_path``): a
    trace; a hardware profile given as a path (a YAML name or one with a separator, as hardware.profile.load_hardware
    tells it from a profile's name, which stays; a shipped profile's file becomes its name); a policy's FILE.py of FILE.py:Class, made absolute only
    (module:Class and the registry's names stay)."""
    if not isinstance(value, str):
        return value
    if key == "trace":
        return _canonical_path(value)
    if key == "hardware" and not is_profile_name(value):
        canonical = _canonical_path(value)
        path = Path(canonical)
        # a shipped profile's file is that profile: keyed by its name, as hardware=<name> gives it
        shipped = path.parent == PROFILES_DIR.resolve() and path.suffix == ".yaml"
        return path.stem if shipped and path.is_file() else canonical
    if key == "policy" and value not in BUILTIN and (m := _POLICY_FILE.match(value)) and os.path.isfile(m.group(1)):
        # Absolute, its links kept: a policy file's own modules are found beside the path it is given by (a link's
        # folder), and its name is the module's.
        return f"{os.path.abspath(m.group(1))}:{m.group(2)}"
    return value


def canonical_spec(spec: SweepSpec) -> SweepSpec:
    """``spec`` with every file path in it canonical (``_canonical_value``): a row is keyed by its configuration's
    values, and so is the default OUT, so ``trace=t.npz``, ``trace=./t.npz`` and ``trace=$PWD/t.npz`` resume the
    same rows in the same folder, and results.csv names the file the same way whichever spelling computed it."""
    return SweepSpec.from_mapping({k: [_canonical_value(k, v) for v in values] for k, values in spec.axes})


def default_out(spec: SweepSpec) -> Path:
    """``runs/sweep-<hash of the spec>``, ``spec`` canonical: a trace axis that is the default trace alone is left
    out of the hash, so ``trace=<the committed sample>`` lands where a sweep given no trace= does."""
    hashed = SweepSpec(tuple((k, v) for k, v in spec.axes if (k, v) != ("trace", (_DEFAULT_TRACE,))))
    return Path("runs") / f"sweep-{hashed.short_hash()}"


def _plan(args) -> tuple[SweepSpec, list[RunConfig], list[dict[str, str]], list[str], dict[RunConfig, int]]:
    """The spec (its paths canonical: ``canonical_spec``), its grid, each configuration's row inputs and hash, the
    configurations whose policy's constructor ended its process (``_check_grid``); ValueError for bad input."""
    spec = canonical_spec(build_spec(args.overrides, args.config))
    grid = spec.grid()
    _check_labels(grid)
    ended = _check_grid(grid)
    # A row's inputs depend on its trace, hardware (with overrides) and policy only: digest each once.
    by_source: dict[tuple, dict[str, str]] = {}
    inputs = []
    for cfg in grid:
        source = (cfg.trace, cfg.hardware, tuple(sorted(cfg.hardware_overrides().items())), cfg.policy)
        if source not in by_source:
            by_source[source] = row_inputs(cfg)
        inputs.append(by_source[source])
    return spec, grid, inputs, [config_hash(cfg, i) for cfg, i in zip(grid, inputs)], ended


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = _parser().parse_intermixed_args(argv)
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    with _stop_on_signals():
        try:
            spec, grid, inputs, hashes, ended = _plan(args)
        except ValueError as err:   # ConfigError, TraceError and the registry's / profiles' errors
            # One line even where a message quotes a multi-line library error (a YAML parser's).
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            print(f"interrupted by {signal.Signals(stop.signum).name} before any configuration ran",
                  file=sys.stderr)
            return 128 + stop.signum
        out = args.out if args.out is not None else default_out(spec)
        store = ResultStore(out, ROW_COLUMNS, PERF_COLUMNS)
        # Every folder the sweep writes in, before anything runs: not a row computed, then lost at its write.
        for folder in (out, store.rows_dir, store.perf_dir, store.errors_dir, out / SHARED_TRACES):
            if (problem := output_problem(folder)) is not None:
                print(f"error: --out {out}: {problem}", file=sys.stderr)
                return 2
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(_holding_out(out))
            except OutInUse as busy:
                print(f"error: {out} is in use by another sweep ({busy.holder}); wait for it, or pass another --out",
                      file=sys.stderr)
                return 2
            except OSError as err:
                print(f"error: --out {out}: cannot lock {out / LOCK} ({err.strerror or err}); give a folder on a "
                      f"local file system you can write to", file=sys.stderr)
                return 2
            try:
                return _sweep(args, spec, grid, inputs, hashes, store, ended)
            except Interrupted as stop:
                done = sum(store.done(h) for h in dict.fromkeys(hashes))
                print(f"interrupted by {signal.Signals(stop.signum).name}: {done} of {len(dict.fromkeys(hashes))} "
                      f"configurations are done in {out}/; to resume, run the same command again: "
                      f"python -m experiments.sweep {shlex.join(argv)}", file=sys.stderr)
                return 128 + stop.signum


# The figures a sweep writes into its folder (the tables are rewritten by every call).
_FIGURES = ("tokens_vs_slots.png", "hit_rate_vs_belady.png", "timeline.json", "timeline.png")


def _sweep(args, spec: SweepSpec, grid: list[RunConfig], inputs: list[dict[str, str]], hashes: list[str],
           store: ResultStore, ended: dict[RunConfig, int]) -> int:
    out = store.out
    varying = spec.varying()
    for note in compute_notes(grid):
        print(f"note: {note}")
    # A damaged file is left where it is until its configuration's run replaces it: never removed unsaid.
    for h, cfg in dict(zip(hashes, grid)).items():
        if (damaged := store.damaged(h)) is not None:
            print(f"damaged: {damaged[0]}: {damaged[1]}; recomputing its configuration ({describe(cfg, varying)}), "
                  f"whose run rewrites the file")
    for path, problem in store.foreign(hashes):
        print(f"damaged: {path}: {problem}; it is no configuration's row: ignored, left in place")
    pending = [(cfg, h) for cfg, h in zip(grid, hashes) if not store.done(h)]
    unique = len(dict.fromkeys(hashes))
    already = unique - len(dict.fromkeys(h for _, h in pending))
    if already:
        print(f"resumed: {already} of {unique} already done")
    stale, reasons = store.stale([(cfg, i) for cfg, i, h in zip(grid, inputs, hashes) if not store.done(h)])
    if stale:
        why = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
        print(f"stale: {stale} of {unique} configurations have rows computed from other inputs; "
              f"recomputing them ({why})")
    # A configuration whose policy's constructor ended its process when it was checked fails without running.
    failures = []
    for cfg, h in dict.fromkeys((cfg, h) for cfg, h in pending if cfg in ended):
        what = f"config ({describe(cfg, varying)})"
        line = f"{what} failed: " + _died(store, cfg, what, ended[cfg], "the process that built its policy before "
                                          "the runs died ({how})", f"its row, once it runs: {store.row_path(h)}")
        print(f"error: {line}", file=sys.stderr)
        failures.append((h, line))
    pending = [(cfg, h) for cfg, h in pending if cfg not in ended]
    failures += _run_all(pending, out, args.workers, varying, plots=not args.no_plots)

    done = sum(store.done(h) for h in dict.fromkeys(hashes))
    df = store.collect(hashes, ROW_COLUMNS, _resolved(spec, grid, done), PERF_COLUMNS)
    tables = "results.csv, results.parquet, perf.csv" + ("" if len(df) else " (headers only: no configuration finished)")
    written = [tables, "resolved_config.yaml"]
    drawn: dict[str, dict[str, str]] = {}
    if len(df) and not args.no_plots:
        from plots.figures import plot_hit_rate_vs_belady, plot_tokens_vs_slots
        plot_tokens_vs_slots(df, out / "tokens_vs_slots.png")
        plot_hit_rate_vs_belady(df, out / "hit_rate_vs_belady.png")
        drawn.update(dict.fromkeys(["tokens_vs_slots.png", "hit_rate_vs_belady.png"], table_source(out)))
    timeline_failure = None
    if args.timeline:
        timeline_files, timeline_row, timeline_failure = _write_timeline(grid, hashes, store, varying)
        drawn.update(dict.fromkeys(timeline_files, row_source(timeline_row)))
    written += drawn

    # An earlier call's figure that this one did not draw (--no-plots, no --timeline, no row) is kept while it
    # shows this call's results, else removed: it would show other results beside this call's tables.
    figures = settle(out, drawn, list(_FIGURES), set(df["config_hash"]) if len(df) else set())
    if len(df):
        # The table shows the whole grid: a configuration that failed keeps its cell, marked, instead of leaving a
        # hole (or a whole slots column) that reads as never asked for.
        print(format_table(table_frame(df, grid, hashes, {h for h, _ in failures}), varying))
    if figures.damaged is not None:
        named = " (each removed is named below)" if figures.removed else ""
        print(f"damaged: {out / RECORD}: {figures.damaged}; it vouches for no earlier figure{named}, and this call's "
              f"record replaces it")
    for name, why in figures.removed:
        redraw = ("with --timeline" if name.startswith("timeline") else "without --no-plots" if args.no_plots else None)
        print(f"removed {name}, an earlier call's: {why}"
              + (f" (to draw it for this table: the same command {redraw})" if redraw and len(df) else ""))
    kept = f" (kept from an earlier call, still this table's: {', '.join(figures.kept)})" if figures.kept else ""
    print(f"{len(df)} of {unique} configurations in {out}/: {', '.join(written)}{kept}")
    perf = store.read_perf(hashes)
    if len(perf):
        speed = statistics.median(perf["sim_layer_steps_per_wall_s"])
        over = f"median over {len(perf)} configurations" if len(perf) > 1 else "one configuration"
        print(f"simulator speed: {speed:,.0f} simulated layer-steps per wall second of the runs themselves ({over}; "
              f"counted: each run from its policy's construction to its metrics, not the processes' start-up, the "
              f"traces' loading, the Belady bound or the row's writing)")
    if len(df) and (note := _missing_perf_note(store, list(df["config_hash"]), bool(len(perf)))) is not None:
        print(note)
    if failures:
        # Each failure was said once as it happened (progress, for a long sweep); this is the list to act on, at the
        # end where it is read, each once: the header says so, lest the two mentions read as twice the failures.
        print(f"error: {len(failures)} of {unique} configurations failed (each was named above as it failed; "
              f"listed once each here):", file=sys.stderr)
        for _, line in failures:
            print(f"  {line}", file=sys.stderr)
    if timeline_failure is not None:
        print(f"error: {timeline_failure}", file=sys.stderr)
    return 1 if failures or timeline_failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
