"""Policy registry: one policy = one file + one line in ``BUILTIN``.

The sweep, the simulator and the engine look policies up here. A user's own policy needs no edit
of the package: ``my_policy.py:MyPolicy`` (a file path) or ``my_package.module:MyPolicy``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
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


class PolicyLoadError(ValueError):
    """A policy spec that cannot be resolved, or a policy file that cannot be loaded; the message
    names the spec or file (and line) and the fix."""


def _one_line(err: BaseException) -> str:
    text = err.msg if isinstance(err, SyntaxError) else str(err)
    return f"{type(err).__name__}: {' '.join(text.split())}"


def _innermost(tb, source: Path) -> traceback.FrameSummary | None:
    """The deepest frame of ``tb`` that runs code from the file ``source``."""
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).resolve() == source.resolve()]
    return frames[-1] if frames else None


def _load_site(err: BaseException, source: Path | None) -> str:
    """Where loading a policy's module failed: the file and line of a syntax error, else the deepest
    frame in ``source`` (the policy file) or, without one, the deepest frame of all."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    if source is not None:
        frame = _innermost(err.__traceback__, source)
    else:
        frames = traceback.extract_tb(err.__traceback__)
        frame = next((f for f in reversed(frames) if not f.filename.startswith("<frozen")), None)
    return f"{frame.filename}:{frame.lineno}" if frame is not None else "?"


def _load_file(path: Path):
    if not path.is_file():
        raise PolicyLoadError(f"policy file {path} does not exist; give an existing .py file as FILE.py:Class")
    # Keyed by path and content: an edited file is loaded anew, even in a long-lived process.
    digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + path.read_bytes()).hexdigest()[:16]
    mod_name = f"_user_policy_{digest}"
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001  (whatever the file raises is reported as one line)
            del sys.modules[mod_name]
            raise PolicyLoadError(f"{_load_site(err, path)}: policy file {path} does not load: "
                                  f"{_one_line(err)}; fix the file") from None
    return module


def _import_module(spec: str, where: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name is not None and (where == err.name or where.startswith(err.name + ".")):
            raise PolicyLoadError(f"policy {spec!r}: cannot import module {where!r} ({err}); "
                                  f"check the name or put it on PYTHONPATH") from None
        raise PolicyLoadError(f"{_load_site(err, None)}: policy module {where!r} does not load: "
                              f"{_one_line(err)}; install the missing module or fix the import") from None
    except Exception as err:  # noqa: BLE001  (whatever the module raises is reported as one line)
        raise PolicyLoadError(f"{_load_site(err, None)}: policy module {where!r} does not load: "
                              f"{_one_line(err)}; fix the module") from None


def resolve_policy(spec: str) -> type[Policy]:
    """A registered name, ``path/to/file.py:Class`` or ``package.module:Class``."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise PolicyLoadError(f"unknown policy {spec!r}; registered: {', '.join(available_policies())}; "
                              f"or give your own as FILE.py:Class or module:Class")
    where, cls_name = target.rsplit(":", 1)
    module = _load_file(Path(where)) if where.endswith(".py") else _import_module(spec, where)
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise PolicyLoadError(f"policy {spec!r}: {where} has no class {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyLoadError(f"policy {spec!r}: {cls_name} must subclass policies.Policy")
    return cls


def crash_site(policy_cls: type[Policy], err: BaseException) -> str:
    """``file:line in function`` where ``err`` left the policy's code: the deepest frame in the
    class's own file, else in its base classes' files (so a user's file is named before the
    package's), else the deepest frame of all."""
    for c in policy_cls.__mro__:
        source = getattr(sys.modules.get(c.__module__), "__file__", None)
        frame = _innermost(err.__traceback__, Path(source)) if source else None
        if frame is not None:
            break
    else:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames:
            return "?"
        frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def failure_site(policy_cls: type, err: BaseException) -> str:
    """Where a run failed, for its one-line report: the hook that returned a value the controller refused
    (``PolicyError.site``: the error left the policy by returning), else ``crash_site``."""
    from offload.controller import PolicyError
    if isinstance(err, PolicyError) and err.site:
        return err.site
    return crash_site(policy_cls, err)


def policy_sha256(spec: str) -> str:
    """Digest of the source files of the policy's class and its base classes: a user's own policy file
    is in no package's digest, and editing it must recompute the results it produced."""
    from traces.digest import bytes_sha256
    sources = {getattr(sys.modules.get(c.__module__), "__file__", None) for c in resolve_policy(spec).__mro__}
    # Contents only, sorted: the same files give the same digest wherever the project is checked out.
    return bytes_sha256("".join(sorted(bytes_sha256(Path(f).read_bytes()) for f in sources if f)))
