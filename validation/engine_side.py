"""A slice of the validation grid measured on the engine: the model built once, its calibration
micro-benchmarks (``real.calibration``), then every configuration still missing runs, measured with the
discipline of ``real.measurement`` (warm-up until steady, repeats interleaved round-robin, every run's
disturbances recorded), and one more run per configuration with per-layer timings recorded, kept as a
trace (``OUT/engine/<slice>/<key>-timed.npz``) for the timeline comparison.

Both clocks see the same inputs: the steps the engine timed, as a trace (``SliceInputs.timed``: a replay's
forced routing, or a live model's recorded decode with its prediction tracks), and the same separate
training slice (``SliceInputs.train``) for ``static`` and ``affinity``.
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hardware.profile import HardwareProfile
from offload.predictors import policy_depth
from policies.registry import policy_sha256, resolve_policy
from real.bench.engine_runs import EngineRuns, error_files
from real.calibration import calibrate_model, calibrate_policies
from real.engine import OffloadEngine
from real.measurement import Config, Discipline, Measurement, Report
from real.record import routing_trace
from real.shape_model import random_model
from traces import Trace, load_trace, save_trace
from traces.digest import digest_files, file_sha256
from validation.profile_fit import copy_table
from validation.scenario import Slice
from validation.store import Store, calibration_code, digest, engine_code, engine_files


@dataclass
class SliceInputs:
    """What a slice's runs decode. ``timed``: the decoded steps the engine times, as a trace (the simulator
    replays exactly these); ``mask``: which steps of the engine's decode are timed (a live run's prompt
    steps are not); ``train``: what ``static`` and ``affinity`` learn from in both clocks; ``model_id``:
    what the weights are (a digest); ``prompts``/``new_tokens``: a live run's requests."""
    shape: object
    timed: Trace
    train: Trace
    model_id: str
    mask: np.ndarray
    prompts: list[list[int]] | None = None
    new_tokens: int = 0
    train_prompts: list[list[int]] | None = None   # live: the training text (calibration decodes it)
    predictors_at: object = None          # live: depth -> {name: live predictor}
    gate_digest: str | None = None        # live: the lookahead gate's files (kept: --predict-only has no gate)


def replay_inputs(sl: Slice) -> SliceInputs:
    """A replay slice's steps: the trace cut to the slice's shape, its leading ``train_fraction`` of
    requests the training slice, then the first ``max_tokens`` tokens of the rest."""
    shape = sl.model_shape()
    trace = load_trace(sl.trace).for_shape(shape)
    train, rest = trace.split(sl.train_fraction)
    timed = rest.first_tokens(sl.max_tokens)
    return SliceInputs(shape, timed, train, f"random-weights:{shape.name}:seed0", np.ones(timed.num_tokens, bool))


def engine_key(sl: Slice, inputs: SliceInputs, policy: str, slots: int, kernel_path: dict | None = None) -> str:
    """Everything an engine result depends on besides the machine: the slice's settings, the inputs'
    content, the policy's source, the engine's code and, when the environment switches it from the defaults,
    the engine's kernel path (``real.bench.args.switched_kernel_path``; None: the defaults, the keys of results
    measured before it was recorded)."""
    # paths enter by their content only (the same files found from another directory are the same inputs)
    paths = ("trace", "shape", "model", "corpus", "gate")
    fields = {k: v for k, v in dataclasses.asdict(sl).items()
              if k not in ("policies", "cache_slots", "name", "policy_params", *paths)}
    if sl.params_of(policy):     # (only where given: the keys of results measured before parameters existed hold)
        fields["policy_params"] = sorted(sl.params_of(policy).items())
    if kernel_path:             # (likewise)
        fields["kernel_path"] = kernel_path
    trace = file_sha256(sl.trace) if sl.trace else None
    gate = None
    if sl.gate:
        gate = digest_files(sorted(Path(sl.gate).glob("*"))) if Path(sl.gate).is_dir() else inputs.gate_digest
    return digest({"slice": fields, "shape": inputs.shape.to_dict(), "trace": trace, "model": inputs.model_id,
                   "prompts": inputs.prompts, "gate": gate, "policy": Path(policy).name if ".py:" in policy else policy,
                   "policy_source": policy_sha256(policy), "cache_slots": slots, "code": engine_code()})


