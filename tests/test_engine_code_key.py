"""The engine results' and calibrations' code keys (``validation.store.engine_code`` / ``calibration_code``): the
modules the engine side imports, transitively, so that editing a module no engine run executes keeps the
stored runs, and editing one that it executes makes them stale."""
from __future__ import annotations

from pathlib import Path

import pytest

import validation.store as store


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A toy project: side.py (the engine side) imports eng.run; run imports eng.sub.deep inside a function,
    deep imports its sibling relatively; eng.calib (calibration only) imports eng.only_calib; eng.unused is
    imported by nothing."""
    _write(tmp_path, {
        "side.py": "from eng.run import go\nfrom eng.calib import measure\n",
        "eng/__init__.py": "",
        "eng/run.py": "def go():\n    from eng.sub.deep import x\n    return x\n",
        "eng/sub/__init__.py": "",
        "eng/sub/deep.py": "from .sibling import y\nx = y\n",
        "eng/sub/sibling.py": "y = 1\n",
        "eng/calib.py": "import eng.only_calib\n",
        "eng/only_calib.py": "z = 2\n",
        "eng/unused.py": "w = 3\n",
    })
    monkeypatch.setattr(store, "ROOT", tmp_path)
    monkeypatch.setattr(store, "ENGINE_PACKAGES", ("eng",))
    monkeypatch.setattr(store, "ENGINE_SIDE", ("side.py",))
    monkeypatch.setattr(store, "CALIBRATION_ONLY", ("eng.calib",))
    return tmp_path


def _names(paths, root):
    return sorted(p.relative_to(root).as_posix() for p in paths)


def test_the_closure_follows_imports_in_functions_relative_ones_and_parent_packages(project):
    assert _names(store.engine_modules(exclude=("eng.calib",)), project) == [
        "eng/__init__.py", "eng/run.py", "eng/sub/__init__.py", "eng/sub/deep.py", "eng/sub/sibling.py"]
    assert _names(store.engine_modules(exclude=()), project) == [
        "eng/__init__.py", "eng/calib.py", "eng/only_calib.py", "eng/run.py", "eng/sub/__init__.py",
        "eng/sub/deep.py", "eng/sub/sibling.py"]


def test_an_edit_outside_the_runs_closure_keeps_the_engine_key_and_changes_the_calibrations(project):
    engine, calibration = store.engine_code(), store.calibration_code()
    (project / "eng/unused.py").write_text("w = 4\n")
    assert (store.engine_code(), store.calibration_code()) == (engine, calibration)
    (project / "eng/only_calib.py").write_text("z = 5\n")
    assert store.engine_code() == engine and store.calibration_code() != calibration
    calibration = store.calibration_code()
    (project / "eng/sub/sibling.py").write_text("y = 6\n")        # reached only through a function's import
    assert store.engine_code() != engine and store.calibration_code() != calibration


def test_the_real_engine_side_reaches_the_engine_and_not_the_training_script():
    names = _names(store.engine_modules(), store.ROOT)
    assert {"real/engine.py", "real/copies.py", "real/graphs.py", "real/measurement.py", "offload/layer_turn.py",
            "policies/lru.py", "policies/lookahead.py", "traces/trace.py"} <= set(names)
    assert "real/calibration.py" not in names and "real/train_lm.py" not in names
    assert "real/calibration.py" in _names(store.engine_modules(exclude=()), store.ROOT)


def test_stored_results_are_ordered_by_the_time_they_record_not_the_files_mtime(tmp_path):
    """A git checkout gives every file the checkout's time: the fallback to an earlier measurement must not
    depend on it."""
    import json
    import os
    s = store.Store(tmp_path)
    folder = tmp_path / "engine" / "s"
    folder.mkdir(parents=True)
    for name, written, mtime in (("a", "2026-12-01T10:00:00+00:00", 300), ("b", "2026-12-01T11:00:00+00:00", 100),
                                 ("c", None, 500)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"name": name, **({"written_at": written} if written else {})}))
        os.utime(path, ns=(mtime, mtime))
    assert [r["name"] for r in s.engine_results("s")] == ["b", "a", "c"]


def test_changed_files_names_what_differs_and_none_without_a_record():
    now = {"real/engine.py": "b", "offload/cache.py": "c", "real/new.py": "n"}
    assert store.changed_files(None, now) is None and store.changed_files({}, now) is None
    recorded = {"real/engine.py": "a", "offload/cache.py": "c", "real/gone.py": "g"}
    assert store.changed_files(recorded, now) == ["real/engine.py", "real/gone.py", "real/new.py"]
    assert store.changed_files(now, now) == []
    assert set(store.engine_files()) == {p.relative_to(store.ROOT).as_posix() for p in store.engine_modules()}
