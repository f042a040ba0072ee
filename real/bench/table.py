"""The engine commands' result files: CSV tables rewritten atomically after every row (a crash keeps
what was measured) and the resolved configuration written beside them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from traces.io import atomic_write

ENGINE_COLUMNS = ["model", "mode", "policy", "cache_slots", "tokens_per_s", "tpot_ms_mean", "hit_rate",
                  "bytes_moved", "copy_GBps", "gpu_mem_GB", "tokens", "tpot_ms_p50", "tpot_ms_p99",
                  "misses"]


class CsvTable:
    """Rows of one CSV file, rewritten whole and atomically on every ``add``. With ``keep`` the rows
    already in the file stay (several commands add to one table); without it the file starts empty.
    ``columns`` come first, in that order, then any others in the order they appear."""

    def __init__(self, path: Path, keep: bool = True, columns: list[str] | None = None, echo: bool = False):
        self.path = Path(path)
        self.columns = columns or []
        self.echo = echo
        self.rows = pd.read_csv(self.path).to_dict("records") if keep and self.path.exists() else []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        frame = pd.DataFrame(self.rows)
        cols = [c for c in self.columns if c in frame] + [c for c in frame if c not in self.columns]
        atomic_write(self.path, lambda f: frame[cols].to_csv(f, index=False))
        if self.echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)


def engine_table(out: Path) -> CsvTable:
    """OUT/engine.csv: one row per measured run (mode, policy, cache size, ``offload.metrics`` names),
    appended to what earlier commands wrote there; each row is also printed."""
    return CsvTable(Path(out) / "engine.csv", keep=True, columns=ENGINE_COLUMNS, echo=True)


def engine_row(model: str, mode: str, policy: str, slots: int, metrics: dict) -> dict:
    """An engine.csv row from an engine run's ``metrics`` (``EngineResult.metrics``)."""
    return {"model": model, "mode": mode, "policy": policy, "cache_slots": slots,
            **{k: metrics[k] for k in ENGINE_COLUMNS[4:] if k in metrics}}


def write_resolved_config(out: Path, command: str, config: dict) -> Path:
    """``config`` (every setting of the run, defaults filled in; plain values) as
    OUT/resolved_config-<command>.yaml, written atomically; returns the path."""
    path = Path(out) / f"resolved_config-{command}.yaml"
    atomic_write(path, lambda f: yaml.safe_dump({"command": command, **config}, f, sort_keys=False))
    return path
