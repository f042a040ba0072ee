"""Simulator speed: simulated layer-steps per second on one core.

    python -m experiments.bench_sim                 # the default trace, a few policies and sizes
    python -m experiments.bench_sim --profile lru:4  # and where the time goes, for one of them
    python -m experiments.bench_sim --profile my_policy.py:MyPolicy:8   # a policy of one's own, as the sweep takes it

``--profile`` runs one reference case under cProfile: its top functions, then its time and calls per
layer-step by the file that holds the code, per package (the clocks in ``sim/``, the shared core in
``offload/``, the policies; the rest as one line: numpy, the standard library, builtins). That case runs
before the benchmark (its report is printed after it): a policy that fails does so in seconds, not after the
benchmark's minutes, first on the trace's first tokens (untimed: it also keeps first-call costs, lazy imports
included, out of the profile), then in full. A policy of one's own whose code raises (SystemExit included) or
whose hook returns a value the cache refuses (``PolicyError``) ends the command with one line on stderr, the
error, the policy's class, the hook and the file:line where it left the policy (as the sweep reports a
configuration that fails at run time), and exit code 1; a constructor that raises is bad input, exit code 2, as
the sweep's. An error in the toolkit's own code keeps its traceback. Running the case first does not move the
timed figures: every case's first run is an untimed warm-up already, and the reference path imports no numba
(the fast path's cold start is still timed from its import).

Each case runs on the reference (``sim.simulator.simulate(path="reference")``: the window clock for
the engine's copy window, the default; SimPy for the ideal link, ``--copies-in-flight null``) and,
where the policy has a kernel, on the exact fast path (``sim.fast_path``). The fast path's cold start
(importing numba, and the first call: compiling its kernels, or loading them from numba's disk cache)
is reported apart from its warm runs. Besides the default trace's cases: the oracle with a deep
prefetch window, and the lookahead policy on the committed trace with prediction tracks
(``traces/moe-lm-h100.npz``).

Reference rows give the median over ``--repeat`` runs of layer-steps per wall second, its range, and
per CPU second of this process (which other processes on a shared machine disturb less).

Its first line times a fixed pure-Python loop (``python_loop_ns``): the reference path is pure Python, so its
figures on two machines (or one shared machine on two days) compare after dividing by that loop's speed.

A benchmark, not a test: it prints its figures and never fails on them.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

from experiments.config import RunConfig
from experiments.runner import validate_grid
from offload.controller import PolicyError
from policies.registry import RUN_FAILURES, failure_site, resolve_policy, user_module_file
from hardware.profile import load_hardware
from offload.session import RunSettings
from sim.simulator import simulate
from traces import DEFAULT_TRACE, load_trace

# (policy, slots, prefetch depth) on --trace
CASES = [("lru", 4, 1), ("lru", 8, 1), ("lru", 16, 1), ("lru", 32, 1), ("lfu", 8, 1), ("fifo", 8, 1), ("static", 8, 1),
         ("belady", 8, 1), ("oracle", 8, 1), ("oracle", 8, 24), ("oracle", 8, 256), ("affinity", 8, 1)]
_ROOT = Path(__file__).resolve().parents[1]
PREDICTIVE_TRACE = _ROOT / "traces" / "moe-lm-h100.npz"
PREDICTIVE_CASES = [("lookahead", 2, 2)]
OUTSIDE = "other: numpy, stdlib, builtins"   # code outside the repository, in time_by_file
_USER = "your code"                              # a user's policy file and its own modules, in time_by_file
_MIN_TIMED_S = 0.5    # a short trace's case is run this long per repeat (back to back) so timing is meaningful


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--hardware", default="h100-pcie5")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median and range reported)")
    parser.add_argument("--profile", metavar="POLICY:SLOTS",
                        help="cProfile one case, top functions (POLICY as the sweep takes it: a name, or FILE.py:Class)")
    parser.add_argument("--copies-in-flight", default=str(RunSettings.copies_in_flight), metavar="N|null",
                        help="the copy window the runs model (RunSettings.copies_in_flight; null: the ideal link, "
                             "the model before the window existed; default: %(default)s)")
    args = parser.parse_args(argv)
    try:        # every input checked before anything is timed: one line and exit 2, as the sweep
        window, train, trace, hardware, profiled = _inputs(args)
    except ValueError as err:       # TraceError, HardwareProfileError, the registry's and the settings' errors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None

    def settings_for(slots: int, depth: int = 1) -> RunSettings:
        return RunSettings(cache_slots=slots, prefetch_depth=depth, copies_in_flight=window)

    steps = trace.num_tokens * trace.num_layers
    print(f"this CPU: {python_loop_ns():.1f} ns per iteration of a pure-Python loop (`s += i`, best of 5; the "
          f"reference path's speed scales with it)")
    print(f"trace {args.trace}: {trace.num_tokens} tokens x {trace.num_layers} layers = {steps} layer-steps")
    stats = None
    if profiled is not None:        # before the benchmark: a policy that fails does so in seconds
        policy, slots = profiled
        print(f"profiling {policy} with {slots} slots first (its report follows the benchmark)", flush=True)
        stats = _profile(args.profile, trace, policy, hardware, settings_for(slots), train)
    # the cases are sized for the default trace's 32 experts (top-4): a trace of another model runs those
    # its layers can hold, from top-k to every expert
    fits = range(trace.model.top_k, trace.model.num_experts + 1)
    fast_simulate = _fast_cold_start(trace, hardware, train, settings_for(min(max(8, fits[0]), fits[-1])))
    print(f"{'policy':>10} {'slots':>5} {'depth':>5} {'hit_rate':>8} {'copies/step':>11} {'wall_s':>7} "
          f"{'layer-steps/s':>14} {'(range)':>19} {'per CPU s':>10}  path")
    for policy, slots, depth in CASES:
        if slots not in fits:
            print(f"{policy:>10} {slots:>5} {depth:>5}  skipped: {trace.model.name} routes to {trace.model.top_k} "
                  f"of {trace.model.num_experts} experts per layer")
            continue
        settings = settings_for(slots, depth)
        ref = _reference(trace, policy, hardware, settings, train, args.repeat)
        print(_reference_line(policy, slots, depth, ref, steps))
        fast = fast_simulate(trace, policy, hardware, settings, train)   # also the untimed warm-up
        if fast is None:
            print(f"{policy:>10} {slots:>5} {depth:>5} {'':>8} {'':>11} {'':>7} {'':>14} {'':>19} {'':>10}  "
                  f"fast: no kernel, reference only")
            continue
        wall_s = min(_seconds(fast_simulate, trace, policy, hardware, settings, train)
                     for _ in range(max(args.repeat, 5)))   # ms per run: a few more repeats cost nothing
        same = "identical" if fast.metrics == ref.metrics and fast.token_ns == ref.token_ns else "DIFFERENT"
        print(f"{policy:>10} {slots:>5} {depth:>5} {fast.metrics['hit_rate']:8.3f} "
              f"{fast.metrics['copies'] / steps:11.2f} {wall_s:7.4f} {steps / wall_s:14,.0f} {'':>19} {'':>10}  "
              f"fast, warm ({same} to the reference)")
    if PREDICTIVE_TRACE.is_file():
        p_train, p_trace = load_trace(PREDICTIVE_TRACE).split(0.25)
        p_steps = p_trace.num_tokens * p_trace.num_layers
        print(f"trace {PREDICTIVE_TRACE.name}: {p_trace.num_tokens} tokens x {p_trace.num_layers} layers = "
              f"{p_steps} layer-steps (each repeat runs it back to back for {_MIN_TIMED_S} s)")
        for policy, slots, depth in PREDICTIVE_CASES:
            ref = _reference(p_trace, policy, hardware, settings_for(slots, depth),
                             p_train, args.repeat)
            print(_reference_line(policy, slots, depth, ref, p_steps))
    if stats is not None:
        out = io.StringIO()
        stats.stream = out
        stats.sort_stats("tottime").print_stats(15)
        print(out.getvalue())
        print(time_by_file(stats, steps))


_CHECK_TOKENS = 32      # the profiled case's untimed first run: the trace's first tokens


def _profile(spec: str, trace, policy: str, hardware, settings: RunSettings, train) -> pstats.Stats:
    """The profiled case's reference run under cProfile, after an untimed run of the trace's first tokens (a
    policy that fails early does so in a second; first calls' costs stay out of the profile). A policy of one's own
    that fails (``_policy_failure``) ends the command: one line on stderr, exit code 1."""
    policy_cls = resolve_policy(policy)
    profiler = cProfile.Profile()
    try:
        simulate(trace.first_tokens(_CHECK_TOKENS), policy_cls, hardware, settings, train_trace=train,
                 path="reference")
        profiler.enable()
        try:
            simulate(trace, policy_cls, hardware, settings, train_trace=train, path="reference")
        finally:
            profiler.disable()
    except RUN_FAILURES as err:
        line = _policy_failure(spec, policy_cls, err)
        if line is None:        # the toolkit's own error: its traceback
            raise
        print(line, file=sys.stderr)
        raise SystemExit(1) from None
    return pstats.Stats(profiler)


def _policy_failure(spec: str, policy_cls: type, err: BaseException) -> str | None:
    """``err``, raised by a run of the policy ``policy_cls`` (given as ``--profile spec``), as one line when it is the
    fault of a policy of one's own (its class, or a base class, defined in a file of the user's:
    ``policies.registry.user_module_file``): a value its hook returned that the cache refused (``PolicyError``), or
    an error raised while its hook ran (in its code, or in what that calls); None for any other (a built-in
    policy's, the toolkit's own), whose traceback is the report. The line names the policy's class, the
    hook, and the file:line where the error left the policy (``failure_site``, as the sweep's report)."""
    error = f"{type(err).__name__}: {' '.join(str(err).split())}"
    own = {user_module_file(getattr(sys.modules.get(c.__module__), "__file__", None)) for c in policy_cls.__mro__}
    own.discard(None)           # the user's files that define the policy's class or its bases
    if isinstance(err, PolicyError):        # its message names the class and the hook
        if not own:
            return None
        what = error
    else:       # the outermost frame in the policy's own code: the hook the toolkit called
        hook = next((frame.name for frame in traceback.extract_tb(err.__traceback__)
                     if frame.filename.endswith(".py") and Path(frame.filename).resolve() in own), None)
        if hook is None:
            return None
        what = f"policy {policy_cls.__name__}.{hook} raised {error}"
    return f"error: --profile {spec}: {what} at {failure_site(policy_cls, err)}"


class _Timed:
    """A reference case's last result and its timed repeats, in seconds per run."""

    def __init__(self, result, wall_s: list[float], cpu_s: list[float]):
        self.metrics, self.token_ns = result.metrics, result.token_ns
        self.wall_s, self.cpu_s = wall_s, cpu_s


def _inputs(args):
    """(the copy window, the training slice, the replayed trace, the hardware profile, the profiled case: (policy,
    slots) or None) from ``args``; raises ValueError naming the bad value and the fix."""
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: must be at least 1 (timed runs per case)")
    try:
        window = None if args.copies_in_flight == "null" else int(args.copies_in_flight)
        RunSettings(cache_slots=8, copies_in_flight=window)
    except ValueError as err:
        raise ValueError(f"--copies-in-flight {args.copies_in_flight}: {err} (or null: the ideal link)") from None
    train, trace = load_trace(args.trace).split(0.25)
    hardware = load_hardware(args.hardware)
    profiled = None
    if args.profile:
        # the last colon: a policy of one's own is FILE.py:Class, as the sweep's policy= takes it
        policy, _, slots = args.profile.rpartition(":")
        if not policy or not slots.isdigit():
            raise ValueError(f"--profile {args.profile}: give POLICY:SLOTS, e.g. lru:8 or my_policy.py:MyPolicy:8")
        profiled = policy, int(slots)
        # the sweep's checks of the case it runs: the policy resolved and built, slots in top_k..experts
        try:
            validate_grid([RunConfig(trace=args.trace, policy=policy, cache_slots=int(slots), hardware=args.hardware,
                                     copies_in_flight=window, sim_path="reference")])
        except ValueError as err:
            raise ValueError(f"--profile {args.profile}: {err}") from None
    return window, train, trace, hardware, profiled


def _reference(trace, policy, hardware, settings, train, repeat: int) -> _Timed:
    """``repeat`` timed runs on the reference; a short trace is run back to back per repeat."""
    def once():
        return simulate(trace, resolve_policy(policy), hardware, settings, train_trace=train, path="reference")

    start = time.perf_counter()
    result = once()
    runs = max(1, int(_MIN_TIMED_S / max(time.perf_counter() - start, 1e-9)))
    if runs > 1:
        once()          # short: the first run was a warm-up; time whole batches
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(runs):
            result = once()
        walls.append((time.perf_counter() - wall) / runs)
        cpus.append((time.process_time() - cpu) / runs)
    return _Timed(result, walls, cpus)


def _reference_line(policy: str, slots: int, depth: int, ref: _Timed, steps: int) -> str:
    m = ref.metrics
    wall = statistics.median(ref.wall_s)
    spread = f"{steps / max(ref.wall_s):,.0f}-{steps / min(ref.wall_s):,.0f}"
    return (f"{policy:>10} {slots:>5} {depth:>5} {m['hit_rate']:8.3f} {m['copies'] / steps:11.2f} {wall:7.2f} "
            f"{steps / wall:14,.0f} {spread:>19} {steps / statistics.median(ref.cpu_s):10,.0f}  reference")


def time_by_file(stats: pstats.Stats, steps: int) -> str:
    """A profile's own time (tottime) and calls per layer-step, summed by the file of this repository that
    holds the code (``sim/simulator.py``, ``offload/controller.py``, ...), with a subtotal per package; code
    outside the repository (numpy, the standard library, builtins) as one line. cProfile adds a cost to
    every call, so call-heavy code weighs more here than in an unprofiled run. A policy of one's own and the
    modules of one's own it imports (``policies.registry``'s rule: outside the repository, the standard library
    and site-packages) are their own group, ``your code``, by absolute path."""
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    users: set[str] = set()
    for (filename, _, _), (_, ncalls, tottime, _, _) in stats.stats.items():
        path = Path(filename).resolve() if filename.endswith(".py") else None
        if path is not None and path.is_relative_to(_ROOT):
            name = path.relative_to(_ROOT).as_posix()
        elif path is not None and user_module_file(filename) is not None:     # a policy of one's own and its helpers
            name = str(path)
            users.add(name)
        else:
            name = OUTSIDE
        seconds[name] = seconds.get(name, 0.0) + tottime
        calls[name] = calls.get(name, 0) + ncalls
    total = sum(seconds.values()) or 1.0

    def line(name: str, s: float, n: int, indent: str = "") -> str:
        return f"{indent + name:<44} {100 * s / total:5.1f}% {s:8.2f} {n / steps:10.1f}"

    by_package: dict[str, list[str]] = {}        # files, most time first
    for name in sorted(seconds, key=seconds.get, reverse=True):
        if name != OUTSIDE and seconds[name] >= 0.001 * total:
            by_package.setdefault(_USER if name in users else name.split("/")[0], []).append(name)
    lines = [f"{f'time by file, profiled ({steps} layer-steps)':<44} {'share':>6} {'seconds':>8} {'calls/step':>10}"]
    for package, files in sorted(by_package.items(), key=lambda item: -sum(seconds[f] for f in item[1])):
        lines.append(line(package + "/", sum(seconds[f] for f in files), sum(calls[f] for f in files)))
        lines += [line(f, seconds[f], calls[f], "  ") for f in files]
    if OUTSIDE in seconds:
        lines.append(line(OUTSIDE, seconds[OUTSIDE], calls[OUTSIDE]))
    return "\n".join(lines)


def python_loop_ns(iterations: int = 2_000_000, repeats: int = 5) -> float:
    """ns per iteration of ``for i in range(n): s += i`` (best of ``repeats``): the CPU's speed at pure-Python
    work, which is what the reference path runs. Machines, or one shared machine on two days, differ by
    several times (the reference path ran 3.4x slower in session 10 than in session 9, same code and machine class); figures compare after dividing
    by it."""
    best = float("inf")
    for _ in range(repeats):
        s, start = 0, time.perf_counter()
        for i in range(iterations):
            s += i
        best = min(best, time.perf_counter() - start)
    return 1e9 * best / iterations


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _fast_cold_start(trace, hardware, train, settings: RunSettings):
    """Import the fast path and run its first case, timing both; returns ``fast_simulate``."""
    start = time.perf_counter()
    from sim import fast_path, kernels   # imported here so that numba's import time is measured
    import_s = time.perf_counter() - start
    steps = trace.num_tokens * trace.num_layers
    lines = []
    for policy in ("lru", "belady"):       # the replay kernel, then Belady (which builds the next-use table)
        first_s = _seconds(fast_path.fast_simulate, trace, policy, hardware, settings, train)
        lines.append(f"first {policy} run {first_s:.2f} s")
    compiled, loaded = kernels.compile_counts()
    print(f"fast path cold start: import {import_s:.2f} s, {', '.join(lines)} "
          f"({compiled} kernel(s) compiled, {loaded} loaded from numba's disk cache; "
          f"warm: {steps} layer-steps in the rows below)")
    return fast_path.fast_simulate


if __name__ == "__main__":
    main()
