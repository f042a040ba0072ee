"""Every validation result on disk as it is made, keyed by what it depends on, so that the command resumes
across device calls and never reuses a stale result.

    OUT/calibration/copies.json          the link's copy table (one per machine kind)
    OUT/calibration/<slice>.json         a slice's raw micro-benchmarks (real.calibration)
    OUT/engine/<slice>/<key>.json        one configuration's engine runs (every repeat, with its disturbances)
    OUT/engine/<slice>/<key>-timed.npz   one extra run of it with per-layer timings recorded (a trace)
    OUT/sim/<slice>/<key>.json           the simulator's prediction of the same runs

An engine result's key covers the slice's settings, the trace's or checkpoint's content, the policy's
source and the code of the engine's packages; a prediction's key adds the profile's content and the
simulator's code. So a change to the simulator re-predicts without re-measuring, and a change to the
engine re-measures. Files are written atomically (``traces.io.atomic_write``): a killed call leaves whole
files or none.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from traces.digest import bytes_sha256, source_sha256
from traces.io import atomic_write

ENGINE_PACKAGES = ("offload", "policies", "real", "traces")
SIM_PACKAGES = ("offload", "hardware", "policies", "sim", "traces", "validation")


def digest(obj: Any) -> str:
    """A short, stable key of a JSON-able object."""
    return bytes_sha256(json.dumps(obj, sort_keys=True, default=str))[:16]


def engine_code() -> str:
    return source_sha256(ENGINE_PACKAGES)


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


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)

    def path(self, kind: str, slice_name: str, key: str, suffix: str = ".json") -> Path:
        return self.out / kind / slice_name / f"{key}{suffix}"

    def read(self, path: Path) -> dict | None:
        """The JSON at ``path``, or None when it is absent (a torn file cannot exist: writes are atomic)."""
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def write(self, path: Path, obj: dict) -> None:
        atomic_write(path, lambda f: json.dump(_plain(obj), f, indent=1))

    def calibration_path(self, slice_name: str) -> Path:
        return self.out / "calibration" / f"{slice_name}.json"

    def engine_results(self, slice_name: str) -> list[dict]:
        """Every engine result stored for the slice, the most recently written first."""
        folder = self.out / "engine" / slice_name
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True) if folder.is_dir() else []
        return [json.loads(p.read_text()) for p in files]
