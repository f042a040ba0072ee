"""The measurement discipline every engine figure uses (issue 11: identical runs must agree within 2 %).

A figure is the median over at least five runs of its configuration. The runs are interleaved
round-robin across the configurations compared, the order rotated each round, so that a slow phase of
the machine falls on every configuration alike; an untimed warm-up comes first, pass after pass until
two consecutive passes' median step times agree. Each configuration's spread, (max - min) / median of
its runs, is the noise floor a difference between configurations is read against.

Each run also records whether it was steady (its halves compared like with like: step by step with its
configuration's other runs, or its requests' halves position by position; ``compare_halves``), and what
could have disturbed it, so that an outlier comes with its likely cause:

- the GPU's SM and memory clocks, read (never set) through NVML by a separate process every ~15 ms, so
  that sampling takes no turn at the decode thread's interpreter lock;
- the host's speed: a fixed pure-Python workload timed right before and right after the run (reported
  beside the run, never used to scale it), the hypervisor's steal time, the decode thread's involuntary
  context switches and CPU migrations;
- the garbage collections during the run (``gc.callbacks``);
- the CPU affinity of the decode thread and of the process's other threads.

Off a GPU, or without pynvml, the clocks are recorded as missing. This module does not import torch:
the clock sampler runs it as a process of its own (``python -m real.measurement --clocks FILE``).

Units: times in ms unless a name says otherwise (``_s``, ``_ns``), clocks in MHz, spreads and drifts
in % where the name ends in ``_pct``.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from offload.metrics import tpot_summary
from policies.registry import RUN_FAILURES

# The host calibration workload: a fixed count of interpreter-bound additions, about 2 ms on a current
# server core. Fixed, never adapted to the machine, so that its time compares across runs and sessions.
CALIBRATION_ITERATIONS = 80_000
# NVML's "GPU idle" clock-event bit: set whenever no kernel runs, which is routine between a decode
# step's kernels; the other bits (power cap, thermal, ...) are what can hold a clock below its maximum.
_NVML_IDLE_BIT = 0x1
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Discipline:
    """How a session measures. ``warmup``/``rotate`` off and ``repeats`` runs back to back is how the
    engine was measured before issue 11 (the 'before' of its A/B)."""
    repeats: int = 5
    warmup: bool = True
    rotate: bool = True
    warmup_tolerance_pct: float = 1.0    # consecutive warm-up passes' median step times agree this well
    warmup_max_passes: int = 5
    # a run is steady ('long enough') when its halves agree this well, like compared with like
    # (``halves_drift_pct``, ``halves_against_runs_pct``; why 2 %: the note above ``halves_drift_pct``)
    halves_tolerance_pct: float = 2.0
    outlier_pct: float = 2.0             # a run this far from its configuration's median is an outlier
    host_slow_pct: float = 20.0          # calibration this much slower than the session's fastest: host_slow
    clock_low_fraction: float = 0.97     # median SM clock below this fraction of the maximum: clock_low
    gc_fraction: float = 0.01            # collections took this share of the timed steps (or a full one ran): gc
    steal_fraction: float = 0.01         # steal time (all CPUs) this share of the run's wall time: steal
    calibration_samples: int = 5


@dataclass(frozen=True)
class Config:
    """One configuration compared. ``fields`` are its columns in every table (policy, cache size, ...);
    ``decode_core``: the core the decode thread has to itself (the process's other threads get the
    other cores); None: every thread may run on every allowed core."""
    fields: Mapping[str, object]
    decode_core: int | None = None

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.fields.items()]
        return " ".join(parts + ([f"decode_core={self.decode_core}"] if self.decode_core is not None else []))


@dataclass
class RunOutput:
    """What a run function returns: the wall time of every timed step (ms), columns of its own for the
    run's row (hit rate, host time per layer, ...), and when its timed steps began
    (``time.monotonic_ns``; None: with the run): garbage collections before then (building the engine,
    the engine's own collection before it decodes) are not counted as the run's; and where its requests
    begin among those steps (``request_starts``), so that its halves compare steps at the same position
    in their requests (``halves_drift_pct``)."""
    step_ms: Sequence[float]
    columns: dict = field(default_factory=dict)
    timed_from_ns: int | None = None
    # where each request's timed steps begin in ``step_ms`` (0 first; a trailing len(step_ms), the engine's
    # ``routing.request_starts`` convention, is allowed); None: not known, the run is taken as one request
    request_starts: Sequence[int] | None = None


RunFunction = Callable[[Config, bool], RunOutput]   # (config, warm-up pass?) -> RunOutput; may raise


# -- the figures -----------------------------------------------------------------------------------------
def spread_pct(values: Iterable[float]) -> float:
    """(max - min) / median of ``values`` (NaN ones left out), in %: the noise floor; NaN below two values
    (one run has no spread, and reporting 0 % would claim a perfectly steady configuration)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    return float(100.0 * (v.max() - v.min()) / np.median(v))


# Why the halves must agree within 2 %. The halves check says whether a run measured one steady machine: a
# run whose machine changed speed midway (the host's slow episodes of issue 11 come and go within seconds)
# is not one measurement, whatever its figure. Its tolerance cannot be learnt from runs that are steady by
# construction (the CPU smoke runs measure CI's machine, not the engine's), so it comes from what the figure
# is read against: identical runs are meant to agree within 2 % (issue 11; ``Discipline.outlier_pct``). A
# run whose second half ran x % slower than its first half (compared like with like) had its mean moved by
# about x / 2 % against a steady run; below 2 % that is at most 1 %, inside the band in which runs count as
# identical. Above it the machine changed speed within the run by more than identical runs may differ, and
# the run is flagged (cause ``halves``). The figure must compare like with like for this to mean anything:
# a step's time depends on its place in its request (attention grows with the context, a request's first
# steps find a cold cache) and on what it routes to (its hits and misses), and neither is noise. So a run is
# compared step by step with its configuration's other runs, which decode the same steps
# (``halves_against_runs_pct``), once there are two of them; until then, its own requests' halves are
# compared position by position (``halves_drift_pct``), which removes the position's share but not the
# routing's (on the H200's 144-step runs the time halves drifted 4-15 %, the position-matched ones still up
# to ~19 % on replays whose requests hit differently, while the same configuration's repeats drifted alike).


def _request_spans(n: int, request_starts: Sequence[int] | None) -> list[tuple[int, int]]:
    """(start, end) of each request among ``n`` steps; one span when the starts are not known."""
    bounds = sorted({0, n} | {int(b) for b in (request_starts or ()) if 0 <= int(b) <= n})
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def halves_drift_pct(step_ms: Sequence[float], request_starts: Sequence[int] | None = None) -> float:
    """How far a run's second half is from its first, in %: a steady run's halves agree.

    Several requests (``request_starts``, as ``RunOutput`` takes them): the first half of the requests
    against the second (the middle one left out of an odd count), step by step at the same position in
    the request (position p: the median over each half's requests of their p-th step; the positions
    only some requests reach compare those): |median over positions of (second / first) - 1|. Attention
    grows with the context and a request's first steps differ, so the time halves of a run of several
    requests would compare unlike steps. One request (or unknown starts): the median step of the run's
    second half against its first half's, in % of the whole run's median step. NaN below two steps."""
    return _halves_within(step_ms, request_starts)[0]


def _halves_within(step_ms: Sequence[float], request_starts: Sequence[int] | None) -> tuple[float, str]:
    """``halves_drift_pct`` and its basis: ``requests`` (two requests or more) or ``time``."""
    s = np.asarray(step_ms, dtype=np.float64)
    spans = _request_spans(len(s), request_starts)
    basis = "requests" if len(spans) >= 2 else "time"
    if len(s) < 2:
        return float("nan"), basis
    if len(spans) >= 2:
        k = len(spans) // 2
        first, second = spans[:k], spans[len(spans) - k:]
        ratios = []
        for p in range(max(b - a for a, b in spans)):
            early = [s[a + p] for a, b in first if a + p < b]
            late = [s[a + p] for a, b in second if a + p < b]
            if early and late:
                ratios.append(np.median(late) / np.median(early))
        return float(100.0 * abs(np.median(ratios) - 1.0)), basis
    half = len(s) // 2
    return float(100.0 * abs(np.median(s[half:]) - np.median(s[:half])) / np.median(s)), basis


def halves_against_runs_pct(step_ms: Sequence[float], others: Sequence[Sequence[float]]) -> float:
    """A run's halves drift against runs that decoded the same steps (its configuration's other runs):
    each step's time over the median of theirs at the same step, then the median of that ratio over the
    run's second half against its first half's, |second / first - 1| in %. Whatever makes one step slower
    than another (its position, its misses) is the same in every run and cancels; a change of the
    machine's speed within this run does not. With one other run the two runs' drifts mirror each other
    (either may be the one that moved); the median of several others is the steady reference. NaN below
    two steps, without others, or when the others decoded another number of steps."""
    s = np.asarray(step_ms, dtype=np.float64)
    ref = [np.asarray(o, dtype=np.float64) for o in others]
    if len(s) < 2 or not ref or any(len(o) != len(s) for o in ref):
        return float("nan")
    ratio = s / np.median(np.stack(ref), axis=0)
    half = len(s) // 2
    return float(100.0 * abs(np.median(ratio[half:]) / np.median(ratio[:half]) - 1.0))


def step_figures(step_ms: Sequence[float]) -> dict:
    """The timed steps' total (s) and tokens/s by the one formula (``offload.metrics``), the median
    step's tokens/s, and percentiles of the step time (ms)."""
    s = np.asarray(step_ms, dtype=np.float64)
    nan = float("nan")
    p10, p50, p90, p99 = np.percentile(s, [10, 50, 90, 99]) if len(s) else (nan,) * 4
    timing = tpot_summary(np.rint(s * 1e6).astype(np.int64)) if len(s) else {"decode_s": nan, "tokens_per_s": nan}
    return {"steps": len(s), "decode_s": timing["decode_s"], "tokens_per_s": timing["tokens_per_s"],
            "tokens_per_s_median_step": 1e3 / p50, "step_ms_p10": p10, "step_ms_p50": p50,
            "step_ms_p90": p90, "step_ms_p99": p99, "step_ms_max": s.max() if len(s) else nan}


# -- the host ----------------------------------------------------------------------------------------
def _calibration_workload() -> int:
    acc = 0
    for i in range(CALIBRATION_ITERATIONS):
        acc += i
    return acc


def calibration_ms(samples: int = 5) -> float:
    """Median wall time (ms) of the fixed calibration workload over ``samples`` runs, on the calling
    thread (so, with a decode core, on that core)."""
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        _calibration_workload()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return float(np.median(times))


def steal_ms() -> float | None:
    """CPU time the hypervisor has given to others since boot, summed over this machine's CPUs (ms;
    /proc/stat's steal column). None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")


def thread_counters(tid: int) -> tuple[int | None, int | None]:
    """(involuntary context switches, CPU migrations) of thread ``tid`` of this process so far; None where
    the kernel does not say."""
    switches = migrations = None
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    switches = int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/self/task/{tid}/sched") as f:      # needs CONFIG_SCHED_DEBUG
            for line in f:
                if line.startswith("se.nr_migrations"):
                    migrations = int(line.split(":")[1])
    except OSError:
        pass
    return switches, migrations


def _cpus(cpus: Iterable[int]) -> str:
    """A CPU set as ranges: {0, 1, 2, 5} -> '0-2,5'."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def place_threads(decode_core: int | None, allowed: set[int], other_pids: Iterable[int] = ()) -> dict:
    """Give the calling (decode) thread ``decode_core`` alone and every other thread of this process, and
    the processes ``other_pids``, the rest of ``allowed``; None: everything on every allowed core.
    (Pinning the whole process to one core instead makes the engine's other threads share it.) Threads
    start with their creator's set, so call this before every run, once they exist. Returns the
    placement: decode_cpus, other_cpus (their union), threads."""
    if not hasattr(os, "sched_setaffinity"):
        return {"decode_cpus": None, "other_cpus": None, "threads": threading.active_count()}
    me = threading.get_native_id()
    rest = allowed - {decode_core} if decode_core is not None else allowed
    os.sched_setaffinity(me, {decode_core} if decode_core is not None else allowed)
    others = [int(t) for t in os.listdir("/proc/self/task") if int(t) != me] + list(other_pids)
    placed = set()
    for tid in others:
        try:
            os.sched_setaffinity(tid, rest)
            placed |= os.sched_getaffinity(tid)
        except ProcessLookupError:      # it ended since the listing
            pass
    return {"decode_cpus": _cpus(os.sched_getaffinity(me)), "other_cpus": _cpus(placed),
            "threads": len(os.listdir("/proc/self/task"))}


class GcWatch:
    """The garbage collections since ``reset``: when each ended (``time.monotonic_ns``), its generation
    and its time (ms). A ``gc.callbacks`` entry while installed (``with GcWatch() as watch:``)."""

    def __init__(self):
        self.events: list[tuple[int, int, float]] = []
        self._start = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.events.append((time.monotonic_ns(), info["generation"], (time.perf_counter_ns() - self._start) / 1e6))

    def reset(self) -> None:
        self.events = []

    def since(self, start_ns: int) -> tuple[list[int], float]:
        """Collections per generation, and their total ms, of those that ended after ``start_ns``."""
        counts, ms = [0, 0, 0], 0.0
        for end, generation, took in self.events:
            if end > start_ns:
                counts[generation] += 1
                ms += took
        return counts, ms

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self)
        self._handlers = _signals_outside(GcWatch.__call__.__code__)
        self._handlers.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.__exit__(*exc)
        gc.callbacks.remove(self)


