"""The floors of the architecture, as an import contract (../shared/docs/ARCHITECTURE.md).

A package imports only from floors below it: the formats (traces, hardware), then the shared core
(offload: no SimPy, no CUDA), then the plug-ins (policies), then the clocks (sim, real; never each
other), then the comparison of the two (validation), then the commands (experiments) and figures (plots). That no command imports another is
checked beside the commands' own tests. Imports are read from the source with
``ast``, including those inside functions and under ``TYPE_CHECKING``: a knot hidden there is still a
knot.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "traces": {"hardware", "offload", "policies", "sim", "real", "experiments", "plots", "simpy", "torch"},
    "hardware": {"offload", "policies", "sim", "real", "experiments", "plots", "simpy", "torch"},
    "offload": {"policies", "sim", "real", "experiments", "plots", "simpy", "torch"},
    "policies": {"sim", "real", "experiments", "plots", "simpy", "torch"},
    "sim": {"real", "experiments", "plots", "torch"},
    "real": {"sim", "experiments", "plots", "simpy"},
    "validation": {"experiments", "plots"},
    "plots": {"experiments", "real", "simpy", "torch"},
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_reads_every_kind_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import a.b\nfrom c.d import e\nif X:\n    from f import g\ndef h():\n    import i\n"
                      "from . import j\n")
    assert imported_modules(source) == {"a", "c", "f", "i"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_from_floors_below_it(package):
    broken = {}
    for source in sorted((ROOT / package).rglob("*.py")):
        bad = imported_modules(source) & FORBIDDEN[package]
        if bad:
            broken[source.relative_to(ROOT).as_posix()] = sorted(bad)
    assert not broken, f"imports across the architecture's floors: {broken}"

