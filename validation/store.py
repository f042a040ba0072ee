"""Every validation result on disk as it is made, keyed by what it depends on, so that the command resumes
across device calls and never reuses a stale result.

    OUT/calibration/copies.json          the link's copy table (one per machine kind)
    OUT/calibration/<slice>.json         a slice's raw micro-benchmarks (real.calibration)
    OUT/engine/<slice>/<key>.json        one configuration's engine runs (every repeat, with its disturbances)
    OUT/engine/<slice>/<key>-timed.npz   one extra run of it with per-layer timings recorded (a trace)
    OUT/sim/<slice>/<key>.json           the simulator's prediction of the same runs

An engine result's key covers the slice's settings, the trace's or checkpoint's content, the policy's
source and the engine's code: every module of the engine's packages that the validation's engine side imports,
directly or through one another (``engine_code``), so a change to a module no engine run executes (the
calibration's micro-benchmarks, a training script) keeps the runs; a calibration's key covers the same and the
calibration's own modules (``calibration_code``). A prediction's key adds the profile's content and the
simulator's code. So a change to the simulator re-predicts without re-measuring, and a change to the
engine re-measures. Files are written atomically (``traces.io.atomic_write``): a killed call leaves whole
files or none; one damaged all the same (cut short by a full disk, a copy, an edit) is named by ``damaged_files``
and read as absent (``Store.read``), so a measuring call measures it again and rewrites it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from policies.registry import imported_module_names
from traces.digest import ROOT, bytes_sha256, source_sha256
from traces.io import atomic_write
from traces.json_file import json_object

ENGINE_PACKAGES = ("offload", "policies", "real", "traces")
SIM_PACKAGES = ("offload", "hardware", "policies", "sim", "traces", "validation")
# the modules that run the engine for the validation: what they import from ENGINE_PACKAGES is the engine's code
ENGINE_SIDE = ("validation/engine_side.py", "validation/live.py")
# imported by the engine side but run only by a calibration: a change re-calibrates, it does not re-measure
CALIBRATION_ONLY = ("real.calibration",)


def digest(obj: Any) -> str:
    """A short, stable key of a JSON-able object."""
    return bytes_sha256(json.dumps(obj, sort_keys=True, default=str))[:16]


def _module_path(name: str) -> Path | None:
    """The file of module ``name`` of the engine's packages (a module or a package's ``__init__``), or None."""
    if name.split(".")[0] not in ENGINE_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def engine_modules(exclude: tuple[str, ...] | None = None) -> list[Path]:
    """The engine's code as files, sorted: every module of ENGINE_PACKAGES that ENGINE_SIDE imports (in functions
    too, with their parent packages), then transitively what those import, except the modules ``exclude``
    names (default: CALIBRATION_ONLY; not followed either, unless another module imports what they import); and
    every module of ``policies/`` (the registry imports built-in policies by name, which no import statement
    shows)."""
    exclude = CALIBRATION_ONLY if exclude is None else exclude
    todo = [(name, None) for side in ENGINE_SIDE for name in imported_module_names(ROOT / side, "validation")]
    todo += [(f"policies.{p.stem}", None) for p in (ROOT / "policies").glob("*.py")]
    found: dict[str, Path] = {}
    while todo:
        name, _ = todo.pop()
        if name in found or name in exclude:
            continue
        path = _module_path(name)
        if path is None:
            continue
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += [(n, None) for n in imported_module_names(path, package or None)]
    return sorted(set(found.values()))


def _files_sha256(paths: list[Path]) -> str:
    return bytes_sha256("".join(f"{p.relative_to(ROOT).as_posix()}\0{bytes_sha256(p.read_bytes())}\n" for p in paths))


def engine_code() -> str:
    """The digest of the engine's code (``engine_modules``: paths and contents)."""
    return _files_sha256(engine_modules())


def engine_files() -> dict[str, str]:
    """{path: content digest (16 hex)} of the engine's code, as an engine result records it, so that a later
    checkout can say which files changed since (``changed_files``)."""
    return {p.relative_to(ROOT).as_posix(): bytes_sha256(p.read_bytes())[:16] for p in engine_modules()}


def changed_files(recorded: dict[str, str] | None, now: dict[str, str]) -> list[str] | None:
    """The engine files that differ between a result's record and ``now`` (changed, added or removed, sorted);
    None when the result recorded none (measured before the record existed)."""
    if not recorded:
        return None
    return sorted(path for path in set(recorded) | set(now) if recorded.get(path) != now.get(path))