@contextlib.contextmanager
def _signals_outside(code):
    """SIGINT and SIGTERM, while the block runs, are handled by their previous handlers, except when they land in
    a frame running ``code`` (a gc callback: Python discards what one raises, so a Ctrl-C there was lost and the
    command ran on): then they are delivered again 10 ms later, from another thread. Only the main thread can
    install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if frame is not None and frame.f_code is code:
            again = threading.Timer(0.01, _thread.interrupt_main, args=(signum,))
            again.daemon = True
            again.start()
            return
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:          # the default action: end (SIGTERM), or KeyboardInterrupt (SIGINT)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


# -- the GPU's clocks --------------------------------------------------------------------------------------
class ClockSampler:
    """The GPU's SM and memory clocks (MHz) and clock-event reasons, sampled every ``period_s`` by a child
    process into a file that is read between runs: the decode process does no sampling work while it
    runs. ``info``: the device and its maximum clocks, or {"ok": False, "reason": ...} when NVML is not
    there (then every window is empty). A context manager; the child also ends when its parent does."""

    def __init__(self, path: Path, period_s: float = 0.015, index: int = 0, start_timeout_s: float = 30.0):
        self.path = Path(path)
        self._err = self.path.with_suffix(".err")
        with open(self._err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "real.measurement", "--clocks", str(self.path),
                                          "--period", str(period_s), "--index", str(index)],
                                         stdout=subprocess.DEVNULL, stderr=err, cwd=_REPO)
        self._t, self._sm, self._mem, self._reasons = [], [], [], []
        self._offset = 0
        self.info = self._header(start_timeout_s)
        self.pid = self.proc.pid if self.info.get("ok") else None     # a process to keep off the decode core

    def _header(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.path.exists():
                with open(self.path) as f:
                    line = f.readline()
                if line.endswith("\n"):
                    self._offset = len(line.encode())
                    return json.loads(line)
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.close()
        reason = self._err.read_text().strip().splitlines()[-1:] if self._err.exists() else []
        return {"ok": False, "reason": reason[0] if reason else f"no clock sampler within {timeout_s} s"}

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1            # a line still being written waits for the next read
        self._offset += end
        for line in data[:end].decode().splitlines():
            t, sm, mem, reasons = line.split()
            self._t.append(int(t))
            self._sm.append(int(sm))
            self._mem.append(int(mem))
            self._reasons.append(int(reasons))

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every sample so far: (time.monotonic_ns, SM MHz, memory MHz, clock-event reason bits)."""
        self._read()
        return (np.asarray(self._t, np.int64), np.asarray(self._sm, np.float64),
                np.asarray(self._mem, np.float64), np.asarray(self._reasons, np.int64))

    def window(self, start_ns: int, end_ns: int) -> dict:
        """The clocks between two ``time.monotonic_ns`` readings: min/median/max (MHz), sample count and
        the clock-event reasons seen (bits, the idle bit left out); NaN clocks without samples."""
        t, sm, mem, reasons = self.samples()
        inside = (t >= start_ns) & (t <= end_ns)
        out = {"clock_samples": int(inside.sum())}
        for name, values in (("sm", sm[inside]), ("mem", mem[inside])):
            stats = (values.min(), np.median(values), values.max()) if len(values) else (float("nan"),) * 3
            out.update({f"{name}_mhz_min": stats[0], f"{name}_mhz_median": stats[1], f"{name}_mhz_max": stats[2]})
        bits = int(np.bitwise_or.reduce(reasons[inside])) & ~_NVML_IDLE_BIT if inside.any() else 0
        out["clock_event_reasons"] = hex(bits)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ClockSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sample_clocks(path: str, period_s: float, index: int) -> None:
    """The sampler process: a JSON header line, then 't_ns sm_mhz mem_mhz reason_bits' lines until the
    parent is gone. Read-only NVML calls: no clock or any other card setting is changed."""
    parent = os.getppid()
    with open(path, "w", buffering=1) as f:
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            info = {"ok": True, "index": index, "name": name.decode() if isinstance(name, bytes) else name,
                    "sm_mhz_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                    "mem_mhz_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                    "period_s": period_s}
            # nvidia-ml-py renamed the throttle reasons to clock-event reasons (same bits)
            event_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
                or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        except Exception as err:        # no pynvml, no driver, no device: the clocks are missing, not an error
            f.write(json.dumps({"ok": False, "reason": f"{type(err).__name__}: {err}"}) + "\n")
            return
        f.write(json.dumps(info) + "\n")
        due = time.monotonic()
        while os.getppid() == parent:
            try:
                sm = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
                mem = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
                f.write(f"{time.monotonic_ns()} {sm} {mem} {event_reasons(handle)}\n")
            except pynvml.NVMLError:    # one failed reading is a missing sample
                pass
            due += period_s
            time.sleep(max(0.0, due - time.monotonic()))


