"""Results on disk: one JSON file per finished configuration, written atomically, and the tables
collected from them.

A row's file name is its ``config_hash``: the resolved configuration plus the trace file's content,
so a sweep started again over the same out dir skips what is done, and an edited trace never reuses
old rows. Every file is written to a temp file in the same directory, fsynced, then renamed, so a
sweep killed at any moment leaves whole rows or none.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.config import RunConfig
from traces.io import atomic_write

_digests: dict[tuple[str, int, int], str] = {}


def trace_sha256(path: str | Path) -> str:
    """The trace file's sha256, cached per process by (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


_MODEL_PACKAGES = ("policies", "sim")


@functools.lru_cache(maxsize=1)
def model_code_sha256() -> str:
    """Digest of the simulator's and the policies' source: a row computed by other code is stale,
    so a resumed sweep after a change recomputes instead of mixing old and new numbers."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in _MODEL_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            h.update(source.relative_to(root).as_posix().encode())
            h.update(source.read_bytes())
    return h.hexdigest()


def config_hash(cfg: RunConfig) -> str:
    canonical = json.dumps({"config": cfg.to_dict(), "trace_sha256": trace_sha256(cfg.trace),
                            "model_code_sha256": model_code_sha256()},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1) + "\n"


class ResultStore:
    """``out/rows/<hash>.json`` (the row) and ``out/perf/<hash>.json`` (the simulator's speed)."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.rows_dir = self.out / "rows"
        self.perf_dir = self.out / "perf"

    def row_path(self, config_hash: str) -> Path:
        return self.rows_dir / f"{config_hash}.json"

    def done(self, config_hash: str) -> bool:
        return self.row_path(config_hash).is_file()

    def write(self, row: dict, perf: dict) -> None:
        # The row goes last: its presence is what marks the configuration done.
        h = row["config_hash"]
        atomic_write(self.perf_dir / f"{h}.json", lambda f: f.write(_dump_json(perf)))
        atomic_write(self.row_path(h), lambda f: f.write(_dump_json(row)))

    def read_row(self, config_hash: str) -> dict:
        return json.loads(self.row_path(config_hash).read_text())

    def read_perf(self, hashes: list[str]) -> pd.DataFrame:
        """The simulator-speed records of the done configurations among ``hashes``."""
        paths = (self.perf_dir / f"{h}.json" for h in dict.fromkeys(hashes) if self.done(h))
        return pd.DataFrame([json.loads(p.read_text()) for p in paths if p.is_file()])

    def collect(self, hashes: list[str], columns: list[str], resolved: dict | None = None) -> pd.DataFrame:
        """The done rows among ``hashes`` as one table, written as results.csv / results.parquet
        (sorted by policy in sweep order, then cache_slots), perf.csv and resolved_config.yaml."""
        done = [h for h in dict.fromkeys(hashes) if self.done(h)]
        rows = [self.read_row(h) for h in done]
        df = pd.DataFrame(rows)
        if rows:
            extra = sorted(set(df.columns) - set(columns))
            df = df[[c for c in columns if c in df.columns] + extra]
            policy_rank = {p: i for i, p in enumerate(dict.fromkeys(df["policy"]))}
            df = (df.assign(_rank=df["policy"].map(policy_rank))
                    .sort_values(["_rank", "cache_slots"], kind="stable")
                    .drop(columns="_rank").reset_index(drop=True))
        atomic_write(self.out / "results.csv", lambda f: df.to_csv(f, index=False))
        atomic_write(self.out / "results.parquet", lambda f: df.to_parquet(f, index=False), binary=True)
        perf = self.read_perf(done)
        atomic_write(self.out / "perf.csv", lambda f: perf.to_csv(f, index=False))
        if resolved is not None:
            atomic_write(self.out / "resolved_config.yaml",
                         lambda f: yaml.safe_dump(resolved, f, sort_keys=False, default_flow_style=None))
        return df

