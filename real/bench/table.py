"""The engine commands' result files: CSV tables rewritten atomically after every run (a crash keeps
what was measured), each row stamped with the settings it was measured under (``measured_under``,
``setting_columns``), the noise floor of every measurement session (in the files and format of
``experiments.noise``, whose ``--report OUT`` prints them) and the resolved configuration written beside
them."""
from __future__ import annotations

import contextlib
import json
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

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


# What identifies a configuration (correctness.csv's rows of a replay are keyed by it alone).
CONFIG_KEY = ("model", "mode", "policy", "cache_slots")

# -- the settings a row was measured under ----------------------------------------------------------------
# Settings of a command that do not change what a configuration's row measures: where results go, which
# configurations are measured (each row names its own: its policy label carries its --policy-param), how long
# the command may take, whether finished rows are re-measured, what the calibrated profile is called.
UNMEASURED = ("out", "work", "policies", "slots", "policy_param", "deadline_s", "fresh", "timed_policy",
              "profile_name", "engine_code", "started")
# The settings shown in columns of their own (the setting's name -> its column's, units where it has one); every
# measured setting, these included, is in the ``settings`` column (JSON), which is what rows are told apart by.
READABLE_SETTINGS = {"device": "device", "dtype": "dtype", "repeats": "repeats", "model": "checkpoint",
                     "prompts": "prompts", "prompt_len": "prompt_len_tokens", "new_tokens": "new_tokens",
                     "max_tokens": "max_tokens", "warmup_tokens": "warmup_tokens", "trace": "trace",
                     "trace_sha256": "trace_sha256", "shape": "shape"}
SETTINGS_COLUMN, CODE_COLUMN = "settings", "engine_code"
# What a row written before rows recorded their settings says in those columns (it is kept beside the new
# rows, never replaced by one, and never taken as already measured by a resumed command).
UNRECORDED = "unrecorded"
# engine.csv's and policies.csv's key: a row is replaced only by its configuration measured under the same settings
SETTINGS_KEY = (*CONFIG_KEY, SETTINGS_COLUMN)
POLICIES_KEY = ("model", "policy", "cache_slots", SETTINGS_COLUMN)

_UNDER: ContextVar[dict | None] = ContextVar("measured_under", default=None)


def setting_columns(settings: dict) -> dict:
    """The columns a row measured under a command's ``settings`` (its resolved config, plain values) carries:
    ``settings``, the JSON (sorted keys) of every setting but the ``UNMEASURED`` ones; ``engine_code``, the
    digest of the engine's code the command measured with (``settings["engine_code"]``; ``UNRECORDED`` where
    the command did not record one: such a row is never taken as already measured); and ``READABLE_SETTINGS``' columns
    for the settings the command has."""
    measured = {k: v for k, v in sorted(settings.items()) if k not in UNMEASURED}
    return {SETTINGS_COLUMN: json.dumps(measured, sort_keys=True, default=str),
            CODE_COLUMN: settings.get("engine_code") or UNRECORDED,
            **{column: settings[k] for k, column in READABLE_SETTINGS.items() if k in settings}}


@contextlib.contextmanager
def measured_under(settings: dict | None) -> Iterator[None]:
    """Within it, every row an engine table adds (``engine_table``, ``policies_table``, ``correctness_table``)
    carries ``setting_columns(settings)``, and ``real.bench.engine_runs.measure_session`` skips what was
    measured under them already (unless ``settings["fresh"]``). None: rows carry no settings (their columns
    say ``unrecorded``)."""
    token = _UNDER.set(settings)
    try:
        yield
    finally:
        _UNDER.reset(token)


def current_settings() -> dict | None:
    """The settings of the innermost ``measured_under``, or None."""
    return _UNDER.get()


ENGINE_COLUMNS = ["model", "mode", "policy", "cache_slots", "tokens_per_s", *FIGURE_COLUMNS, "tpot_ms_mean",
                  "hit_rate", "bytes_moved", "copy_GBps", "gpu_mem_GB", "tokens", "tpot_ms_p50", "tpot_ms_p99",
                  "misses", "prompt_hit_rate", "hit_rate_all_steps", "failed", "error",
                  *READABLE_SETTINGS.values(), SETTINGS_COLUMN, CODE_COLUMN]


