"""Results on disk: one JSON file per finished configuration, written atomically, and the tables
collected from them.

A row's file name is its ``config_hash``: the resolved configuration plus a digest of every input the
row depends on that the sweep can see (``row_inputs``): the trace file's content (which holds the model
shape), the hardware profile as resolved, the policy's source (a user's file included, with the user's
modules it imports) and the code that computes a row: the packages the simulation runs and the sweep's
own modules that compute and key a row. A sweep started again over the same out dir skips what is done,
and a changed input never reuses an old row. What a policy reads at run time (a data file beside it) is
no input the sweep sees: editing it does not recompute the rows it gave. Every file is written to a temp
file in the same directory, fsynced, then renamed, so a sweep killed at any moment leaves whole rows or
none.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from experiments.config import RunConfig
from hardware.profile import hardware_to_dict, load_hardware
from policies.registry import policy_sha256
from traces.digest import ROOT, bytes_sha256, file_sha256, source_sha256
from traces.io import atomic_write
from traces.json_file import json_object

if TYPE_CHECKING:
    import pandas as pd     # imported where tables are built: a sweep needs it only once its runs are done

def _sha256(data: bytes | str) -> str:
    return bytes_sha256(data)


def trace_sha256(path: str | Path) -> str:
    """The trace file's sha256, cached per process by (path, size, mtime)."""
    return file_sha256(path)


# The packages whose code decides a row's numbers: the shared core, the hardware and trace formats,
# the policies and the simulator.
MODEL_PACKAGES = ("offload", "hardware", "policies", "sim", "traces")
# The sweep's own modules that compute a row (runner: the train/eval slices, the Belady bound, the row's
# columns) or shape and key it (config: the configuration and its defaults; this module: the row's inputs,
# its key, its file). The command line (sweep, overrides: their values are in the configuration) and the
# figures are not: a change there leaves every row as it was.
ROW_MODULES = ("experiments/config.py", "experiments/results.py", "experiments/runner.py")


def model_code_sha256() -> str:
    """Digest of the source of every package and module a row depends on: a row computed by other code is
    stale, so a resumed sweep after a change recomputes instead of mixing old and new numbers."""
    modules = "".join(f"{m}\0{file_sha256(ROOT / m)}\n" for m in ROW_MODULES)
    return bytes_sha256(source_sha256(MODEL_PACKAGES) + modules)


def hardware_sha256(cfg: RunConfig) -> str:
    """Digest of the hardware profile as the run sees it: the file's content with the overrides."""
    profile = load_hardware(cfg.hardware).with_overrides(**cfg.hardware_overrides())
    return _sha256(json.dumps(hardware_to_dict(profile), sort_keys=True))


# Each input a row depends on, as its column name in the row -> what a change of it is called.
ROW_INPUTS = {
    "trace_sha256": "trace file changed",
    "hardware_sha256": "hardware profile changed",
    "policy_sha256": "policy source changed",
    "code_sha256": f"code of {'/'.join(MODEL_PACKAGES)}, {', '.join(ROW_MODULES)} changed",
}


def row_inputs(cfg: RunConfig) -> dict[str, str]:
    """The digests of everything besides ``cfg`` that a row of ``cfg`` depends on (``ROW_INPUTS``)."""
    return {"trace_sha256": trace_sha256(cfg.trace), "hardware_sha256": hardware_sha256(cfg),
            "policy_sha256": policy_sha256(cfg.policy), "code_sha256": model_code_sha256()}


def config_hash(cfg: RunConfig, inputs: dict[str, str] | None = None) -> str:
    """The row's key: ``cfg`` and its ``row_inputs`` (computed here unless given)."""
    inputs = row_inputs(cfg) if inputs is None else inputs
    canonical = json.dumps({"config": cfg.to_dict(), **inputs}, sort_keys=True, separators=(",", ":"))
    return _sha256(canonical)[:16]


def row_config(row: dict) -> RunConfig:
    """The configuration a row was computed for (its config columns; policy_params as JSON text)."""
    fields = {f.name: row[f.name] for f in dataclasses.fields(RunConfig)}
    fields["policy_params"] = tuple(sorted(json.loads(fields["policy_params"]).items()))
    return RunConfig(**fields)


