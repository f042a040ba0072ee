"""A name with a leading underscore is its module's own: no other module of the project's packages imports it
(``from policies.registry import _user_file``) or reaches for it (``kernels._replay.stats``). What another
module needs is a public, documented name of the module that defines it, so there is one definition and the
module can change its private ones freely. (Tests may look inside: they are not checked here.)"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("traces", "hardware", "offload", "policies", "sim", "real", "validation", "experiments", "plots",
            "examples")
# Known and not yet replaced: (the importing file, the module, the name).
KNOWN: set[tuple[str, str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: Path) -> set[tuple[str, str]]:
    """(module, name) for each private name of one of the project's modules that ``source`` imports by name or
    reads as an attribute of a module it imported."""
    tree = ast.parse(source.read_bytes(), filename=str(source))
    modules: dict[str, str] = {}     # a local name bound by an import -> the project's module or name it is
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if _private(alias.name):
                    found.add((node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    top = alias.name.split(".")[0]
                    modules[alias.asname or top] = alias.name if alias.asname else top
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                found.add((".".join([modules[value.id], *chain]), node.attr))
    return found


def test_no_module_uses_another_modules_private_names():
    found = {(source.relative_to(ROOT).as_posix(), module, name)
             for package in PACKAGES for source in sorted((ROOT / package).rglob("*.py"))
             if "results" not in source.relative_to(ROOT).parts      # session scripts kept with their results
             for module, name in private_uses(source)}
    assert found - KNOWN == set(), "use a public name of the defining module instead"


def test_the_check_sees_both_forms(tmp_path):
    source = tmp_path / "user.py"
    source.write_text("from policies.registry import _user_file, resolve_policy\nfrom sim import kernels\n"
                      "import sim.simulator\n\ndef f():\n    return kernels._replay.stats, sim.simulator._Clock\n")
    assert private_uses(source) == {("policies.registry", "_user_file"), ("sim.kernels", "_replay"),
                                    ("sim.simulator", "_Clock")}
