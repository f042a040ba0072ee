"""What the sweep's printed table and summary leave out: a configuration that failed keeps its cell (marked
``failed``) instead of vanishing from the policy x slots table, each failure is listed once in the final block, and a
row whose perf record is missing is named in one line instead of leaving perf.csv short without a word."""
import pandas as pd
import pytest

from experiments.sweep import FAILED_CELL, main
from traces import save_trace, synthetic_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "gaps.npz"
    save_trace(synthetic_trace(num_tokens=800, num_layers=4, num_experts=8, top_k=2, num_requests=8, seed=5), path)
    return path


# Raises at run time (not in its constructor, which the sweep builds before anything runs) where {when}.
RAISING = '''from policies.lru import LRU


class Raising(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        if {when}:
            raise KeyError("slots")
'''


def _sweep(trace_path, out, *tokens):
    return main([f"trace={trace_path}", *tokens, "max_tokens=100", "--out", out, "--no-plots", "--workers", "1"])


def _raising(tmp_path, name: str, when: str):
    """A policy file in ``tmp_path`` that raises at run time where ``when``; its spec."""
    (tmp_path / f"{name}.py").write_text(RAISING.format(when=when))
    return f"{tmp_path / name}.py:Raising"


def _failing_sweep(trace_path, out, capsys, *tokens):
    """A sweep in which some configuration fails (exit code 1): what it printed, and its table's lines."""
    assert _sweep(trace_path, out, *tokens) == 1
    captured = capsys.readouterr()
    return captured, _table(captured.out)


def _table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("policy "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("slots = "))
    return lines[start:end + 1]


def test_a_configuration_that_failed_keeps_its_cell_in_the_table(trace_path, tmp_path, capsys):
    """The defect's own case: one policy, failing at 3 slots only. The slots=3 column was left out of the table
    (no row held it), as if never asked for; now it is there, its cell marked, and the footer still counts the
    configurations that have rows."""
    policy = _raising(tmp_path, "flaky", "self.ctx.cache_slots == 3")
    out = tmp_path / "out"
    captured, table = _failing_sweep(trace_path, out, capsys, f"policy={policy}", "cache_slots=2,3")
    assert "slots=2" in table[0] and "slots=3" in table[0], table
    (row,) = [x for x in table if x.startswith(f"{policy} ")]
    assert row.split()[-1] == FAILED_CELL and row.count("|") == 2, row     # slots=2's numbers, then the mark
    assert f"{FAILED_CELL}: the configuration failed, so it has no row in results.csv" in captured.out
    assert f"1 of 2 configurations in {out}/" in captured.out
    assert len(pd.read_csv(out / "results.csv")) == 1


def test_every_configuration_of_the_grid_is_in_the_table_in_grid_order(trace_path, tmp_path, capsys):
    """A policy failing at every slot count keeps its row (all cells marked) where the grid names it; one failing at
    one slot count has its numbers at the other; a policy that ran is untouched."""
    always = _raising(tmp_path, "always", "True")
    flaky = _raising(tmp_path, "flaky", "self.ctx.cache_slots == 2")
    out = tmp_path / "out"
    captured, table = _failing_sweep(trace_path, out, capsys, f"policy={always},lru,{flaky}", "cache_slots=2,3")
    body = table[3:-1]
    assert [x.split()[0] for x in body] == [always, "lru", flaky], table
    assert body[0].split()[1:] == [FAILED_CELL, FAILED_CELL]
    assert FAILED_CELL not in body[1] and body[1].count("|") == 4
    assert body[2].split()[1] == FAILED_CELL and body[2].count("|") == 2
    assert f"3 of 6 configurations in {out}/" in captured.out

    # Each failure: one line as it happens (progress), then once in the final block, whose header says so.
    err = captured.err.splitlines()
    header = [i for i, x in enumerate(err) if x.startswith("error: 3 of 6 configurations failed")]
    assert len(header) == 1 and "listed once each here" in err[header[0]], captured.err
    listed = err[header[0] + 1:header[0] + 4]
    assert all(x.startswith("  config (") for x in listed) and len(set(listed)) == 3, listed
    live = [x for x in err[:header[0]] if x.startswith("error: config (")]
    assert sorted(x[len("error: "):] for x in live) == sorted(x.strip() for x in listed)
    assert sum("KeyError" in x for x in err) == 6


def test_a_missing_perf_record_is_named_and_deleting_the_row_recomputes_it(trace_path, tmp_path, capsys):
    """A row whose OUT/perf/<hash>.json is gone (deleted, or rows copied without perf/) was left out of perf.csv
    without a word. It is still whole and kept, not recomputed behind the user's back; one line names it, says its
    speed is unknown and how to measure it; doing that fills perf.csv again."""
    out = tmp_path / "out"
    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2,3") == 0
    capsys.readouterr()
    hashes = list(pd.read_csv(out / "results.csv")["config_hash"])
    gone = hashes[1]
    (out / "perf" / f"{gone}.json").unlink()
    row = out / "rows" / f"{gone}.json"
    written = row.stat().st_mtime_ns

    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2,3") == 0
    stdout = capsys.readouterr().out
    assert "resumed: 2 of 2 already done" in stdout
    (note,) = [x for x in stdout.splitlines() if "no perf record" in x]
    assert note.startswith(f"note: 1 of 2 rows has no perf record (missing in {out / 'perf'}/: {gone}.json): "
                           f"perf.csv leaves it out and its simulator speed is unknown (the speed above is the other "
                           f"rows'); to measure it, delete the row of the same name in {out / 'rows'}/"), note
    assert len(pd.read_csv(out / "results.csv")) == 2 and list(pd.read_csv(out / "perf.csv")["config_hash"]) == [
        hashes[0]]
    assert row.stat().st_mtime_ns == written       # the row is kept as it was

    # Every perf record gone: the line is still there, with no speed above it to refer to.
    (out / "perf" / f"{hashes[0]}.json").unlink()
    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2,3") == 0
    stdout = capsys.readouterr().out
    assert "simulator speed:" not in stdout
    assert (f"note: 2 of 2 rows have no perf record (missing in {out / 'perf'}/: {hashes[0]}.json, {gone}.json): "
            f"perf.csv leaves them out and their simulator speed is unknown; to measure it, delete the rows of the "
            f"same names in {out / 'rows'}/") in stdout

    # As the line says: the rows deleted, the same command recomputes them, perf records included.
    for h in hashes:
        (out / "rows" / f"{h}.json").unlink()
    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2,3") == 0
    stdout = capsys.readouterr().out
    assert "no perf record" not in stdout
    assert sorted(pd.read_csv(out / "perf.csv")["config_hash"]) == sorted(hashes)
