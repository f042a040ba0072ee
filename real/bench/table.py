"""The engine commands' result files: CSV tables rewritten atomically after every run (a crash keeps
what was measured), the noise floor of every measurement session (in the files and format of
``experiments.noise``, whose ``--report OUT`` prints them) and the resolved configuration written beside
them."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from real.bench.engine_runs import FIGURE_COLUMNS
from real.measurement import Report
from traces.io import atomic_write

# The reference with every expert on the compute device (the GPU, or the CPU of a smoke run), and the column
# saying a run's tokens equal its. Results written before they were named by what runs use the old names
# (``fully-on-gpu``, ``identical_to_fully_on_gpu``; the committed results under experiments/results keep them):
# ``upgrade_names`` reads either.
FULLY_RESIDENT = "fully-resident"
IDENTICAL_COLUMN = "identical_to_fully_resident"
LEGACY_MODES = {"fully-on-gpu": FULLY_RESIDENT}
LEGACY_COLUMNS = {"identical_to_fully_on_gpu": IDENTICAL_COLUMN}


def upgrade_names(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (an engine.csv or correctness.csv, old or new) under the current names: the old column
    renamed (where the new one is missing), the old mode values replaced. Nothing else changes."""
    renames = {old: new for old, new in LEGACY_COLUMNS.items() if old in frame and new not in frame}
    frame = frame.rename(columns=renames)
    if "mode" in frame:
        frame = frame.assign(mode=frame["mode"].replace(LEGACY_MODES))
    return frame


def read_table(path: Path) -> pd.DataFrame:
    """A result CSV written by any version of these commands, under the current names (``upgrade_names``); an
    empty file (a table that had no row yet) is an empty table."""
    try:
        return upgrade_names(pd.read_csv(path))
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


# What identifies a configuration's row in engine.csv and correctness.csv (a re-measured one replaces it).
CONFIG_KEY = ("model", "mode", "policy", "cache_slots")
ENGINE_COLUMNS = ["model", "mode", "policy", "cache_slots", "tokens_per_s", *FIGURE_COLUMNS, "tpot_ms_mean",
                  "hit_rate", "bytes_moved", "copy_GBps", "gpu_mem_GB", "tokens", "tpot_ms_p50", "tpot_ms_p99",
                  "misses"]


class CsvTable:
    """Rows of one CSV file, rewritten whole and atomically on every ``add`` or ``replace``. With ``keep`` the rows
    already in the file stay (several commands add to one table), read under the current names
    (``read_table``: a file of an earlier version keeps one column per quantity); without it the file starts empty.
    ``columns`` come first, in that order, then any others in the order they appear."""

    def __init__(self, path: Path, keep: bool = True, columns: list[str] | None = None, echo: bool = False,
                 key: tuple[str, ...] = ()):
        self.path = Path(path)
        self.columns = columns or []
        self.echo = echo
        self.key = key
        self._found = read_table(self.path).to_dict("records") if keep and self.path.exists() else []
        self._new: list[dict] = []
        self._merge()

    def _identity(self, row: dict) -> tuple[str, ...]:
        def text(v) -> str:
            if v is None or (isinstance(v, float) and v != v):
                return ""
            return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        return tuple(text(row.get(c)) for c in self.key)

    def _merge(self) -> None:
        # With a ``key``, a row kept from the file that this command measures again is replaced, not repeated
        # (a command run twice into one OUT left two rows of the same configuration, with nothing to tell them apart)
        again = {self._identity(r) for r in self._new} if self.key else set()
        self.kept = [r for r in self._found if not self.key or self._identity(r) not in again]
        self.rows = self.kept + self._new

    def add(self, row: dict) -> None:
        self._new.append(row)
        self._merge()
        self._write()
        if self.echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)

    def replace(self, rows: list[dict]) -> None:
        """The file becomes the rows kept from it, then ``rows``: this table's rows so far, rewritten whole
        as a measurement session goes on (not echoed)."""
        self._new = list(rows)
        self._merge()
        self._write()

    def _write(self) -> None:
        frame = pd.DataFrame(self.rows)
        cols = [c for c in self.columns if c in frame] + [c for c in frame if c not in self.columns]
        atomic_write(self.path, lambda f: frame[cols].to_csv(f, index=False))