def config_hash_of(row: dict) -> str:
    """The key of the row's own configuration and inputs: its file's name, when the row is what the sweep wrote."""
    return config_hash(row_config(row), {k: row[k] for k in ROW_INPUTS})


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1) + "\n"


def _lacking(columns: list[str]) -> str:
    return f"it lacks {', '.join(columns[:3])}{f' and {len(columns) - 3} more' if len(columns) > 3 else ''}"


class ResultStore:
    """``out/rows/<hash>.json`` (the row), ``out/perf/<hash>.json`` (the simulator's speed) and
    ``out/errors/<hash of the config>.txt`` (why its latest attempt failed, with the traceback).

    A configuration is done when its row file holds a whole row of it (``row_columns``, keyed by its name) and
    its perf file, if any, a perf record of it (``perf_columns``). A file there that does not (a truncated
    file, a foreign one) is ``damaged``: the configuration is not done, and its run rewrites the file."""

    def __init__(self, out_dir: str | Path, row_columns: Sequence[str] = (), perf_columns: Sequence[str] = ()):
        self.out = Path(out_dir)
        self.rows_dir = self.out / "rows"
        self.perf_dir = self.out / "perf"
        self.errors_dir = self.out / "errors"
        self.row_columns = list(row_columns)
        self.perf_columns = list(perf_columns)

    def row_path(self, config_hash: str) -> Path:
        return self.rows_dir / f"{config_hash}.json"

    def error_path(self, cfg: RunConfig, kind: str = "run") -> Path:
        """Where the report of ``cfg``'s latest failed ``kind`` of attempt lies: ``run`` (its row), or ``timeline``
        (the sweep's --timeline, recorded from a finished configuration)."""
        # Named by the configuration alone, not its inputs: the report is of its latest attempt,
        # and the row that a fixed policy or profile then gives removes it (the timeline written, its).
        name = _sha256(json.dumps(cfg.to_dict(), sort_keys=True))[:16]
        return self.errors_dir / (f"{name}.txt" if kind == "run" else f"{name}.{kind}.txt")

    def perf_path(self, config_hash: str) -> Path:
        return self.perf_dir / f"{config_hash}.json"

    def done(self, config_hash: str) -> bool:
        return self.row_path(config_hash).is_file() and self.damaged(config_hash) is None

    def damaged(self, config_hash: str) -> tuple[Path, str] | None:
        """The file of ``config_hash`` (its row, or the perf record beside a row) that is there but is not what
        the sweep writes, and what is wrong with it; None when there is none such."""
        path = self.row_path(config_hash)
        if not path.exists():
            return None
        row, problem = json_object(path)
        if problem is None:
            problem = self._row_problem(row, config_hash)
        if problem is not None:
            return path, problem
        path = self.perf_path(config_hash)
        if not path.exists():       # a row without one is whole: perf.csv leaves it out
            return None
        perf, problem = json_object(path)
        if problem is None:
            missing = [c for c in self.perf_columns if c not in perf]
            if missing:
                problem = f"not a whole perf record: {_lacking(missing)}"
            elif perf.get("config_hash") != config_hash:
                problem = f"the perf record of another configuration (config_hash {perf.get('config_hash')!r})"
        return None if problem is None else (path, problem)

    def _row_problem(self, row: dict, config_hash: str) -> str | None:
        missing = [c for c in self.row_columns if c not in row]
        if missing:
            return f"not a whole row: {_lacking(missing)}"
        try:
            key = config_hash_of(row)
        except (KeyError, TypeError, ValueError) as err:
            return f"not a row: its configuration does not read ({type(err).__name__}: {err})"
        if key != config_hash or row.get("config_hash") != config_hash:
            return f"the row of another configuration or of other inputs (its content is keyed {key})"
        return None

    def foreign(self, hashes: list[str]) -> list[tuple[Path, str]]:
        """The files in ``rows/`` named by none of ``hashes`` that are no row of any configuration (not JSON, a
        JSON object without a configuration's columns), with what is wrong: a sweep ignores them. (The rows of
        other configurations or inputs, there to be found by ``stale``, are not among them.)"""
        names = set(hashes)
        found = []
        for path in sorted(self.rows_dir.glob("*.json")) if self.rows_dir.is_dir() else ():
            if path.stem in names:
                continue
            row, problem = json_object(path)
            if problem is None and (missing := [f.name for f in dataclasses.fields(RunConfig) if f.name not in row]):
                problem = f"not a row: {_lacking(missing)}"
            if problem is None:
                try:
                    hash(row_config(row))
                except (TypeError, ValueError) as err:
                    problem = f"not a row: its configuration does not read ({type(err).__name__}: {err})"
            if problem is not None:
                found.append((path, problem))
        return found

    def write(self, row: dict, perf: dict) -> None:
        # The row goes last: its presence is what marks the configuration done.
        h = row["config_hash"]
        atomic_write(self.perf_path(h), lambda f: f.write(_dump_json(perf)))
        atomic_write(self.row_path(h), lambda f: f.write(_dump_json(row)))
        self.error_path(row_config(row)).unlink(missing_ok=True)

    def write_error(self, cfg: RunConfig, text: str, kind: str = "run") -> Path:
        """Keep a failed configuration's report (its traceback); the row stays missing, so a re-run retries it."""
        path = self.error_path(cfg, kind)
        atomic_write(path, lambda f: f.write(text))
        return path

    def stale(self, pending: list[tuple[RunConfig, dict[str, str]]]) -> tuple[int, collections.Counter]:
        """How many of ``pending`` (configuration, its inputs) have a row on disk computed from other
        inputs, and why: ``ROW_INPUTS`` label -> number of those configurations."""
        wanted = dict(pending)
        # A file named by a pending configuration's own key is no row of other inputs: it is damaged.
        own = {config_hash(cfg, inputs) for cfg, inputs in pending}
        latest: dict[RunConfig, tuple[int, dict]] = {}
        for path in self.rows_dir.glob("*.json") if self.rows_dir.is_dir() else ():
            row, problem = json_object(path)
            if problem is not None or path.stem in own:    # damaged or foreign: said where it is found
                continue
            try:
                cfg = row_config(row)
                hash(cfg)
            except (KeyError, TypeError, ValueError):  # not a row of this layout: it can match no configuration
                continue
            mtime = path.stat().st_mtime_ns
            if cfg in wanted and (cfg not in latest or mtime > latest[cfg][0]):
                latest[cfg] = (mtime, row)
        reasons: collections.Counter = collections.Counter()
        for cfg, (_, row) in latest.items():
            # A row without the input columns predates them: which input changed is unknown.
            changed = ([label for key, label in ROW_INPUTS.items() if row[key] != wanted[cfg][key]]
                       if ROW_INPUTS.keys() <= row.keys() else [])
            reasons.update(changed or ["written by another version of the sweep"])
        return len(latest), reasons

    def read_row(self, config_hash: str) -> dict:
        return json.loads(self.row_path(config_hash).read_text())

    def read_perf(self, hashes: list[str]) -> pd.DataFrame:
        """The simulator-speed records of the done configurations among ``hashes``."""
        import pandas as pd

        paths = (self.perf_path(h) for h in dict.fromkeys(hashes) if self.done(h))
        return pd.DataFrame([json.loads(p.read_text()) for p in paths if p.is_file()])

    def collect(self, hashes: list[str], columns: list[str], resolved: dict | None = None,
                perf_columns: list[str] = ()) -> pd.DataFrame:
        """The done rows among ``hashes`` as one table, written as results.csv / results.parquet
        (sorted by policy in sweep order, then cache_slots), perf.csv and resolved_config.yaml. With no
        row done the tables hold their header only (``columns``, ``perf_columns``), which pandas reads
        as an empty table (an empty file it cannot read)."""
        import pandas as pd

        done = [h for h in dict.fromkeys(hashes) if self.done(h)]
        rows = [self.read_row(h) for h in done]
        df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
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
        if perf.empty:
            perf = pd.DataFrame(columns=list(perf_columns))
        atomic_write(self.out / "perf.csv", lambda f: perf.to_csv(f, index=False))
        if resolved is not None:
            atomic_write(self.out / "resolved_config.yaml",
                         lambda f: yaml.safe_dump(resolved, f, sort_keys=False, default_flow_style=None))
        return df