class CsvTable:
    """Rows of one CSV file, rewritten whole and atomically on every ``add`` or ``replace``. With ``keep`` the rows
    already in the file stay (several commands add to one table), read under the current names
    (``read_table``: a file of an earlier version keeps one column per quantity); without it the file starts empty.
    ``columns`` come first, in that order, then any others in the order they appear. With a ``key``, a row
    kept from the file whose key columns equal a new row's is replaced by it. ``stamp``: columns added to
    every new row (the settings it was measured under, ``setting_columns``); a kept row without them (an
    earlier version's) reads ``UNRECORDED`` in the settings columns, so it stays beside the new rows."""

    def __init__(self, path: Path, keep: bool = True, columns: list[str] | None = None, echo: bool = False,
                 key: tuple[str, ...] = (), stamp: dict | None = None):
        self.path = Path(path)
        self.columns = columns or []
        self.echo = echo
        self.key = key
        self.stamp = stamp or {}
        self._found = read_table(self.path).to_dict("records") if keep and self.path.exists() else []
        if self.stamp:
            for row in self._found:
                for column in (SETTINGS_COLUMN, CODE_COLUMN):
                    if _blank(row.get(column)):
                        row[column] = UNRECORDED
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
        row = {**row, **self.stamp}
        self._new.append(row)
        self._merge()
        self._write()
        if self.echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)

    def replace(self, rows: list[dict]) -> None:
        """The file becomes the rows kept from it, then ``rows``: this table's rows so far, rewritten whole
        as a measurement session goes on (not echoed)."""
        self._new = [{**row, **self.stamp} for row in rows]
        self._merge()
        self._write()

    def _write(self) -> None:
        frame = pd.DataFrame(self.rows)
        cols = [c for c in self.columns if c in frame] + [c for c in frame if c not in self.columns]
        atomic_write(self.path, lambda f: frame[cols].to_csv(f, index=False))


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value == ""


def _stamp(settings: dict | None) -> dict:
    settings = current_settings() if settings is None else settings
    return setting_columns(settings) if settings is not None else {SETTINGS_COLUMN: UNRECORDED, CODE_COLUMN: UNRECORDED}


def engine_table(out: Path, settings: dict | None = None) -> CsvTable:
    """OUT/engine.csv: one row per measured configuration (mode, policy, cache size, the median of its runs
    with their spread, runs and outliers, ``offload.metrics`` names; ``failed`` and ``error`` where no run
    succeeded), each stamped with the ``settings`` it was measured under (``setting_columns``; default: those
    of the innermost ``measured_under``), appended to what earlier commands wrote there: a configuration
    measured again under the same settings replaces its row, under other settings it gets one of its own.
    Each row ``add``ed is also printed."""
    return CsvTable(Path(out) / "engine.csv", keep=True, columns=ENGINE_COLUMNS, echo=True, key=SETTINGS_KEY,
                    stamp=_stamp(settings))


def correctness_table(out: Path, settings: dict | None = None) -> CsvTable:
    """OUT/correctness.csv, keyed and stamped as ``engine_table``."""
    return CsvTable(Path(out) / "correctness.csv", keep=True, key=SETTINGS_KEY, stamp=_stamp(settings))


def policies_table(out: Path, settings: dict | None = None) -> CsvTable:
    """OUT/policies.csv (the engine beside the simulator per policy and cache size), keyed by the model, the
    policy, the cache size and the settings, stamped as ``engine_table``."""
    return CsvTable(Path(out) / "policies.csv", keep=True, key=POLICIES_KEY, stamp=_stamp(settings))


def engine_row(model: str, mode: str, policy: str, slots: int, figures: dict) -> dict:
    """An engine.csv row: a configuration's ``figures`` (``real.bench.engine_runs.figures``: the median of its
    runs, their spread, the runs, the outliers and their causes, ...) under the columns of the table; the
    settings columns come from the table's stamp."""
    return {"model": model, "mode": mode, "policy": policy, "cache_slots": slots,
            **{k: figures[k] for k in ENGINE_COLUMNS[4:] if k in figures}}


def measured_rows(out: Path, settings: dict) -> list[dict]:
    """The rows of OUT/engine.csv measured under ``settings`` (the same ``settings`` column) with the same
    engine code (``settings["engine_code"]``): what a resumed command need not measure again. No file, or no
    code recorded: none."""
    path = Path(out) / "engine.csv"
    stamp = setting_columns(settings)
    if stamp[CODE_COLUMN] == UNRECORDED or not path.exists():
        return []
    rows = read_table(path).to_dict("records")
    return [r for r in rows if r.get(SETTINGS_COLUMN) == stamp[SETTINGS_COLUMN]
            and r.get(CODE_COLUMN) == stamp[CODE_COLUMN]]