def engine_table(out: Path) -> CsvTable:
    """OUT/engine.csv: one row per measured configuration (mode, policy, cache size, the median of its runs
    with their spread, runs and outliers, ``offload.metrics`` names), appended to what earlier commands
    wrote there (a configuration measured again replaces its row); each row ``add``ed is also printed."""
    return CsvTable(Path(out) / "engine.csv", keep=True, columns=ENGINE_COLUMNS, echo=True, key=CONFIG_KEY)


def engine_row(model: str, mode: str, policy: str, slots: int, figures: dict) -> dict:
    """An engine.csv row: a configuration's ``figures`` (``real.bench.engine_runs.figures``: the median of its
    runs, their spread, the runs, the outliers and their causes, ...) under the columns of the table."""
    return {"model": model, "mode": mode, "policy": policy, "cache_slots": slots,
            **{k: figures[k] for k in ENGINE_COLUMNS[4:] if k in figures}}


class NoiseFiles:
    """A measurement session's runs and noise floor, in OUT's files shared by every session (those of
    ``experiments.noise``: OUT/noise_runs.csv, one row per run; OUT/noise_floor.csv, one row per
    configuration, ``real.measurement.floor_table``; OUT/noise_sessions.json, the settings, the machine's
    facts and the warm-ups), beside the other sessions' rows; measuring a session name again replaces its
    rows. ``write(report)`` rewrites them atomically. ``floor_columns``: columns added to every floor row
    (default ``quiet_gc``: the benchmark commands' engine decodes inside its frozen collector, the noise
    command's quiet_gc arm; the noise command's configurations carry their own)."""

    def __init__(self, out: Path, session: str, settings: dict, floor_columns: dict | None = None):
        self.out, self.session, self.settings = Path(out), session, settings
        self.floor_columns = {"quiet_gc": True} if floor_columns is None else floor_columns
        self.out.mkdir(parents=True, exist_ok=True)

    def _others(self, name: str) -> pd.DataFrame:
        path = self.out / name
        if not path.exists():
            return pd.DataFrame()
        frame = pd.read_csv(path)
        return frame[frame["session"] != self.session]

    def write(self, report: Report) -> None:
        floor = [{**row, **self.floor_columns} for row in report.floor()]
        for name, rows in (("noise_runs.csv", report.rows), ("noise_floor.csv", floor)):
            if not rows:        # only the warm-up so far
                continue
            frame = pd.concat([self._others(name), pd.DataFrame([{"session": self.session, **r} for r in rows])],
                              ignore_index=True)
            atomic_write(self.out / name, lambda f, frame=frame: frame.to_csv(f, index=False))
        update_sessions(self.out, self.session, {"settings": self.settings, **report.info, "warmups": report.warmups})


def update_sessions(out: Path, key: str, entry: dict) -> None:
    """Set ``key``'s entry of OUT/noise_sessions.json (atomically), keeping the others."""
    path = Path(out) / "noise_sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else {}
    sessions[key] = entry
    atomic_write(path, lambda f: json.dump(sessions, f, indent=1, default=str))


def print_rows(rows: list[dict], columns: list[str]) -> None:
    """``rows``' ``columns`` (those they have) as one aligned table on stdout."""
    if rows:
        frame = pd.DataFrame(rows)
        print(frame[[c for c in columns if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4g}"),
              flush=True)


def write_resolved_config(out: Path, command: str, config: dict) -> Path:
    """``config`` (every setting of the run, defaults filled in; plain values) as
    OUT/resolved_config-<command>.yaml, written atomically; returns the path."""
    path = Path(out) / f"resolved_config-{command}.yaml"
    atomic_write(path, lambda f: yaml.safe_dump({"command": command, **config}, f, sort_keys=False))
    return path