# -- a session -------------------------------------------------------------------------------------------
@dataclass
class Report:
    """A session's measurements so far.

    ``rows``: one per run, in the order run: the configuration (``config``, its label; its fields;
    ``decode_core``), ``round``, ``position`` in its round, ``cold`` (no warm-up, first run of its
    configuration), ``error`` (what it raised, or None), ``wall_s`` (the whole run, engine construction
    included, s), ``steps``, ``decode_s`` (their total, s), ``tokens_per_s`` (1e3 / mean step ms: the engine's figure),
    ``tokens_per_s_median_step``, ``step_ms_p10``..``_p99``, ``step_ms_max``, ``halves_drift_pct`` (on
    ``halves_basis``: ``runs``, ``requests`` or ``time``; ``compare_halves``), ``halves_drift_within_pct`` (the
    run against itself), ``long_enough`` (its halves agree), the run function's own columns, ``host_cal_before_ms`` / ``host_cal_after_ms`` (the
    calibration workload, median), ``gc_gen0``..``gc_gen2`` (collections during the timed steps) and ``gc_ms``, ``steal_ms`` (all
    CPUs), ``decode_switches`` (involuntary) and ``decode_migrations`` of the decode thread,
    ``decode_cpus``, ``other_cpus``, ``threads``, ``sm_mhz_min``/``_median``/``_max``, the same for
    ``mem_mhz``, ``clock_samples``, ``clock_event_reasons``; and, from ``flag_runs``, ``causes``,
    ``deviation_pct``, ``outlier``.
    ``warmups``: per configuration label, its passes, their median step times (ms), ``steady``, ``error``,
    ``wall_s``. ``configs``: per label, the configuration's columns. ``info``: the session's facts."""
    rows: list[dict] = field(default_factory=list)
    warmups: dict[str, dict] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def floor(self) -> list[dict]:
        return floor_table(self)