def calibration_code() -> str:
    """The digest of the engine's code and the calibration's own modules."""
    return _files_sha256(engine_modules(exclude=()))


def sim_code() -> str:
    return source_sha256(SIM_PACKAGES)


def _plain(obj: Any) -> Any:
    """JSON without NaN (null instead), numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not hasattr(obj, "__len__"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# the JSON files a store holds, as globs under OUT, with the fields every one of them holds and their types: a
# file that is a JSON object but lacks them (cut to ``{}``, hand-edited) is no result either
STORED_JSON = {"calibration/*.json": {"device": str},
               "engine/*/*.json": {"key": str, "slice": str, "policy": str, "cache_slots": int, "runs": list},
               "engine/*/inputs/*.json": {"model_id": str, "mask": list},
               "sim/*/*.json": {"key": str, "engine_key": str, "tokens_per_s": (int, float)}}


def _missing_fields(data: dict, fields: dict) -> str | None:
    """Why ``data`` is not a whole stored result of its kind (``STORED_JSON``'s fields), or None."""
    wrong = [name for name, kind in fields.items() if not isinstance(data.get(name), kind)
             or isinstance(data.get(name), bool)]
    if wrong:
        return f"not a whole result (field{'s' if len(wrong) > 1 else ''} {', '.join(wrong)} missing or of another type)"
    if "runs" in fields and not all(isinstance(run, dict) for run in data["runs"]):
        return "not a whole result (a run in 'runs' is not an object)"
    return None


def damaged_files(out: Path, traces: tuple[str, ...] = ()) -> dict[Path, str]:
    """{file: what is wrong with it} of the store's JSON files (``STORED_JSON``) that hold no JSON object, and of
    the traces under ``out`` matching the globs ``traces`` (``traces.load_trace``: cut short or damaged)."""
    from traces import load_trace
    from traces.io import TraceError
    found = {}
    for pattern, fields in STORED_JSON.items():
        for path in sorted(Path(out).glob(pattern)):
            data, problem = json_object(path)
            problem = problem or _missing_fields(data, fields)
            if problem is not None:
                found[path] = problem
    for pattern in traces:
        for path in sorted(Path(out).glob(pattern)):
            try:
                load_trace(path)
            except TraceError as err:
                # the loader's words end with a fix for a trace one exports (re-export it), not for a stored result
                parts = " ".join(str(err).removeprefix(f"{path}: ").split()).split(": ")
                found[path] = "not a whole trace (" + ": ".join(parts[:-1] if len(parts) > 2 else parts) + ")"
    return found


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.damaged: set[Path] = set()     # files named damaged (``damaged_files``): read as absent

    def path(self, kind: str, slice_name: str, key: str, suffix: str = ".json") -> Path:
        return self.out / kind / slice_name / f"{key}{suffix}"

    def read(self, path: Path) -> dict | None:
        """The JSON at ``path``, or None when it is absent or one of ``damaged`` (a torn file cannot come from a
        write here, which is atomic: a damaged one is named before anything runs, ``damaged_files``). ValueError
        naming the file and the fix for a damaged file not named so."""
        if not path.is_file() or Path(path) in self.damaged:
            return None
        data, problem = json_object(path)
        if problem is not None:
            raise ValueError(f"{path}: {problem}; delete it to measure it again")
        return data

    def write(self, path: Path, obj: dict) -> None:
        atomic_write(path, lambda f: json.dump(_plain(obj), f, indent=1))
        self.damaged.discard(Path(path))        # rewritten whole

    def calibration_path(self, slice_name: str) -> Path:
        return self.out / "calibration" / f"{slice_name}.json"

    def engine_results(self, slice_name: str) -> list[dict]:
        """Every engine result stored for the slice, the most recently written first: by the time each records
        (``written_at``, UTC ISO 8601), which a copy or a git checkout keeps, then by the file's modification
        time (results from before the field existed, older than every result that has it)."""
        folder = self.out / "engine" / slice_name
        results = [(self.read(p), p.stat().st_mtime_ns) for p in folder.glob("*.json")] if folder.is_dir() else []
        results = [r for r in results if r[0] is not None]      # a damaged one is no result
        results.sort(key=lambda r: (r[0].get("written_at") or "", r[1]), reverse=True)
        return [r for r, _ in results]
