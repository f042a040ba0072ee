"""Which results each figure in a sweep's folder was drawn from (``OUT/figures.json``), so that a call that
draws no figure (``--no-plots``, no ``--timeline``, no row finished) keeps an earlier call's figures that
still show its tables and removes only those that would show other results beside them.

A figure is drawn from the table (``results.csv``: the tokens/s and hit-rate figures) or from one
configuration's row (the timeline). It is kept while its file is the one recorded and what it was drawn from
is unchanged: the same ``results.csv`` rows (in any order: a grid given in another order draws the same
figures), or that row among this call's rows. A figure with no record (an older sweep's, or written by a call
killed before its record) is removed: nothing shows what it was drawn from; so is every earlier figure where the
record itself is damaged, which the verdict names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from traces.digest import bytes_sha256
from traces.io import atomic_write

RECORD = "figures.json"
TABLE = "results.csv"


def _digest(path: Path) -> str:
    return bytes_sha256(path.read_bytes())


def _rows_digest(path: Path) -> str:
    """The digest of a table's header and of its rows as a set: the same rows in another order give the same."""
    header, *rows = path.read_bytes().splitlines(keepends=True)
    return bytes_sha256(header + b"".join(sorted(rows)))


def table_source(out: Path) -> dict[str, str]:
    """The source of a figure drawn from ``out``'s table as written now."""
    return {"rows_sha256": _rows_digest(out / TABLE)}


def row_source(config_hash: str) -> dict[str, str]:
    """The source of a figure drawn from the run of one configuration, the row ``config_hash``."""
    return {"row": config_hash}


@dataclass(frozen=True)
class Verdict:
    kept: list[str]                 # earlier figures that show this call's results
    removed: list[tuple[str, str]]  # (figure, why it no longer shows them)
    damaged: str | None = None      # what is wrong with the record of the earlier figures, where it is damaged


def _read_record(path: Path) -> tuple[dict, str | None]:
    """The record at ``path`` ({} where there is none), and what is wrong with it where it is damaged."""
    if not path.is_file():
        return {}, None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {}, f"not a readable JSON record ({type(err).__name__}: {' '.join(str(err).split())})"
    if not isinstance(recorded, dict):
        return {}, f"holds a JSON {type(recorded).__name__}, not an object of figure names"
    return recorded, None


def settle(out: Path, drawn: dict[str, dict[str, str]], earlier: list[str], rows: set[str]) -> Verdict:
    """Record the figures this call ``drawn`` (name -> source, files written) and judge each of the ``earlier``
    names it did not draw that lies in ``out``: kept while it shows this call's results (its record holds, with
    ``rows`` the row hashes in this call's table), else removed. Writes the record of the figures left."""
    path = out / RECORD
    recorded, damaged = _read_record(path)     # a damaged record vouches for nothing: the verdict names it
    table_rows, table_bytes = _rows_digest(out / TABLE), _digest(out / TABLE)
    kept, removed, record = [], [], {}
    for name in earlier:
        figure = out / name
        if name in drawn or not figure.is_file():
            continue
        entry = recorded.get(name)
        why = None
        if damaged is not None:
            why = f"its record in {RECORD} is damaged"
        elif (not isinstance(entry, dict) or "sha256" not in entry
              or not {"rows_sha256", "table_sha256", "row"} & entry.keys()):
            why = "no record of what it was drawn from"
        elif entry["sha256"] != _digest(figure):
            why = "the file changed since it was drawn"
        elif (entry.get("rows_sha256", table_rows) != table_rows
              or entry.get("table_sha256", table_bytes) != table_bytes):  # (an older sweep's record: the bytes)
            why = f"drawn from another {TABLE} than this call's"
        elif "row" in entry and entry["row"] not in rows:
            why = f"drawn from a configuration's row that is not in this call's {TABLE}"
        if why is None:
            kept.append(name)
            record[name] = entry
        else:
            figure.unlink()
            removed.append((name, why))
    for name, source in drawn.items():
        record[name] = {"sha256": _digest(out / name), **source}
    if record or path.exists():
        atomic_write(path, lambda f: f.write(json.dumps(record, sort_keys=True, indent=1) + "\n"))
    return Verdict(kept, removed, damaged)
