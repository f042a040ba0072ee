"""Check the simulator against the engine: calibrate, measure a grid, predict it, compare (one command).

    python -m experiments.validate                      # on a GPU: the H200 grid; on a CPU: the smoke grid
    python -m experiments.validate --scenario validate-h200 --slices gpt-oss-20b,mixtral-8x7b --out OUT
    python -m experiments.validate --out OUT --predict-only     # re-predict and re-report stored measurements
    python -m experiments.validate --out OUT --timelines SLICE   # both clocks' per-layer timelines (any machine)

Steps, each stored as it is made under OUT (``validation.store``), so a call killed by its time limit loses
nothing and the next call resumes where it stopped, re-measuring only what changed:

1. calibration (``real.calibration``), never from the validated runs: the link's copy table once, then per
   slice the kernels alone, synthetic hit and miss patterns and each policy's host work on the training
   slice; ``validation.profile_fit`` turns them into OUT/<gpu>-measured.yaml;
2. the engine over the slice's grid (policies x cache sizes), every configuration the median of interleaved
   repeats with its spread (``real.measurement``), plus one run with per-layer timings kept as a trace;
3. the simulator replays the very steps the engine timed, with the same training slice, on that profile;
4. OUT/validation.csv (long format), OUT/summary.txt, OUT/validation.png and OUT/noise_floor.csv.

``--timelines`` measures and predicts nothing new: for the named slices it compares the engine's timed runs
with the simulator's timeline of the same steps, layer by layer (``validation.timelines``), into
OUT/timelines_<slice>.csv and a table on screen.

The grid is a scenario file (``validation.scenario``; experiments/configs/validate-*.yaml): slices of
shape replay (random weights of a named shape, routing forced from a real trace) and live models. On a
CPU the smoke scenario runs the same path with a tiny model (CI runs it). Exit 2 for a bad scenario, or for a
slice's input a measurement could not use (``validation.preflight``: a slice's trace cut short or damaged, a live
slice's checkpoint, tokenizer, corpus or gate, weights larger than the host memory), every one found before anything
runs. The report names the profile its predictions come from (``profile_record``: the summary's first line,
validation.csv's ``profile`` columns, each new prediction in OUT/sim/): --predict-only --profile X rewrites them.

Under a deadline (``--deadline-s`` or the scenario's ``deadline_s``) a slice whose calibration would end past it is
not started (nor its runs), and the end of the call names it: a calibration is taken to last as long as the slice's
previous one recorded, ``UNKNOWN_CALIBRATION_S`` when OUT holds none. A call that the deadline leaves incomplete
(a slice not started, runs not made) exits with ``INCOMPLETE_EXIT`` (3), after its report: a script or CI job calls
again until it exits 0, and a deadline too short for any progress fails instead of passing (1: runs that failed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hardware.profile import HardwareProfileError, hardware_from_dict, load_hardware, profile_file
from plots.figures import plot_validation
from real.bench.args import cpu_threads, kernel_switch_error, positive_float, positive_int, switched_kernel_path
from real.bench.engine_runs import exit_message, run_problems
from real.profile_hw import profile_name
from traces import load_trace, save_trace
from traces.digest import file_sha256
from traces.io import atomic_write, output_problem
from traces.yaml_unique import safe_load_unique
from validation import report
from validation.engine_side import (OtherMachineError, SliceInputs, SliceMeasurement, measure_copy_table, replay_inputs,
                                    stored_result)
from validation.preflight import input_problems
from validation.profile_fit import clamped_constants, fit_profile, pattern_check
from validation.scenario import SCENARIOS_DIR, Scenario, ScenarioError, load_scenario
from validation.sim_side import fallback_note, predict
from validation.store import Store, changed_files, damaged_files, engine_files


# A slice's calibration time when OUT holds none of it to go by: on the H200 they took 21-87 s, after 10-54 s of
# building the model; twice the longest, since a slice too large for what is left is better left to the next call.
UNKNOWN_CALIBRATION_S = 180.0
INCOMPLETE_EXIT = 3      # the deadline left work undone: not a failure of what ran (1), not bad input (2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", help="a scenario file or a name in experiments/configs "
                                      "(default: the one OUT's results were measured under, else validate-h200 "
                                      "on a GPU, validate-smoke on a CPU)")
    p.add_argument("--slices", help="comma-separated slice names to measure now (default: all); the report still "
                                    "covers every slice OUT holds. Not with --predict-only, which re-predicts and "
                                    "reports the whole bundle (refused: a partial report would replace OUT's "
                                    "summary; --timelines SLICE compares one slice) nor with --timelines (name the "
                                    "slices there)")
    p.add_argument("--out", type=Path, default=Path("runs/validate"),
                   help="where every result goes, and where a later call resumes from (default: runs/validate)")
    p.add_argument("--predict-only", action="store_true",
                   help="no engine: predict and report everything OUT holds (any machine); rewrites OUT's "
                        "validation.csv, summary.txt and sim/, which record the profile used")
    p.add_argument("--deadline-s", type=positive_float,
                   help="start no measurement round, and no slice's calibration, that would end later than this "
                        "many seconds (> 0) into the call (a calibration is taken to last as long as the slice's "
                        f"previous one, {UNKNOWN_CALIBRATION_S:.0f} s without one); the slices measured share the "
                        "time left equally (default: the scenario's deadline_s)")
    p.add_argument("--calibration-steps", type=_calibration_steps, default=48,
                   help="tokens per calibration pattern run (at least 2: the first step is left out of every fit)")
    p.add_argument("--corpus", help="the text corpus live slices take their prompts from (replaces the scenario's)")
    p.add_argument("--timelines", metavar="SLICE[,SLICE]",
                   help="no engine, no report: compare the per-layer timelines of both clocks for these slices "
                        "(validation.timelines) from what OUT stores -> OUT/timelines_<slice>.csv (any machine)")
    p.add_argument("--profile", type=Path, help="predict with this profile instead of the one fitted from OUT's "
                                                "calibration (e.g. one merged from several calls' calibrations); the "
                                                "report names it (summary's first line, validation.csv's profile "
                                                "columns)")
    return p.parse_args(argv)


class Inputs:
    """A slice's inputs kept under OUT/engine/<slice>/inputs, so the simulator can replay a live slice's
    recorded decode on any machine."""

    FILES = ("inputs.json", "timed.npz", "train.npz")

    def __init__(self, store: Store, slice_name: str):
        self.store = store
        self.folder = store.out / "engine" / slice_name / "inputs"

    def save(self, inputs: SliceInputs) -> None:
        # the simulator replays routing and prediction tracks; hidden states (megabytes) stay out
        bare = {"hidden_states": None, "hidden_token_index": None}
        save_trace(dataclasses.replace(inputs.timed, **bare), self.folder / "timed.npz")
        save_trace(dataclasses.replace(inputs.train, **bare), self.folder / "train.npz")
        atomic_write(self.folder / "inputs.json", lambda f: json.dump(
            {"model_id": inputs.model_id, "mask": inputs.mask.astype(int).tolist(), "gate_digest": inputs.gate_digest},
            f))
        self.store.damaged -= {self.folder / name for name in self.FILES}     # rewritten whole

    def load(self) -> SliceInputs | None:
        """The stored inputs; None when one of their files is missing or damaged (``Store.damaged``): the slice's
        next measuring call stores them again."""
        files = [self.folder / name for name in self.FILES]
        if not all(f.is_file() and f not in self.store.damaged for f in files):
            return None
        meta = self.store.read(self.folder / "inputs.json")
        timed, train = load_trace(self.folder / "timed.npz"), load_trace(self.folder / "train.npz")
        # a live decode's requests are in its traces' metadata: they key its results as when measured
        return SliceInputs(timed.model, timed, train, meta["model_id"], np.asarray(meta["mask"], dtype=bool),
                           prompts=timed.meta.extra.get("prompts"), new_tokens=timed.meta.extra.get("new_tokens", 0),
                           train_prompts=train.meta.extra.get("prompts"), gate_digest=meta.get("gate_digest"))


class NotCalibrated(Exception):
    """OUT holds no calibration to fit a profile from; the message says what to run."""


def fitted_name(device_name: str) -> str:
    """The name of the profile fitted from calibrations on ``device_name`` (OUT/<name>.yaml)."""
    return profile_name(device_name) if device_name != "cpu" else "cpu-measured"


def calibrated_profile(store: Store, scenario: Scenario, device_name: str, write: bool = True) -> tuple[object, dict]:
    """The profile fitted from every calibration OUT holds (written to OUT/<name>.yaml unless ``write`` is
    False), and the fit's notes. A model the profile already in OUT measured but whose raw calibration OUT does
    not hold (one merged from several calls) keeps its entry, and the notes say so."""
    import yaml
    folder = store.out / "calibration"
    copies = store.read(folder / "copies.json")
    calibrations = [store.read(p) for p in sorted(folder.glob("*.json")) if p.name != "copies.json"]
    calibrations = [c for c in calibrations if c is not None]       # a damaged one: the slice is calibrated again
    if copies is None or not calibrations:
        raise NotCalibrated(f"{folder} holds no calibration yet: measure first (python -m experiments.validate "
                            f"--out {store.out}, without --predict-only or --timelines, on the machine to model)")
    name = fitted_name(device_name)
    data, notes = fit_profile(load_hardware(scenario.hardware), name, device_name, copies, calibrations)
    existing = store.out / f"{name}.yaml"
    if existing.is_file():
        kept = {model: entry for model, entry in (safe_load_unique(existing.read_text()).get("measured_compute") or {}).items()
                if model not in data["measured_compute"]}
        data["measured_compute"].update(kept)
        notes.update({model: {"kept": f"from the profile already in {existing} (no raw calibration in OUT)"}
                      for model in kept})
    if write:
        atomic_write(store.out / f"{name}.yaml", lambda f: yaml.safe_dump(data, f, sort_keys=False))
        atomic_write(store.out / "profile_fit_notes.json", lambda f: json.dump(notes, f, indent=1))
    return hardware_from_dict(data, origin=str(store.out / f"{name}.yaml")), notes


def slice_deadline(deadline: float, elapsed: float, slices_left: int) -> float:
    """The deadline (s after the call started) of the slice starting ``elapsed`` s into a call with ``deadline``
    and ``slices_left`` slices to measure, this one included: an equal share of the time left, so the last
    slice gets all of it and time a slice leaves unused goes to the ones after it (each share is taken as its
    slice starts); ``deadline`` itself once that has passed."""
    return min(deadline, elapsed + (deadline - elapsed) / slices_left)


def calibration_estimate(previous: dict | None) -> tuple[float, str]:
    """(the seconds a slice's calibration is taken to need, why): the duration its previous calibration recorded
    (``previous``, one of other code or inputs), else ``UNKNOWN_CALIBRATION_S``, saying so."""
    if previous is not None and previous.get("wall_s") is not None:
        return float(previous["wall_s"]), f"its previous calibration took {previous['wall_s']:.0f} s"
    return UNKNOWN_CALIBRATION_S, (f"it has no calibration in OUT to go by, so it is taken to need "
                                   f"{UNKNOWN_CALIBRATION_S:.0f} s (a conservative guess: the H200's took 21-87 s; "
                                   f"a --deadline-s above it lets its first calibration start)")


def untimed(m: SliceMeasurement) -> int:
    """Configurations of ``m``'s slice with measured runs in OUT but no timed run yet (for its inputs, prepared
    or set)."""
    missing = m.missing()
    return sum(missing[c] < m.repeats and not m.store.path("engine", m.sl.name, key, "-timed.npz").is_file()
               for c, key in m.keys().items())


def _kernel_path() -> dict | None:
    """The engine's kernel path on this machine's device where the environment switches it from the defaults
    (``real.bench.args.switched_kernel_path``), in every engine result's and calibration's key; None: the defaults."""
    return switched_kernel_path("cuda" if torch.cuda.is_available() else "cpu")


def to_measure(slices, store: Store, repeats: int) -> set[str]:
    """The names of ``slices`` that still lack runs or timed runs in ``store``, judged without building anything
    on the inputs a report finds (``slice_inputs``: a live slice's as stored, since preparing them decodes its
    model). A live slice whose checkpoint or corpus changed since its inputs were stored counts as done here: it
    is measured all the same, in the time the slices before it leave."""
    pending = set()
    for sl in slices:
        inputs = slice_inputs(sl, store)
        if inputs is None:
            pending.add(sl.name)
            continue
        m = SliceMeasurement(sl, store, repeats, torch.device("cpu"), torch.float32, _kernel_path())
        m.inputs = inputs
        if any(m.missing().values()) or untimed(m):
            pending.add(sl.name)
    return pending


def _calibration_steps(text: str) -> int:
    """--calibration-steps: an integer >= 2 (the fit leaves out each pattern's first step)."""
    steps = positive_int(text)          # the engine commands' integer check and its words
    if steps < 2:
        raise argparse.ArgumentTypeError(f"{steps}: the fit leaves out each pattern's first step, so a pattern "
                                         f"needs at least 2; use the default 48 or more")
    return steps


def measure(scenario: Scenario, slices, store: Store, args, started: float) -> tuple[list[str], list[str]]:
    """Calibrate and measure ``slices`` into ``store``; returns (one line per failure of this call (a policy's
    calibration, a configuration's runs), each naming where it left the policy and its traceback's file; one
    line per slice the deadline left incomplete, saying why). Under a deadline the slices with something left
    to measure share the time left equally (``slice_deadline``), calibration included."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cpu_threads(device.type)
    measure_copy_table(store, device)      # first: a folder of another device's is refused before anything changes
    path = Path(scenario.path).resolve()   # a name where it is one of ours, else the file's absolute path
    recorded = path.stem if path.parent == SCENARIOS_DIR.resolve() else str(path)
    atomic_write(store.out / SCENARIO_FILE, lambda f: f.write(f"{recorded}\n"))
    deadline = args.deadline_s if args.deadline_s is not None else scenario.deadline_s
    pending = to_measure(slices, store, scenario.repeats) if deadline is not None else set()
    problems, incomplete = [], []
    for i, sl in enumerate(slices):
        if not cuda:
            print(f"{sl.name}: on a CPU the engine copies synchronously, which the simulator does not model: "
                  f"this run checks the path, its errors mean nothing", flush=True)
        share = deadline
        if deadline is not None:
            elapsed = time.monotonic() - started
            if elapsed > deadline:
                print(f"{sl.name}: not started, past the deadline of {deadline:.0f} s (run again to resume)",
                      flush=True)
                if sl.name in pending:
                    incomplete.append(f"{sl.name}: not started, past the deadline of {deadline:.0f} s")
                continue
            n_left = 1 + sum(later.name in pending for later in slices[i + 1:])
            share = slice_deadline(deadline, elapsed, n_left)
            print(f"{sl.name}: this call's share of the deadline: until {share:.0f} s (of {deadline:.0f} s; "
                  f"{n_left} slice{'s' if n_left > 1 else ''} left)", flush=True)
        m = SliceMeasurement(sl, store, scenario.repeats, device, dtype, _kernel_path())
        Inputs(store, sl.name).save(m.prepare())
        if deadline is not None and m.stored_calibration(args.calibration_steps) is None:
            need, basis = calibration_estimate(store.read(store.calibration_path(sl.name)))
            left = deadline - (time.monotonic() - started)
            if need > left:     # a calibration is not cut by the deadline: it is not started
                skipped = (f"{sl.name}: calibration not started (nor its runs): {basis}, and {max(left, 0):.0f} s are "
                           f"left of the deadline of {deadline:.0f} s")
                print(f"{skipped} (run again to resume)", flush=True)
                incomplete.append(skipped)
                continue
        calibration = m.calibrate(args.calibration_steps)
        problems += [f"{sl.name}: calibration of {what} failed ({line})" for what, line in calibration["failed"].items()]
        profile, _ = calibrated_profile(store, scenario, torch.cuda.get_device_name(device) if cuda else "cpu")
        measured = m.measure(profile, share, started)
        problems += run_problems(measured) if measured is not None else []
        if measured is not None and "stopped" in measured.info:
            incomplete.append(f"{sl.name}: measurement stopped {measured.info['stopped']}")
        elif share is not None and time.monotonic() - started > share and (n := untimed(m)):
            incomplete.append(f"{sl.name}: {n} timed runs not made, past its share of the deadline ({share:.0f} s)")
        del m
        if cuda:
            torch.cuda.empty_cache()
    return problems, incomplete


def slice_inputs(sl, store: Store) -> SliceInputs | None:
    """What the engine decoded for ``sl`` (stored, or for a replay rebuilt from the scenario), None before it ran."""
    inputs = Inputs(store, sl.name).load()
    if inputs is None and sl.mode == "replay" and store.engine_results(sl.name):
        inputs = replay_inputs(sl)          # a replay's inputs follow from the scenario and the repository
    return inputs


def timelines(scenario: Scenario, slices, store: Store, profile_path: Path | None = None) -> int:
    """--timelines: both clocks' per-layer timelines of every configuration with a timed engine run, with the
    profile the comparison uses (``validation.timelines``); OUT/timelines_<slice>.csv and a table per slice."""
    from validation import timelines as tl
    profile, *_ = comparison_profile(store, scenario, profile_path, write=False)
    for sl in slices:
        inputs = slice_inputs(sl, store)
        if inputs is None:
            print(f"{sl.name}: not measured yet in {store.out}", flush=True)
            continue
        configs, notes = tl.compare_slice(sl, inputs, profile, store, _kernel_path())
        calibration, extra = tl.calibration_configs(sl, store, profile)
        configs += calibration
        if configs:
            path = tl.write(configs, store.out, sl.name)
            print(f"\n{sl.name} ({inputs.shape.name}, profile {profile.name}): per-layer timelines, engine's timed "
                  f"run against the simulator -> {path}\n{tl.compact(configs, extra)}", flush=True)
        for note in notes:
            print(note, flush=True)
    return 0


def measured_device(store: Store) -> str:
    """The device OUT's results were measured on, as its copy table names it ("cpu" before it holds one)."""
    return (store.read(store.out / "calibration" / "copies.json") or {}).get("device", "cpu")


def comparison_profile(store: Store, scenario: Scenario, profile_path: Path | None, write: bool = True):
    """(the profile a report predicts with, the device OUT measured or None, its file, the fit's notes per model):
    ``--profile`` when given (no notes), else the fit of OUT's calibrations (``calibrated_profile``) for the device
    its copy table names, in OUT/<name>.yaml (written there unless ``write`` is False)."""
    if profile_path is not None:
        return load_hardware(profile_path), None, profile_file(profile_path), {}
    device = measured_device(store)
    profile, notes = calibrated_profile(store, scenario, device, write=write)
    return profile, device, store.out / f"{profile.name}.yaml", notes


def _clamped_note(model_notes: dict, shape, checked: dict) -> str:
    """The calibration line's note on the per-layer constants that came out negative and were kept at 0 by
    enough to show (``clamped_constants``): the patterns they were fitted on are then predicted slower than
    measured. Kernels timed alone slower than the steps that run them is a machine whose speed changed between
    the micro-benchmarks (a shared CPU)."""
    clamped = clamped_constants(model_notes, shape.num_layers,
                                {name: measured for name, (_, measured) in checked.items()})
    return (f"; fitted below 0 and kept at 0: {', '.join(clamped)} (the steps ran faster than their parts timed "
            f"alone: a machine whose speed changed while they ran, or an overlap the model lacks; on a shared "
            f"machine, re-measure on a quiet one)" if clamped else "")


def profile_record(profile, path: Path, out: Path, given: bool) -> dict[str, str]:
    """What a report records of the profile it predicted with (validation.csv's ``profile`` columns, the summary's
    first line, each prediction in sim/): its name, its file (relative to OUT when it lies in OUT, so a copied
    bundle records the same; else absolute), the file's sha256, and whether --profile gave it."""
    resolved = path.resolve()
    inside = resolved.is_relative_to(out.resolve())
    return {"profile": profile.name,
            "profile_file": resolved.relative_to(out.resolve()).as_posix() if inside else str(resolved),
            "profile_sha256": file_sha256(resolved), "profile_from": "--profile" if given else "fitted"}


def profile_line(record: dict[str, str]) -> str:
    """The summary's first line: which profile made these predictions."""
    where = (f"--profile {record['profile_file']}" if record["profile_from"] == "--profile" else
             f"{record['profile_file']} in OUT, fitted from OUT's calibrations")
    return f"profile: {record['profile']} ({where}; sha256 {record['profile_sha256']})"


def compare(scenario: Scenario, slices, store: Store, profile_path: Path | None = None) -> pd.DataFrame:
    profile, device, path, fit_notes = comparison_profile(store, scenario, profile_path)
    record = profile_record(profile, path, store.out, given=profile_path is not None)
    pairs, notes, host_ms = [], [], {}
    now_files, kernels = engine_files(), _kernel_path()
    for sl in slices:
        inputs = slice_inputs(sl, store)
        if inputs is None:
            notes.append(f"{sl.name}: not measured yet")
            continue
        note = fallback_note(profile, inputs.shape, sl.precision)
        if note:
            print(note, flush=True)
            notes.append(f"{sl.name}: {note}")
        calibration = store.read(store.calibration_path(sl.name))
        host_ms[sl.name] = report.calibration_host_ms(calibration)
        checked = pattern_check(calibration, profile) if calibration is not None and not note else {}
        if checked:
            notes.append(f"{sl.name}: calibration patterns' median step, simulator against engine: " + ", ".join(
                f"{name} {predicted:.3f} / {measured:.3f} ms ({100 * (predicted / measured - 1):+.1f} %)"
                for name, (predicted, measured) in checked.items()) + (
                "; alternate (a hit layer after each miss layer) is held out of the fit" if "alternate" in checked
                else "") + _clamped_note(fit_notes.get(inputs.shape.name, {}), inputs.shape, checked) + ("; a live slice's layer overhead comes from its own decode, not from these forced "
                            "patterns" if sl.mode == "live" else ""))
        earlier, changed, result_notes = 0, set(), set()
        for policy in sl.policies:
            for slots in sl.cache_slots:
                result, other_code = stored_result(sl, inputs, store, policy, slots, kernels)
                earlier += other_code
                if other_code:
                    files = changed_files((result or {}).get("engine_files"), now_files)
                    changed |= {"(files not recorded: measured before the record existed)"} if files is None \
                        else set(files) or {"(none: a policy's source, the slice's inputs or a gate differ)"}
                    if result.get("note"):
                        result_notes.add(result["note"])
                if result is None or not (result.get("summary") or any(not r.get("error") for r in result["runs"])):
                    errors = [r["error"] for r in (result or {}).get("runs", []) if r.get("error")]
                    notes.append(f"{sl.name}: {policy} at {slots} slots " + (
                        f"failed in all {len(errors)} runs ({errors[-1]})" if errors else "not measured yet"))
                    continue
                # its parameters as the slice gives them (a result from before they were recorded, or of another
                # checkout, is one measured at them: stored_result takes no result recorded at others)
                labelled = {**result, "policy_params": sl.params_of(policy)}
                pairs.append((labelled, predict(sl, inputs, result, profile, store, record)))
        if earlier:
            shown = sorted(changed)
            notes.append(f"{sl.name}: {earlier} configurations whose key this checkout does not reproduce (the engine's "
                         f"code, a policy's source, the slice's inputs or a gate differ since their runs; reported as "
                         f"measured); engine files changed since their runs: "
                         + ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
                         + "".join(f"; {note}" for note in sorted(result_notes)))
    table = report.rows(pairs, host_ms)
    if not table.empty:
        table = table.assign(**record)
    out = store.out
    atomic_write(out / "validation.csv", lambda f: table.to_csv(f, index=False))
    floor_rows = []
    for result, _ in pairs:
        m = report.measured(result)
        causes = [r.get("causes", "") for r in result["runs"] if r.get("causes")]
        floor_rows.append({"slice": result["slice"], "policy": result["policy"],
                           "policy_label": report.policy_label(result["policy"], result.get("policy_params")),
                           "cache_slots": result["cache_slots"],
                           "runs": m["runs"], "median_tokens_per_s": m["tokens_per_s"], "spread_pct": m["floor"],
                           "run_causes": " ".join(causes), "raw_runs": bool(result["runs"])})
    atomic_write(out / "noise_floor.csv", lambda f: pd.DataFrame(floor_rows).to_csv(f, index=False))
    if device == "cpu":
        notes.append("measured on a CPU, the smoke path: there the engine copies synchronously, which the simulator "
                     "does not model; these errors check that the path runs and say nothing of the simulator's accuracy")
    text = report.summary(table, notes, heading=[profile_line(record)])
    atomic_write(out / "summary.txt", lambda f: f.write(text))
    if not table.empty:
        plot_validation(table, out / "validation.png")
    print(text, flush=True)
    return table


def _interrupted(signum, frame):
    raise KeyboardInterrupt


SCENARIO_FILE = "scenario.txt"      # in OUT: the scenario its results were measured under
# what a call writes into OUT under fixed names, besides the fitted profile (``fitted_name``) and --timelines'
# OUT/timelines_<slice>.csv: one of the wrong kind already there would fail its write after the work
REPORT_FILES = ("validation.csv", "summary.txt", "validation.png", "noise_floor.csv", "profile_fit_notes.json",
                SCENARIO_FILE)
STORE_FOLDERS = ("calibration", "engine", "sim")


def outputs_problem(out: Path, files: list[str]) -> str | None:
    """Why a call could not write one of ``files`` (names in ``out``) or keep its store's folders there, found
    before any work starts (``traces.io.output_problem``, as the engine commands check their --out): a folder
    where a file goes, a file where a folder goes; None when there is none."""
    for name in files:
        if (out / name).is_dir():
            return f"{out / name} is a folder where validate writes a file; move it away, or give another --out"
    for name in STORE_FOLDERS:
        if (problem := output_problem(out / name)) is not None:
            return f"{problem.split(';')[0]} where validate keeps its results; move it away, or give another --out"
    return None


def stored_problems(store: Store, slices, timelines: bool, measuring: bool) -> list[str]:
    """Damaged files in ``store`` (``validation.store.damaged_files``: stored JSON, a live slice's stored inputs,
    the timed runs of ``slices``: those measured, or compared by --timelines), named before anything runs; returns
    the error lines of those the call refuses, and takes care of the others, saying so on stdout, one line each.
    A prediction (sim/) is read as absent: predicted again, which rewrites it. A measuring call reads an engine
    result, a calibration or a slice's inputs as absent, so it measures them again and rewrites them (as the sweep
    recomputes a damaged row); a damaged timed run it removes (the run is made again only where none is). A report
    or a timeline comparison, which cannot measure, refuses them, naming each to delete (nothing is lost: it is
    unreadable, and the measuring call after that measures it again); --timelines only those of its slices (and
    the calibrations its profile is fitted from). A damaged copy table is refused by every call: it names the
    device OUT's results come from."""
    if not store.out.is_dir():
        return []
    out, names = store.out, {sl.name for sl in slices}
    traces = ("engine/*/inputs/*.npz", *(f"engine/{name}/*-timed.npz" for name in sorted(names)))
    refused = []
    for path, problem in damaged_files(out, traces).items():
        parts = path.relative_to(out).parts
        if timelines and parts[0] != "calibration" and parts[1] not in names:
            continue                # not read by this call
        if parts[0] == "sim" or (measuring and path.name != "copies.json"):
            if path.name.endswith("-timed.npz"):
                path.unlink()
                done = "removed (unreadable: nothing is lost); a measuring call of its slice makes the timed run again"
            else:
                store.damaged.add(path)
                done = ("read as not measured: a measuring call of its slice measures it again, which rewrites it"
                        if parts[0] != "sim" else "read as not predicted: " + (
                            "--predict-only predicts it again, which rewrites it" if timelines else
                            "predicted again, which rewrites it"))
            print(f"validate: damaged: {path}: {problem}; {done}", flush=True)
        else:
            refused.append(f"{path}: {problem}; delete it, then measure it again (python -m experiments.validate "
                           f"--out {out}, without --predict-only or --timelines: what else OUT holds is kept)")
    return refused


def held_calibrations(out: Path) -> bool:
    """Whether ``out`` holds a slice's calibration (a report needs one to fit its profile)."""
    return any(p.stem != "copies" for p in (out / "calibration").glob("*.json"))


def held_slices(out: Path) -> set[str]:
    """The slices ``out`` holds engine results or a calibration of."""
    held = {p.name for p in (out / "engine").glob("*") if p.is_dir()}
    return held | {p.stem for p in (out / "calibration").glob("*.json") if p.stem != "copies"}


def stored_scenario(out: Path) -> str | None:
    """The scenario ``out``'s results belong to: the one its measuring call recorded (``SCENARIO_FILE``), else,
    for a store from before that record, the single scenario in experiments/configs whose slices include every
    slice ``out`` holds results of; None for an empty or new folder, or when no single scenario fits."""
    recorded = out / SCENARIO_FILE
    if recorded.is_file():
        return recorded.read_text().strip() or None
    held = held_slices(out)
    if not held:
        return None
    fits = []
    for path in sorted(SCENARIOS_DIR.glob("validate-*.yaml")):
        try:
            if held <= {sl.name for sl in load_scenario(path).slices}:
                fits.append(path.stem)
        except ScenarioError:
            continue
    return fits[0] if len(fits) == 1 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    name = args.scenario
    if name is None and args.out.is_dir():
        name = stored_scenario(args.out)
        if name is not None:
            print(f"validate: {args.out} holds results of scenario {name} (no --scenario given)", flush=True)
    name = name or ("validate-h200" if torch.cuda.is_available() else "validate-smoke")
    if (problem := output_problem(args.out)) is not None:     # a file in the way, or nowhere to write
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _main(args, name, started)
    except KeyboardInterrupt:
        print(f"validate: interrupted; every finished run is kept in {args.out}: run the same command again to "
              f"resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args, name: str, started: float) -> int:
    if (args.predict_only or args.timelines) and not args.out.is_dir():
        # nothing to report or compare: a folder made here would only be an empty one
        what = "--predict-only reports" if args.predict_only else "--timelines compares"
        print(f"error: --out {args.out}: no such folder; {what} what a measuring call stored there: give that "
              f"folder, or measure first (python -m experiments.validate --out {args.out})", file=sys.stderr)
        return 2
    if args.slices and (args.predict_only or args.timelines):
        # a report covers every slice OUT holds: one of some slices would replace the bundle's summary with a part
        print(f"error: --slices with --predict-only: a report re-predicts every slice {args.out} holds (one of some "
              f"slices would replace its summary with a part); drop --slices (one slice's comparison: --timelines "
              f"SLICE)" if args.predict_only else
              "error: --slices with --timelines: name the slices in --timelines SLICE[,SLICE]", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(name)
        slices = scenario.select(args.slices.split(",") if args.slices else None)
        if args.corpus:
            slices = tuple(dataclasses.replace(s, corpus=args.corpus) if s.mode == "live" else s for s in slices)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = Store(args.out)
    held = held_slices(args.out)
    if held and not held & {sl.name for sl in scenario.slices}:
        # a report of this scenario would find nothing of it here, and overwrite the folder's own report
        print(f"error: {args.out} holds results of slices {sorted(held)}, none of them in scenario {scenario.path}; "
              f"pass the scenario they were measured under (--scenario), or a new --out", file=sys.stderr)
        return 2
    try:
        chosen = scenario.select(args.timelines.split(",")) if args.timelines else None
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measuring = not (args.predict_only or args.timelines)
    found = []
    if measuring:
        # every slice's trace, checkpoint, corpus, gate and host memory, before a device spends minutes on the first
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        found = input_problems(slices, device_type, scenario.path)
        switch = kernel_switch_error(device_type)
        if switch:
            found = [switch, *found]
    # then OUT: its damaged files, and what it writes, before anything is measured or written
    # (a measuring call with bad inputs stops here: the store's damaged files it would mend are left as they are)
    refused = [] if found else stored_problems(store, chosen if chosen is not None else slices if measuring else (),
                                               timelines=chosen is not None, measuring=measuring)
    found += refused
    written = [f"timelines_{sl.name}.csv" for sl in chosen] if chosen is not None else list(REPORT_FILES)
    if chosen is None and args.profile is None and not refused:     # the profile fitted for the device OUT measured
        device = measured_device(store) if args.predict_only else \
            torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        written.append(f"{fitted_name(device)}.yaml")
    if (problem := outputs_problem(args.out, written)) is not None:
        found.append(f"--out {args.out}: {problem}")
    if found:
        print("\n".join(f"error: {line}" for line in found), file=sys.stderr)
        return 2
    if chosen is not None:
        try:
            return timelines(scenario, chosen, store, args.profile)
        except (HardwareProfileError, NotCalibrated) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"validate: scenario {scenario.path} ({', '.join(s.name for s in slices)}) -> {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    problems, incomplete = [], []
    if not args.predict_only:
        try:
            problems, incomplete = measure(scenario, slices, store, args, started)
        except OtherMachineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.predict_only or args.profile is not None or held_calibrations(args.out):
        try:        # the report covers every slice OUT holds results of, whichever were measured now
            compare(scenario, scenario.slices, store, args.profile)
        except (HardwareProfileError, NotCalibrated) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"-> {args.out}/validation.csv, summary.txt, validation.png ({time.monotonic() - started:.0f} s)",
              flush=True)
    else:       # the deadline left every slice uncalibrated: nothing to predict with yet
        print(f"validate: no slice calibrated in {args.out} yet, so no report ({time.monotonic() - started:.0f} s)",
              flush=True)
    for line in incomplete:
        print(f"validate: incomplete: {line}; run the same command again to resume it", flush=True)
    if problems:        # the report holds what did run; the call still fails, naming what did not
        print(exit_message(problems, args.out), file=sys.stderr)
        return 1
    return INCOMPLETE_EXIT if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