def print_error(config: Config, err: BaseException) -> str:
    """The default ``on_error`` of ``Measurement`` and of ``real.calibration.calibrate_policies``: the
    traceback on stderr, the error as one line."""
    traceback.print_exception(err)
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class Measurement:
    """Measures ``configs`` with ``run`` under ``discipline``. ``run_all`` must be called from the decode
    thread (the one that runs the engine). ``on_progress(report)`` is called after every run (and after the
    warm-up), so a caller can write what was measured before anything else can fail. ``deadline_s`` (seconds
    after ``started``, ``time.monotonic``; default: when ``run_all`` starts) is checked before every
    configuration's warm-up (none starts that would end past it at the pace of the warm-up before it; the
    configurations not warmed up are not measured at all), before the first round (none starts once it has
    passed) and before every later round (none starts that would end past it at the last round's pace); a
    warm-up or round under way is finished. ``report.info["stopped"]`` and one printed line say where it
    stopped and what was not measured. ``clocks``: a ClockSampler (default: started and
    stopped by ``run_all``); ``calibrate``: the host calibration (ms) (replaceable in tests); ``on_error(config,
    err)``: what a run (or warm-up pass) that raised ``err`` records as its error, one line (default: the
    traceback printed, then the exception's type and message); ``runs_wanted``: per configuration label, how many
    rounds it takes part in, when fewer than the discipline's repeats (a resumed measurement)."""

    def __init__(self, run: RunFunction, configs: Sequence[Config], discipline: Discipline = Discipline(),
                 on_progress: Callable[[Report], None] | None = None, deadline_s: float | None = None,
                 started: float | None = None, clocks: ClockSampler | None = None,
                 calibrate: Callable[[int], float] = calibration_ms,
                 on_error: Callable[[Config, BaseException], str] | None = None,
                 runs_wanted: Mapping[str, int] | None = None):
        labels = [c.label for c in configs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"configurations must differ: {labels}")
        self.allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count()))
        for c in configs:
            if c.decode_core is not None and (c.decode_core not in self.allowed or len(self.allowed) < 2
                                              or not hasattr(os, "sched_setaffinity")):
                raise ValueError(f"decode core {c.decode_core}: not one of this process's CPUs "
                                 f"({_cpus(self.allowed)}) with another left for the other threads")
        self.run, self.configs, self.discipline = run, list(configs), discipline
        self.on_progress = on_progress or (lambda report: None)
        self.deadline_s, self.started = deadline_s, started
        self.clocks, self.calibrate = clocks, calibrate
        self.on_error = on_error or print_error
        # per configuration label, the rounds it takes part in (fewer than ``discipline.repeats``: a resumed
        # measurement that already holds some of its runs); absent: every round
        self.runs_wanted = dict(runs_wanted or {})
        self.report = Report(configs={c.label: {**c.fields, "decode_core": c.decode_core} for c in configs})
        self.steps: list[np.ndarray | None] = []     # each row's timed step times (None: it failed)

    def run_all(self) -> Report:
        started = time.monotonic() if self.started is None else self.started
        with tempfile.TemporaryDirectory(prefix="clocks-") as tmp:
            own = self.clocks is None
            clocks = ClockSampler(Path(tmp) / "clocks.txt") if own else self.clocks
            try:
                with GcWatch() as watch:
                    return self._session(clocks, watch, started)
            finally:
                if own:
                    clocks.close()

    def _session(self, clocks: ClockSampler, watch: GcWatch, started: float) -> Report:
        d, report = self.discipline, self.report
        report.info.update(discipline=asdict(d), allowed_cpus=_cpus(self.allowed), clocks=clocks.info,
                           python=sys.version.split()[0], calibration_iterations=CALIBRATION_ITERATIONS)
        others = [clocks.pid] if clocks.pid else []
        configs = self.configs
        if d.warmup:
            warmup_s = 0.0          # the last warm-up's wall time: the next one's estimate
            for i, config in enumerate(self.configs):
                elapsed = time.monotonic() - started
                if self._past_deadline(elapsed + warmup_s):
                    configs = self.configs[:i]
                    self._stop(f"before the warm-up of {config.label}: it would end at ~{elapsed + warmup_s:.0f} s, past "
                               f"the deadline of {self.deadline_s:.0f} s; not measured: "
                               f"{', '.join(c.label for c in self.configs[i:])}")
                    break
                place_threads(config.decode_core, self.allowed, others)
                report.warmups[config.label] = self._warm_up(config)
                warmup_s = report.warmups[config.label]["wall_s"]
                self.on_progress(report)
        seen: set[str] = set()
        round_s = 0.0
        for r in range(d.repeats if configs else 0):
            elapsed = time.monotonic() - started
            if self._past_deadline(elapsed + round_s):
                self._stop(f"after {r} of {d.repeats} rounds: " + (
                    f"another would end at ~{elapsed + round_s:.0f} s" if r else f"{elapsed:.0f} s had passed") +
                    f", past the deadline of {self.deadline_s:.0f} s")
                break
            begun = time.monotonic()
            shift = r % len(configs) if d.rotate else 0
            rotated = configs[shift:] + configs[:shift]
            for position, config in enumerate(c for c in rotated if r < self.runs_wanted.get(c.label, d.repeats)):
                cold = not d.warmup and config.label not in seen
                seen.add(config.label)
                row, steps = self._one(config, r, position, cold, clocks, watch, others)
                report.rows.append(row)
                self.steps.append(steps)
                compare_halves(report.rows, self.steps, d, config.label)
                flag_runs(report.rows, d, clocks.info.get("sm_mhz_max"))
                self.on_progress(report)
            round_s = time.monotonic() - begun
        return report

    def _past_deadline(self, end_s: float) -> bool:
        return self.deadline_s is not None and end_s > self.deadline_s

    def _stop(self, why: str) -> None:
        before = self.report.info.get("stopped")
        self.report.info["stopped"] = f"{before}; then {why}" if before else why
        print(f"measurement: stopped {why}", flush=True)

    def _warm_up(self, config: Config) -> dict:
        """Untimed passes until two consecutive ones' median step times agree within the tolerance (at
        most ``warmup_max_passes``)."""
        d = self.discipline
        medians: list[float] = []
        steady, error = False, None
        start = time.monotonic()
        try:
            while not steady and len(medians) < d.warmup_max_passes:
                medians.append(float(np.median(self.run(config, True).step_ms)))
                steady = len(medians) > 1 and 100 * abs(medians[-1] - medians[-2]) / medians[-2] < d.warmup_tolerance_pct
        except RUN_FAILURES as err:     # the measured runs still go ahead, and say whether they fail too
            error = self.on_error(config, err)
        return {"passes": len(medians), "median_step_ms": medians, "steady": steady, "error": error,
                "wall_s": time.monotonic() - start}

    def _one(self, config: Config, r: int, position: int, cold: bool, clocks: ClockSampler, watch: GcWatch,
             others: list[int]) -> dict:
        d = self.discipline
        placement = place_threads(config.decode_core, self.allowed, others)
        before = self.calibrate(d.calibration_samples)
        tid = threading.get_native_id()
        switches0, migrations0 = thread_counters(tid)
        steal0 = steal_ms()
        watch.reset()
        start_ns = time.monotonic_ns()
        error, output = None, RunOutput(step_ms=[])
        try:
            output = self.run(config, False)
        except RUN_FAILURES as err:     # the other runs go on; this row says what happened
            error = self.on_error(config, err)
        end_ns = time.monotonic_ns()
        collections, gc_ms = watch.since(output.timed_from_ns or start_ns)
        steal1 = steal_ms()
        switches1, migrations1 = thread_counters(tid)
        after = self.calibrate(d.calibration_samples)
        row = {"config": config.label, **config.fields, "decode_core": config.decode_core, "round": r,
               "position": position, "cold": cold, "error": error, "wall_s": (end_ns - start_ns) / 1e9}
        row.update(step_figures(output.step_ms))
        within, basis = _halves_within(output.step_ms, output.request_starts)
        row.update(halves_drift_pct=within, halves_drift_within_pct=within, halves_basis=basis,
                   long_enough=bool(within < d.halves_tolerance_pct))       # compare_halves may revise these
        row.update(output.columns)
        row.update(host_cal_before_ms=before, host_cal_after_ms=after, gc_gen0=collections[0],
                   gc_gen1=collections[1], gc_gen2=collections[2], gc_ms=gc_ms,
                   steal_ms=None if steal0 is None else steal1 - steal0,
                   decode_switches=None if switches0 is None else switches1 - switches0,
                   decode_migrations=None if migrations0 is None else migrations1 - migrations0, **placement)
        row.update(clocks.window(start_ns, end_ns))
        print(f"  {config.label} round {r}: " + (f"error {error}" if error else
              f"{row['tokens_per_s']:.2f} tok/s, halves {within:.2f} % ({row['halves_basis']}), "
              f"host {before:.2f}/{after:.2f} ms, SM {row['sm_mhz_median']:.0f} MHz, gc {collections} {gc_ms:.1f} ms"),
              flush=True)
        return row, (None if error else np.asarray(output.step_ms, dtype=np.float64))