class NoiseFiles:
    """A measurement session's runs and noise floor, in OUT's files shared by every session (those of
    ``experiments.noise``: OUT/noise_runs.csv, one row per run; OUT/noise_floor.csv, one row per
    configuration, ``real.measurement.floor_table``; OUT/noise_sessions.json, per session name the settings,
    the machine's facts and the warm-ups). ``write(report)`` rewrites them atomically, beside the rows already
    there. An engine command's rows (the default) carry the ``settings`` and ``engine_code`` columns of
    ``engine_table``'s (``setting_columns`` of the innermost ``measured_under``) and are keyed as engine.csv's: a row is replaced only by its session's
    configuration measured again under the same settings; the rows of other configurations, other settings
    (an earlier call into the same OUT) and other sessions stay, and so do the warm-ups of the session's entry
    measured under the same settings (a resumed command's). ``whole_session`` (the noise command's sessions,
    named by the user): measuring a session name again replaces all its rows and its entry.
    ``floor_columns``: columns added to every floor row (default ``quiet_gc``: the benchmark commands' engine
    decodes inside its frozen collector, the noise command's quiet_gc arm; the noise command's configurations
    carry their own)."""

    def __init__(self, out: Path, session: str, settings: dict, floor_columns: dict | None = None,
                 whole_session: bool = False):
        self.out, self.session, self.settings = Path(out), session, settings
        self.floor_columns = {"quiet_gc": True} if floor_columns is None else floor_columns
        # the settings and engine-code columns only: a run's own columns keep their names
        self.stamp = None if whole_session else {k: v for k, v in _stamp(None).items()
                                                 if k in (SETTINGS_COLUMN, CODE_COLUMN)}
        self.out.mkdir(parents=True, exist_ok=True)

    def _others(self, name: str, report: Report) -> pd.DataFrame:
        """The rows of OUT/``name`` that ``report`` does not replace: other sessions', and (unless
        ``whole_session``) this session's of configurations ``report`` did not measure or measured under other
        settings (a legacy row without a settings column reads ``UNRECORDED``)."""
        path = self.out / name
        if not path.exists():
            return pd.DataFrame()
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
        other = frame["session"] != self.session
        if self.stamp is None:
            return frame[other]
        settings = frame[SETTINGS_COLUMN] if SETTINGS_COLUMN in frame else pd.Series(UNRECORDED, index=frame.index)
        again = frame["config"].isin({r["config"] for r in report.rows})
        return frame[other | ~again | (settings.fillna(UNRECORDED) != self.stamp[SETTINGS_COLUMN])]

    def write(self, report: Report) -> None:
        if not report.configs:      # nothing measured (every configuration resumed): the files stay as they are
            return
        stamp = self.stamp or {}
        floor = [{**row, **self.floor_columns} for row in report.floor()]
        for name, rows in (("noise_runs.csv", report.rows), ("noise_floor.csv", floor)):
            if not rows:        # only the warm-up so far
                continue
            frame = pd.concat([self._others(name, report),
                               pd.DataFrame([{"session": self.session, **r, **stamp} for r in rows])],
                              ignore_index=True)
            atomic_write(self.out / name, lambda f, frame=frame: frame.to_csv(f, index=False))
        warmups = dict(report.warmups)
        if self.stamp is not None:
            earlier = _read_sessions(self.out).get(self.session, {})
            # compared as the file holds them (JSON: tuples read back as lists, paths as text)
            mine = json.loads(json.dumps(self.settings, default=str))
            if (isinstance(earlier.get("settings"), dict) and isinstance(earlier.get("warmups"), dict)
                    and setting_columns(earlier["settings"])[SETTINGS_COLUMN] == setting_columns(mine)[SETTINGS_COLUMN]):
                warmups = {**earlier["warmups"], **warmups}
        update_sessions(self.out, self.session, {"settings": self.settings, **report.info, "warmups": warmups})


def _read_sessions(out: Path) -> dict:
    path = Path(out) / "noise_sessions.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_sessions(out: Path, key: str, entry: dict) -> None:
    """Set ``key``'s entry of OUT/noise_sessions.json (atomically), keeping the others."""
    sessions = _read_sessions(out)
    sessions[key] = entry
    atomic_write(Path(out) / "noise_sessions.json", lambda f: json.dump(sessions, f, indent=1, default=str))


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
