"""Every published engine figure is measured here, with the discipline of ``real.measurement``: the run
function (``EngineRuns``: a fresh engine that decodes once, timed step by step), the session
(``measure_session``: ``Measurement`` with the command's repeat count, its runs written to the noise files
after every run), the lossless check beside it (``TokenCheck``) and the figures a table publishes
(``figures``: the median of a configuration's runs, their spread, the runs counted and the outliers with
their causes)."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np

from real.engine import EngineResult, OffloadEngine
from real.measurement import Config, Discipline, Measurement, Report, RunFunction, RunOutput

# What ``figures`` adds beside a configuration's median tokens/s in every table that publishes one.
FIGURE_COLUMNS = ["spread_pct", "runs", "errors", "outliers", "outlier_causes", "long_enough"]


class EngineRuns:
    """``engine_for(config)`` builds the run's engine; ``decode(engine, warmup)`` runs it (a shape replay of a
    trace, or a live generation; a warm-up pass may decode less) and returns its ``EngineResult``;
    ``around(config)``: a context both run inside (default: none); ``timed(result)``: the step times (ms)
    the run's figures come from (default: every step; a live run times its generated tokens only,
    ``generated_steps``); ``check(config, result)``: more columns of a measured (not warm-up) run's row,
    from its result (the lossless check, ``TokenCheck``).

    Besides the engine's counts (``hit_rate`` and ``misses`` over every step the engine ran, prompt steps
    included, as the simulator counts a replay of the recorded trace and ``experiments.validate`` compares
    them; bytes moved, the copies' bandwidth, the GPU's peak memory), a run reports the hit rate and misses
    over the steps its tokens/s counts (``decode_hit_rate``, ``decode_misses``: the ``timed`` steps) and over
    the others (``prompt_hit_rate``: a live run's prompt steps; NaN where every step is timed), from the
    controller's counts read at each step's first routing read-back (NaN where they cannot be told apart);
    and how long the host waited in each layer's routing read-back (the one
    synchronisation per layer; timed by wrapping the model's ``read_routing``, two clock reads per layer)
    and the rest of the step's wall time per layer: the host's own work plus the waits the read-back does
    not see (a copy slot's wait in make_ready, the final logits' read); and where each request's timed
    steps begin (``timed_request_starts``), so that the halves check compares steps at the same position
    in their requests."""

    def __init__(self, model, shape, engine_for: Callable[[Config], OffloadEngine],
                 decode: Callable[[OffloadEngine, bool], EngineResult],
                 around: Callable[[Config], ContextManager] | None = None,
                 timed: Callable[[EngineResult], list[float]] | None = None,
                 check: Callable[[Config, EngineResult], dict] | None = None):
        self.model, self.shape = model, shape
        self.engine_for, self.decode = engine_for, decode
        self.around = around or (lambda config: nullcontext())
        self.timed = timed or (lambda result: result.routing.step_ms)
        self.check = check

    def __call__(self, config: Config, warmup: bool) -> RunOutput:
        waits: list[float] = []
        first_ns: list[int] = []        # when the first step reads its first layer's routing
        counts: list[tuple[int, int, int]] = []     # the controller's counts before each step
        engines: list[OffloadEngine] = []
        read = self.model.read_routing
        L = self.shape.num_layers

        def timed_read(*args):
            if not waits:
                first_ns.append(time.monotonic_ns())
            if engines and len(waits) % L == 0:      # a step's first layer: every earlier step is counted
                counts.append(_counts(engines[0].ctrl.stats))
            start = time.perf_counter()
            try:
                return read(*args)
            finally:
                waits.append(time.perf_counter() - start)

        self.model.read_routing = timed_read        # this instance only; deleted below
        try:
            with self.around(config):
                engine = self.engine_for(config)
                waits.clear()
                first_ns.clear()
                engines.append(engine)
                result = self.decode(engine, warmup)
        finally:
            del self.model.read_routing
        step_ms = np.asarray(result.routing.step_ms, dtype=np.float64)
        timed_ms = np.asarray(self.timed(result), dtype=np.float64)
        columns = {k: result.metrics[k] for k in ("hit_rate", "misses", "bytes_moved", "copy_GBps", "gpu_mem_GB")}
        columns.update(self.split_hits(result, counts))
        nan = float("nan")
        columns.update(routing_wait_ms_per_layer=nan, host_ms_per_layer=nan, host_ms_per_layer_p90=nan)
        if len(waits) == len(step_ms) * L and len(step_ms):    # else the engine no longer reads routing per layer
            wait_ms = 1e3 * np.asarray(waits).reshape(-1, L).sum(axis=1)
            host = (step_ms - wait_ms) / L
            columns.update(routing_wait_ms_per_layer=float(np.median(wait_ms)) / L,
                           host_ms_per_layer=float(np.median(host)),
                           host_ms_per_layer_p90=float(np.percentile(host, 90)))
        if self.check is not None and not warmup:
            columns.update(self.check(config, result))
        return RunOutput(timed_ms.tolist(), columns, first_ns[0] if first_ns else None,
                         self.timed_request_starts(result))

    def timed_indices(self, result: EngineResult) -> np.ndarray | None:
        """The indices of the steps ``timed`` keeps (``timed`` applied to the step indices), ascending; None
        when that cannot be told (``timed`` kept no step, read more than the steps, or not in order)."""
        routing = result.routing
        probe = replace(result, routing=replace(routing, step_ms=[float(i) for i in range(len(routing.step_ms))]))
        try:
            kept = np.asarray(self.timed(probe), dtype=np.float64)
        except Exception:       # a timed() that reads more than the steps: the halves fall back to time
            return None
        if not len(kept) or np.any(kept != np.round(kept)) or np.any(np.diff(kept) <= 0):
            return None
        return kept.astype(np.int64)

    def split_hits(self, result: EngineResult, counts: list[tuple[int, int, int]]) -> dict:
        """``decode_hit_rate``, ``decode_misses`` (over the ``timed`` steps) and ``prompt_hit_rate`` (over the
        rest; NaN without any), from ``counts``: the controller's (hits, accesses, misses) before each step.
        All NaN when there is not one count per step or the timed steps cannot be told."""
        nan = float("nan")
        steps = len(result.routing.step_ms)
        kept = self.timed_indices(result)
        if len(counts) != steps or kept is None:
            return {"decode_hit_rate": nan, "decode_misses": nan, "prompt_hit_rate": nan}
        per_step = np.diff(np.asarray(counts + [_counts(result.stats)], dtype=np.int64), axis=0)   # [steps, 3]
        timed = np.zeros(steps, dtype=bool)
        timed[kept] = True

        def rate(rows: np.ndarray) -> float:
            hits, accesses = rows[:, 0].sum(), rows[:, 1].sum()
            return float(hits / accesses) if accesses else nan
        return {"decode_hit_rate": rate(per_step[timed]), "decode_misses": int(per_step[timed, 2].sum()),
                "prompt_hit_rate": rate(per_step[~timed])}

    def timed_request_starts(self, result: EngineResult) -> list[int] | None:
        """Where each request's steps begin among the timed steps (``RunOutput.request_starts``, for the
        halves check), from the engine's ``routing.request_starts`` and ``timed_indices``. None when that
        cannot be told."""
        routing = result.routing
        kept = self.timed_indices(result)
        if kept is None:
            return None
        request = np.searchsorted(np.asarray(routing.request_starts), kept, side="right") - 1
        return [0] + (np.flatnonzero(np.diff(request)) + 1).tolist()


def _counts(stats) -> tuple[int, int, int]:
    return stats.hits, stats.accesses, stats.misses


def generated_steps(prompts: Sequence[Sequence[int]], new_tokens: int) -> Callable[[EngineResult], list[float]]:
    """``EngineRuns.timed`` for a live decode of ``prompts`` (or of its first requests, a warm-up pass's):
    ``generated_of`` its steps."""
    return lambda result: generated_of(result.routing.step_ms, prompts[:len(result.generated)], new_tokens)


def generated_of(step_ms: Sequence[float], prompts: Sequence[Sequence[int]], new_tokens: int) -> list[float]:
    """Of the step times of a greedy decode of ``prompts`` (each prompt's steps, then ``new_tokens`` more),
    those of the steps that generate a token: each request's ``new_tokens`` steps after its prompt, as the
    engine's tokens/s counts them."""
    out, start = [], 0
    for prompt in prompts:
        out += list(step_ms[start + len(prompt):start + len(prompt) + new_tokens])
        start += len(prompt) + new_tokens
    return out


class TokenCheck:
    """``EngineRuns.check``: whether a measured run's generated tokens equal ``reference``'s (a live run: the
    fully-resident model's, which the all-resident engine's are checked against in the same session); without
    a reference (a shape replay), the first lossless run's tokens are the reference and every later run is
    checked against them. ``lossless``: per configuration label, whether its policy must keep the model's
    output. Checks every measured repeat; ``mismatches(report)`` says which lossless configurations changed
    the output."""

    def __init__(self, lossless: Mapping[str, bool], reference: list[list[int]] | None = None):
        self.lossless, self.reference = lossless, reference
        self.source = "the fully-resident model's" if reference is not None else None

    def __call__(self, config: Config, result: EngineResult) -> dict:
        lossless = self.lossless[config.label]
        if self.reference is None and lossless:
            self.reference, self.source = result.generated, f"the first lossless run's ({config.label})"
        identical = result.generated == self.reference
        return {"lossless": lossless, "identical_tokens": identical,
                "first_difference": "" if identical else first_difference(result.generated, self.reference)}

    def columns(self, label: str, report: Report, column: str, named: bool = False) -> dict:
        """A correctness.csv row's check columns for configuration ``label``: ``lossless``; with ``named``,
        ``reference`` (``source``); ``column``, whether every measured run's tokens were identical to the
        reference (None before a run was checked); ``runs_checked`` and ``runs_identical``."""
        runs = [r for r in report.rows if r["config"] == label and not r["error"] and "identical_tokens" in r]
        identical = sum(bool(r["identical_tokens"]) for r in runs)
        return {"lossless": self.lossless[label], **({"reference": self.source} if named else {}),
                column: identical == len(runs) if runs else None, "runs_checked": len(runs),
                "runs_identical": identical}

    def mismatches(self, report: Report) -> list[str]:
        """One line per lossless configuration with a run whose tokens differ from the reference: which
        runs, and where they first differ."""
        lines = []
        for label in dict.fromkeys(r["config"] for r in report.rows):
            runs = [r for r in report.rows if r["config"] == label and not r["error"]]
            bad = [r for r in runs if r.get("lossless") and not r["identical_tokens"]]
            if bad:
                lines.append(f"{label}: {len(bad)} of {len(runs)} runs generated other tokens than "
                             f"{self.source} (round {bad[0]['round']}: {bad[0]['first_difference']})")
        return lines


def first_difference(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """Where two decodes' tokens first differ: 'request R, token T: A instead of B' (or the counts)."""
    if len(tokens) != len(reference):
        return f"{len(tokens)} requests instead of {len(reference)}"
    for r, (got, want) in enumerate(zip(tokens, reference)):
        for t, (a, b) in enumerate(zip(got, want)):
            if a != b:
                return f"request {r}, token {t}: {a} instead of {b}"
        if len(got) != len(want):
            return f"request {r}: {len(got)} tokens instead of {len(want)}"
    return "identical"


def discipline(repeats: int) -> Discipline:
    """``repeats`` >= 2: the discipline (untimed warm-up until steady, interleaved rotated rounds). 1: the
    smoke fast path, one run per configuration and no warm-up (its rows say 'cold', its spread is NaN)."""
    return Discipline(repeats=repeats, warmup=repeats > 1)


def measure_session(run: RunFunction, configs: Sequence[Config], repeats: int, on_progress: Callable[[Report], None],
                    deadline_s: float | None = None, started: float | None = None,
                    errors_to: Path | None = None) -> Report:
    """``configs`` measured by ``run`` under ``discipline(repeats)``; ``on_progress(report)`` after the warm-up,
    after every run and at the end (the callers write their tables and noise files there). ``deadline_s``
    seconds after ``started`` (``time.monotonic``): checked before every warm-up and round
    (``real.measurement.Measurement``). ``errors_to``: a run that raises is reported as the sweep reports it
    (``error_files``): its traceback goes to ``errors_to/errors/<hash>.txt``, its row's error and the console
    say the policy's file, line and hook; None: the traceback on stderr.

    Resume: inside ``real.bench.table.measured_under(settings)`` (without ``settings["fresh"]``), a
    configuration whose row in ``errors_to``/engine.csv was finished (``finished``) under the same settings
    and engine code is not measured again: one line says so, its rows stay as they are, and its label is in
    ``report.info["resumed"]`` (the noise files keep its runs)."""
    from real.bench.table import current_settings
    settings = current_settings()
    if settings is not None and errors_to is not None and not settings.get("fresh"):
        done = finished(errors_to, settings, configs)
        for c in configs:
            if c.label in done:
                print(f"resumed: {c.label} skipped, measured already under these settings and this engine code "
                      f"({Path(errors_to) / 'engine.csv'}; --fresh measures it again)", flush=True)
        skipped = [c.label for c in configs if c.label in done]
        configs = [c for c in configs if c.label not in done]
    else:
        skipped = []
    if not configs:
        report = Report(info={"resumed": skipped})
        on_progress(report)
        return report
    measurement = Measurement(run, configs, discipline(repeats), on_progress=on_progress, deadline_s=deadline_s,
                              started=started, on_error=error_files(errors_to) if errors_to is not None else None)
    measurement.report.info["resumed"] = skipped
    report = measurement.run_all()
    on_progress(report)
    return report


def finished(out: Path, settings: dict, configs: Sequence[Config]) -> set[str]:
    """The labels of ``configs`` whose OUT/engine.csv row was measured under ``settings`` with the same engine
    code (``real.bench.table.measured_rows``) and finished: all ``settings["repeats"]`` runs done (not cut
    short by a deadline or an interrupt), none failed. A configuration matches a row when each of its fields
    (mode, policy, cache size) equals the row's column of that name."""
    from real.bench.table import measured_rows

    def same(a, b) -> bool:
        def text(v) -> str:
            return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        return text(a) == text(b)
    repeats = settings.get("repeats")
    rows = [r for r in measured_rows(out, settings)
            if same(r.get("runs"), repeats) and same(r.get("errors"), 0) and not _truthy(r.get("failed"))]
    return {c.label for c in configs
            if any(all(same(r.get(k), v) for k, v in c.fields.items()) for r in rows)}


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() == "true"


def error_files(out: Path) -> Callable[[Config, BaseException], str]:
    """``Measurement.on_error`` as the sweep reports a failed configuration: the traceback written to
    ``out/errors/<hash>.txt`` (the hash of the configuration's label, so a configuration keeps one file), and
    the error as one line: ``Type: message at FILE:LINE in HOOK (traceback: out/errors/<hash>.txt)``, where
    FILE:LINE in HOOK is where it left the configuration's policy (``policies.registry.failure_site``: a value
    the controller refused names the hook that returned it)."""
    import hashlib
    import traceback
    from policies.registry import failure_site, resolve_policy
    from traces.io import atomic_write

    def on_error(config: Config, err: BaseException) -> str:
        try:
            cls = resolve_policy(str(config.fields.get("policy")))
        except Exception:       # no policy (a reference's session) or not one the registry knows
            cls = object
        site = failure_site(cls, err)
        what = f"{type(err).__name__}: {' '.join(str(err).split())}"
        h = hashlib.sha256(config.label.encode()).hexdigest()[:16]
        path = Path(out) / "errors" / f"{h}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        report = f"config {h} ({config.label}) failed at {site}: {what}\n\n{''.join(traceback.format_exception(err))}"
        atomic_write(path, lambda f: f.write(report))
        return f"{what} at {site} (traceback: {path})"
    return on_error


def run_problems(report: Report) -> list[str]:
    """One line per configuration with runs that raised: how many, and the first one's error (with
    ``error_files``, where it left the policy and the file its traceback is in)."""
    lines = []
    for label in dict.fromkeys(r["config"] for r in report.rows):
        runs = [r for r in report.rows if r["config"] == label]
        failed = [r for r in runs if r["error"]]
        if failed:
            lines.append(f"{label}: {len(failed)} of {len(runs)} runs failed ({failed[0]['error']})")
    return lines


@contextlib.contextmanager
def interrupt_exits(out):
    """Around an engine command's measuring: Ctrl-C (KeyboardInterrupt) ends it with one line saying that the
    tables in ``out`` hold every run that finished (each is written as it ends), and exit code 130, instead
    of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: the tables in {out} hold every run that finished", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def exit_message(problems: list[str], out) -> str:
    """What a command exits with (code 1) when ``problems`` (``run_problems``, ``TokenCheck.mismatches``, ...)
    were found, once every table is written in ``out``: one line each."""
    head = f"error: some measurements failed or changed the model's output (the tables are in {out}):"
    return "\n  ".join([head, *problems])


# A table's column -> the run column it is the median of. ``hit_rate`` and ``misses`` count the steps the
# tokens/s counts (a live run's generated tokens); ``hit_rate_all_steps`` every step, prompt steps included (what
# the simulator's replay of the recorded trace counts, and experiments.validate compares).
_MEDIANS = {"tpot_ms_p50": "step_ms_p50", "tpot_ms_p99": "step_ms_p99", "tokens": "steps",
            "hit_rate": "decode_hit_rate", "misses": "decode_misses", "prompt_hit_rate": "prompt_hit_rate",
            "hit_rate_all_steps": "hit_rate", "bytes_moved": "bytes_moved", "copy_GBps": "copy_GBps",
            "gpu_mem_GB": "gpu_mem_GB", "host_ms_per_layer": "host_ms_per_layer"}


def figures(report: Report) -> dict[str, dict]:
    """Per configuration label (those with runs so far): ``tokens_per_s``, the median over its successful
    runs of the engine's figure (decoded tokens over their time); ``tpot_ms_mean`` (1e3 over it);
    ``spread_pct`` ((max - min) / median of those runs; NaN below two runs); ``runs`` and ``errors``
    (runs that raised); ``outliers`` (runs more than the discipline's outlier threshold from the median)
    and ``outlier_causes`` (``cause:count``, 'unexplained' where no disturbance was seen); ``long_enough``
    (runs whose halves' median steps agree, of the runs); ``failed`` (no run succeeded: the figures are NaN
    because of it) and ``error`` (the first failed run's error line, '' without one); and the median over the
    runs of the other engine columns (step percentiles, counts over the timed steps and over all steps
    (``_MEDIANS``), bandwidth, peak memory, host time per layer)."""
    out = {}
    for floor in report.floor():
        runs = [r for r in report.rows if r["config"] == floor["config"]]
        ok = [r for r in runs if not r["error"]]
        failed = [r["error"] for r in runs if r["error"]]
        row = {"failed": not ok, "error": failed[0] if failed else "",
               "tokens_per_s": floor["median_tokens_per_s"],
               "tpot_ms_mean": 1e3 / floor["median_tokens_per_s"] if floor["n"] else float("nan"),
               "spread_pct": floor["spread_pct"] if floor["n"] > 1 else float("nan"),
               "runs": floor["n"], "errors": floor["errors"], "outliers": floor["outliers"],
               "outlier_causes": floor["outlier_causes"], "long_enough": floor["long_enough"]}
        for name, column in _MEDIANS.items():
            values = [r[column] for r in ok if column in r and not _nan(r[column])]
            row[name] = float(np.median(values)) if values else float("nan")
        out[floor["config"]] = row
    return out


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