def compare_halves(rows: list[dict], steps: Sequence[np.ndarray | None], discipline: Discipline,
                   label: str) -> None:
    """Set the ``halves_drift_pct``, ``halves_basis`` and ``long_enough`` (its halves agree within
    ``halves_tolerance_pct``; why 2 %: the note above ``halves_drift_pct``) of each successful row of the
    configuration ``label``. ``steps[i]``: the timed step times of ``rows[i]`` (None for a failed run). A
    run with at least two other runs of its configuration that timed as many steps is compared with them
    step by step (``halves_against_runs_pct``, basis ``runs``); otherwise it keeps what the run set, its
    comparison with itself (``halves_drift_within_pct``: ``requests``, its requests' halves matched by
    position; ``time``, its time halves, for one request); a row's others only grow, so a ``runs`` basis
    stays. Session-relative, like the outliers: recomputed after each run over its configuration's rows,
    the only ones a new run can change."""
    mine = [i for i, row in enumerate(rows) if row["config"] == label and steps[i] is not None]
    for i in mine:
        others = [steps[j] for j in mine if j != i and len(steps[j]) == len(steps[i])]
        if len(others) >= 2:
            row = rows[i]
            row["halves_drift_pct"], row["halves_basis"] = halves_against_runs_pct(steps[i], others), "runs"
            row["long_enough"] = bool(row["halves_drift_pct"] < discipline.halves_tolerance_pct)


