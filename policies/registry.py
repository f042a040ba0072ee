"""Policy registry: one policy = one file + one line in ``BUILTIN``.

The sweep, the simulator and the engine look policies up here. A user's own policy needs no edit
of the package: ``my_policy.py:MyPolicy`` (a file path) or ``my_package.module:MyPolicy``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from offload.policy import Policy

BUILTIN: dict[str, str] = {
    "lru": "policies.lru:LRU",
    "lfu": "policies.lfu:LFU",
    "fifo": "policies.fifo:FIFO",
    "static": "policies.static:Static",
    "belady": "policies.belady:Belady",
    "oracle": "policies.oracle_prefetch:OraclePrefetch",
    "affinity": "policies.affinity:AffinityPrefetch",
    "mixtral-offloading": "policies.mixtral_offloading:MixtralOffloading",
    "lookahead": "policies.lookahead:Lookahead",
    "speculating-experts": "policies.speculating_experts:SpeculatingExperts",
    "speculating-experts-lossy": "policies.speculating_experts:SpeculatingExpertsLossy",
}

# What `python -m experiments.sweep` runs when no policy is named.
BASELINES: tuple[str, ...] = ("lru", "lfu", "fifo", "static", "belady", "oracle", "affinity")


def available_policies() -> list[str]:
    return sorted(BUILTIN)


def _load_file(path: Path, cls_name: str):
    if not path.is_file():
        raise ValueError(f"policy file {path} does not exist; give an existing .py file as FILE.py:Class")
    mod_name = f"_user_policy_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return module


def resolve_policy(spec: str) -> type[Policy]:
    """A registered name, ``path/to/file.py:Class`` or ``package.module:Class``."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown policy {spec!r}; registered: {', '.join(available_policies())}; "
                         f"or give your own as FILE.py:Class or module:Class")
    where, cls_name = target.rsplit(":", 1)
    if where.endswith(".py"):
        module = _load_file(Path(where), cls_name)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"policy {spec!r}: cannot import module {where!r} ({err}); "
                             f"check the name or put it on PYTHONPATH") from err
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ValueError(f"policy {spec!r}: {where} has no class {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(f"policy {spec!r}: {cls_name} must subclass policies.Policy")
    return cls
