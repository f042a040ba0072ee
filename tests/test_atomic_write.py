"""traces.io.atomic_write under a signal, and an empty result table read back (a Ctrl-C can leave either)."""
import os

import pytest

import traces.io as io
from real.bench.table import CsvTable, read_table


def test_an_interrupt_landing_after_the_rename_is_the_interrupt_not_a_missing_temp_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(tmp_path / "f.txt", lambda f: f.write("whole"))
    assert (tmp_path / "f.txt").read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_interrupt_before_the_rename_leaves_the_old_file_and_no_temp(tmp_path):
    (tmp_path / "f.txt").write_text("old")

    def half(f):
        f.write("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(tmp_path / "f.txt", half)
    assert (tmp_path / "f.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_an_empty_table_file_reads_as_an_empty_table_and_takes_rows(tmp_path):
    path = tmp_path / "engine.csv"
    path.write_text("\\n")
    assert read_table(path).empty
    table = CsvTable(path, keep=True, columns=["model", "policy"])
    table.add({"model": "m", "policy": "lru"})
    assert read_table(path).to_dict("records") == [{"model": "m", "policy": "lru"}]