def flag_runs(rows: list[dict], discipline: Discipline, sm_mhz_max: float | None) -> None:
    """Set each row's ``causes`` (the disturbances it saw), ``deviation_pct`` and ``outlier``. Session-
    relative (host_slow compares with the session's fastest calibration, deviation with the configuration's
    median), so recomputed over all rows after each run. The fastest, not the median, calibration is the
    reference: a host that is slow half of the time would put its median on the slow mode; the threshold
    sits between a quiet host's jitter and the two speeds (~1 : 2) seen on the H200's host."""
    d = discipline
    # before and after each have their own reference: a run leaves the caches to the calibration after it
    fastest_before = min((r["host_cal_before_ms"] for r in rows), default=float("nan"))
    fastest_after = min((r["host_cal_after_ms"] for r in rows), default=float("nan"))
    medians = {}
    for label in {r["config"] for r in rows}:
        ok = [r["tokens_per_s"] for r in rows if r["config"] == label and not r["error"]]
        medians[label] = float(np.median(ok)) if ok else float("nan")
    for r in rows:
        causes = []
        if r["error"]:
            causes.append("error")
        if r["cold"]:
            causes.append("cold")
        if not r["error"] and not r["long_enough"]:
            causes.append("halves")
        if (r["host_cal_before_ms"] > fastest_before * (1 + d.host_slow_pct / 100)
                or r["host_cal_after_ms"] > fastest_after * (1 + d.host_slow_pct / 100)):
            causes.append("host_slow")
        if sm_mhz_max and r["sm_mhz_median"] < d.clock_low_fraction * sm_mhz_max:
            causes.append("clock_low")
        if r["gc_gen2"] or r["gc_ms"] > d.gc_fraction * 1e3 * r["decode_s"]:
            causes.append("gc")
        if r["steal_ms"] is not None and r["steal_ms"] > d.steal_fraction * 1e3 * r["wall_s"]:
            causes.append("steal")
        r["causes"] = ";".join(causes)
        r["deviation_pct"] = (float("nan") if r["error"] else
                              100.0 * (r["tokens_per_s"] - medians[r["config"]]) / medians[r["config"]])
        r["outlier"] = bool(abs(r["deviation_pct"]) > d.outlier_pct)