def stored_result(sl: Slice, inputs: SliceInputs, store: Store, policy: str, slots: int,
                  kernel_path: dict | None = None) -> tuple[dict | None, bool]:
    """(the engine result a report takes for one configuration, whether it came from other engine code): the one
    keyed by this checkout, else the most recently written one of the same inputs and policy parameters (its key
    differs when the engine's code changed since: still the measurement of these inputs; a result from before the
    parameters were recorded is taken as measured at the slice's); (None, False) when there is none.
    ``kernel_path``: as ``engine_key``'s (a result of another kernel path counts as other engine code)."""
    found = store.read(store.path("engine", sl.name, engine_key(sl, inputs, policy, slots, kernel_path)))
    if found is not None:
        return found, False
    params = sl.params_of(policy)
    for result in store.engine_results(sl.name):     # the last written first
        if (result.get("policy"), result.get("cache_slots")) == (policy, slots) and \
                result.get("model_id", inputs.model_id) == inputs.model_id and \
                result.get("policy_params", params) == params:
            return result, True
    return None, False


def _ok_runs(result: dict | None) -> list[dict]:
    return [r for r in (result or {}).get("runs", []) if not r.get("error")]


class SliceMeasurement:
    """Measures one slice (module docstring) into ``store``; ``measure(hardware, ...)`` takes the profile the
    engine's predictive policies read their copy/compute estimates from (None: no depth limit).
    ``kernel_path``: the engine's kernel path where the environment switches it (``engine_key``), in the keys of
    its results and calibration."""

    def __init__(self, sl: Slice, store: Store, repeats: int, device: torch.device, dtype: torch.dtype,
                 kernel_path: dict | None = None):
        self.sl, self.store, self.repeats = sl, store, repeats
        self.kernel_path = kernel_path
        self.device, self.dtype = device, dtype
        self.model = None
        self.inputs: SliceInputs | None = None

    # -- inputs and the model ----------------------------------------------------------------------------
    def prepare(self) -> SliceInputs:
        if self.inputs is None:
            if self.sl.mode == "replay":
                self.inputs = replay_inputs(self.sl)
            else:
                from validation.live import live_inputs     # a trained checkpoint, its tracks and prompts
                self.model, self.inputs = live_inputs(self.sl, self.device, self.dtype)
        return self.inputs

    def build_model(self):
        if self.model is None:
            inputs = self.prepare()
            starts = inputs.timed.request_starts
            longest = int(np.diff(starts).max())
            began = time.monotonic()
            self.model = random_model(inputs.shape, self.device, self.dtype, max_len=max(longest + 1, 1040))
            print(f"{self.sl.name}: random-weight {inputs.shape.name} built in {time.monotonic() - began:.1f} s",
                  flush=True)
        return self.model

    def keys(self) -> dict[tuple[str, int], str]:
        inputs = self.prepare()
        return {(p, s): engine_key(self.sl, inputs, p, s, self.kernel_path) for p in self.sl.policies
                for s in self.sl.cache_slots}

    def missing(self) -> dict[tuple[str, int], int]:
        """Measured runs still missing per configuration (its timed run is checked apart)."""
        return {c: max(0, self.repeats - len(_ok_runs(self.store.read(self.store.path("engine", self.sl.name, key)))))
                for c, key in self.keys().items()}

    # -- calibration ---------------------------------------------------------------------------------------
    def calibration_key(self, steps: int) -> str:
        """What the slice's calibration depends on: its inputs, settings, device and code."""
        inputs = self.prepare()
        # the engine's code and the calibration's own: the calibration measures the engine (an engine change
        # re-calibrates)
        fields = {"shape": inputs.shape.to_dict(), "model": inputs.model_id, "steps": steps,
                  "policies": list(self.sl.policies), "precision": self.sl.precision,
                  "device": _device_name(self.device), "code": calibration_code()}
        if self.kernel_path:        # (only where switched: the keys of earlier calibrations hold)
            fields["kernel_path"] = self.kernel_path
        # a user's policy file is in no package's digest: its source too (a fixed policy re-calibrates)
        users = {p: policy_sha256(p) for p in self.sl.policies if ".py:" in p}
        return digest({**fields, "user_policies": users} if users else fields)

    def stored_calibration(self, steps: int) -> dict | None:
        """The slice's calibration in OUT when it is this one's (same key), else None: one must be made."""
        found = self.store.read(self.store.calibration_path(self.sl.name))
        return found if found is not None and found.get("key") == self.calibration_key(steps) else None

    def calibrate(self, steps: int) -> dict:
        """The slice's micro-benchmarks (``real.calibration``), measured once and stored."""
        path = self.store.calibration_path(self.sl.name)
        inputs = self.prepare()
        found = self.stored_calibration(steps)
        if found is not None:
            return found
        key = self.calibration_key(steps)
        model = self.build_model()
        began = time.monotonic()
        raw = calibrate_model(model, inputs.shape, steps=steps, live_prompts=inputs.train_prompts,
                              new_tokens=inputs.new_tokens)
        # each policy's host work per layer, and its all-resident step beside LRU's, on the training slice
        # (never the validated steps)
        decisions, failed = calibrate_policies(model, inputs.shape, self.sl.policies, self.sl.settings,
                                               min(self.sl.cache_slots), inputs.train, self.sl.prefetch_depth,
                                               inputs.predictors_at, inputs.train_prompts, inputs.new_tokens,
                                               on_error=error_files(self.store.out))
        found = {"key": key, "slice": self.sl.name, "shape": inputs.shape.to_dict(), "precision": self.sl.precision,
                 "device": _device_name(self.device), **raw, "decisions": decisions, "failed": failed,
                 "wall_s": round(time.monotonic() - began, 1)}
        self.store.write(path, found)
        print(f"{self.sl.name}: calibrated in {found['wall_s']} s", flush=True)
        return found

    # -- the grid --------------------------------------------------------------------------------------------
    def engine_for(self, config: Config, hardware: HardwareProfile | None, record: bool = False) -> OffloadEngine:
        inputs, sl = self.prepare(), self.sl
        cls = resolve_policy(config.fields["policy"])
        predictors = inputs.predictors_at(policy_depth(cls, sl.prefetch_depth)) if inputs.predictors_at else None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return OffloadEngine(self.model, inputs.shape, cls, sl.settings(config.fields["cache_slots"], config.fields["policy"]),
                             hardware=hardware, future=inputs.timed, train_trace=inputs.train,
                             predictors=predictors, record_layer_timings=record)

    def decode(self, engine: OffloadEngine, warmup: bool):
        inputs, sl = self.prepare(), self.sl
        if inputs.prompts is not None:
            prompts = inputs.prompts[:1] if warmup else inputs.prompts
            return engine.generate(prompts, inputs.new_tokens)
        return engine.replay(inputs.timed, min(sl.warmup_tokens, sl.max_tokens) if warmup else sl.max_tokens)

    def timed_steps(self, result) -> list[float]:
        step_ms = np.asarray(result.routing.step_ms)
        mask = self.inputs.mask
        return step_ms[mask[:len(step_ms)]].tolist() if len(step_ms) == len(mask) else step_ms.tolist()

    def measure(self, hardware: HardwareProfile | None, deadline_s: float | None, started: float) -> Report | None:
        """Measure every configuration with runs missing, then the timed runs still missing; writes each
        configuration's file after every run (a killed call keeps every finished run)."""
        missing = self.missing()
        todo = [(p, s) for (p, s), n in missing.items() if n > 0]
        keys = self.keys()
        done = len(missing) - len(todo)
        held = sum(self.repeats - n for n in missing.values())
        if held:
            print(f"{self.sl.name}: resumed: {held} runs already measured, {done} of {len(missing)} configurations "
                  f"complete", flush=True)
        report = None
        if todo:
            self.build_model()
            configs = [Config({"slice": self.sl.name, "policy": p, "cache_slots": s}) for p, s in todo]
            repeats = max(missing[c] for c in todo)
            before = {c: self.store.read(self.store.path("engine", self.sl.name, keys[c])) or {} for c in todo}
            code_files = engine_files()
            runs = EngineRuns(self.model, self.inputs.shape, lambda c: self.engine_for(c, hardware), self.decode,
                              timed=self.timed_steps)

            def save(report: Report) -> None:
                for c in todo:
                    label = Config({"slice": self.sl.name, "policy": c[0], "cache_slots": c[1]}).label
                    new = [r for r in report.rows if r["config"] == label]
                    old = before[c].get("runs", [])
                    self.store.write(self.store.path("engine", self.sl.name, keys[c]), {
                        "key": keys[c], "slice": self.sl.name, "policy": c[0],
                        "policy_params": self.sl.params_of(c[0]), "cache_slots": c[1],
                        "mode": self.sl.mode, "shape": self.inputs.shape.name, "precision": self.sl.precision,
                        "model_id": self.inputs.model_id, "settings": {"copies_in_flight": self.sl.settings(c[1]).copies_in_flight},
                        "device": _device_name(self.device), "runs": old + new,
                        "warmups": before[c].get("warmups", []) + [report.warmups.get(label, {})],
                        "session": report.info,
                        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "engine_files": code_files})

            # a run that raises: one line naming the policy's file, line and hook; its traceback in OUT/errors
            # each configuration runs only the repeats it lacks (a resumed slice holds some of them already)
            wanted = {Config({"slice": self.sl.name, "policy": p, "cache_slots": s}).label: missing[p, s] for p, s in todo}
            report = Measurement(runs, configs, Discipline(repeats=repeats), on_progress=save,
                                 deadline_s=deadline_s, started=started, on_error=error_files(self.store.out),
                                 runs_wanted=wanted).run_all()
            save(report)
        for (p, s), key in keys.items():
            timed_path = self.store.path("engine", self.sl.name, key, "-timed.npz")
            if timed_path.is_file() or not _ok_runs(self.store.read(self.store.path("engine", self.sl.name, key))):
                continue
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                break
            self.build_model()
            config = Config({"slice": self.sl.name, "policy": p, "cache_slots": s})
            result = self.decode(self.engine_for(config, hardware, record=True), False)
            save_trace(routing_trace(result, self.inputs.shape, source=f"validation.engine_side, slice {self.sl.name}",
                                     recorded_on=_device_name(self.device),
                                     description=f"{p} at {s} slots per layer, per-layer timings recorded"),
                       timed_path)
        return report


class OtherMachineError(ValueError):
    """OUT holds measurements of another kind of device than this machine's."""


def check_same_machine(store: Store, device: torch.device) -> None:
    """Refuse to measure into a folder whose copy table (every calibration and run beside it) comes from another
    device: its results would mix two machines' numbers and the report would compare them without a word.
    Instances of one GPU model share a name, so a resumed grid continues on any of them. Raises
    OtherMachineError naming both devices and the fix."""
    found = store.read(store.out / "calibration" / "copies.json")
    here = _device_name(device)
    if found is not None and found.get("device") != here:
        raise OtherMachineError(f"{store.out} holds measurements made on {found.get('device')!r} (calibration/copies.json), "
                                f"this machine is {here!r}: measure into a new --out, or re-predict what is stored "
                                f"with --predict-only")


def measure_copy_table(store: Store, device: torch.device) -> dict:
    """The link's copy table (``validation.profile_fit.copy_table``), measured once per OUT and stored (a folder
    of another device's is refused: ``check_same_machine``)."""
    check_same_machine(store, device)
    path = store.out / "calibration" / "copies.json"
    found = store.read(path)
    if found is None:
        found = copy_table(device)
        store.write(path, found)
    return found


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