PERTURBATIONS = {"host_slow", "clock_low", "gc", "steal"}    # from outside the engine's own work


def floor_table(report: Report) -> list[dict]:
    """The noise floor per configuration (in the order first measured): successful runs ``n``, median
    tokens/s and spread over them (engine figure and median-step figure), the same over the runs without
    an outside perturbation (``clean``: no host_slow, clock_low, gc or steal; reported beside, never
    instead), the warm-up, how many runs were long enough, and the outliers with their causes; ``failed``
    (no run succeeded, so the figures are NaN) and ``error`` (the first failed run's, '' without one)."""
    out = []
    for label in dict.fromkeys(r["config"] for r in report.rows):
        runs = [r for r in report.rows if r["config"] == label]
        ok = [r for r in runs if not r["error"]]
        clean = [r for r in ok if not PERTURBATIONS & set(r["causes"].split(";"))]
        outliers = [r for r in ok if r["outlier"]]
        causes: dict[str, int] = {}
        for r in outliers:
            for c in [c for c in r["causes"].split(";") if c] or ["unexplained"]:
                causes[c] = causes.get(c, 0) + 1
        warm = report.warmups.get(label, {})
        hit = [r["hit_rate"] for r in ok if "hit_rate" in r]
        sm = [r["sm_mhz_min"] for r in runs if not math.isnan(r["sm_mhz_min"])]
        out.append({
            "config": label, **report.configs[label], "n": len(ok), "errors": len(runs) - len(ok),
            "failed": not ok, "error": next((r["error"] for r in runs if r["error"]), ""),
            "median_tokens_per_s": _median([r["tokens_per_s"] for r in ok]),
            "spread_pct": spread_pct([r["tokens_per_s"] for r in ok]),
            "median_tokens_per_s_median_step": _median([r["tokens_per_s_median_step"] for r in ok]),
            "spread_median_step_pct": spread_pct([r["tokens_per_s_median_step"] for r in ok]),
            "n_clean": len(clean), "spread_clean_pct": spread_pct([r["tokens_per_s"] for r in clean]),
            "warmup_passes": warm.get("passes"), "warmup_steady": warm.get("steady"),
            "long_enough": f"{sum(r['long_enough'] for r in ok)}/{len(ok)}",
            "median_halves_drift_pct": _median([r["halves_drift_pct"] for r in ok]),
            "outliers": len(outliers),
            "outlier_causes": " ".join(f"{c}:{n}" for c, n in sorted(causes.items())),
            "host_cal_ms_median": _median([r["host_cal_before_ms"] for r in runs]),
            "sm_mhz_min": min(sm) if sm else float("nan"),
            "hit_rate": _median(hit), "hit_rate_identical": len(set(hit)) <= 1,
        })
    return out


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The GPU clock sampler process of real.measurement.")
    parser.add_argument("--clocks", required=True, help="the samples file")
    parser.add_argument("--period", type=float, default=0.015, help="seconds between samples")
    parser.add_argument("--index", type=int, default=0, help="NVML device index")
    args = parser.parse_args(argv)
    _sample_clocks(args.clocks, args.period, args.index)


if __name__ == "__main__":
    _main()
