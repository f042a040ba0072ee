"""Policy registry: one policy = one file + one line in ``BUILTIN``.

The sweep, the simulator and the engine look policies up here. A user's own policy needs no edit
of the package: ``my_policy.py:MyPolicy`` (a file path) or ``my_package.module:MyPolicy``. A policy
file imports modules beside it as a script does: its folder is first on ``sys.path`` while it loads. One
process holds one module of a name, so a module beside it that it imports is refused when it bears the name
of one of the project's packages or of a module already loaded from another file (another policy's helper).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import site
import sys
import sysconfig
import traceback
import types
from pathlib import Path

from offload.policy import Policy
from traces.digest import bytes_sha256

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


def _load_site(err: BaseException, source: Path | None, module_file: str | None = None) -> str:
    """Where loading a policy's module failed: the file and line of a syntax error, else the deepest
    frame in ``source`` (the policy file) or, without one, the deepest frame outside the standard library and
    site-packages; with no such frame (a
    file that does not compile as Python text, its null bytes, say) the file alone: ``source`` or
    ``module_file`` (the module's, given as module:Class)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    if source is not None:
        frame = _innermost(err.__traceback__, source)
    else:
        frames = traceback.extract_tb(err.__traceback__)
        # not the import machinery's frames (a module that does not compile raises in importlib) nor this one's
        frame = next((f for f in reversed(frames) if not f.filename.startswith("<frozen")
                      and Path(f.filename).resolve() != Path(__file__).resolve()
                      and not any(Path(f.filename).resolve().is_relative_to(lib) for lib in _LIBRARIES)), None)
    if frame is not None:
        return f"{frame.filename}:{frame.lineno}"
    return str(source or module_file or "?")


@contextlib.contextmanager
def _beside(path: Path):
    """The policy file's folder first on ``sys.path`` while the block runs, as Python puts a script's:
    the file imports the modules beside it without PYTHONPATH."""
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _load_file(path: Path):
    if not path.is_file():
        raise PolicyLoadError(f"policy file {path} does not exist; give an existing .py file as FILE.py:Class")
    # Keyed by path and content: an edited file is loaded anew, even in a long-lived process; so is one
    # whose own modules (``user_sources``, found once at load) changed since it was loaded, with those
    # modules. Only their digests are compared on a hit: any edit among them (a new import line included)
    # changes one, and a deleted one changes the list; the reload finds the modules anew.
    digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + path.read_bytes()).hexdigest()[:16]
    mod_name = f"_user_policy_{digest}"
    module = sys.modules.get(mod_name)
    if module is not None:
        sources = module._user_sources
        if module._user_sources_loaded != _digests(p for p in sources if p.is_file()):
            for name, loaded in list(sys.modules.items()):
                if user_module_file(getattr(loaded, "__file__", None)) in sources:
                    del sys.modules[name]
            module = None
    if module is None:
        clashes = _clashes(path.resolve().parent)
        # Another policy's modules of a clashing name step aside while this file loads, so that importing the
        # name, however (importlib included), loads this folder's module and shows in what the load imported.
        others = {name for name, (_, _, project) in clashes.items() if not project}
        hidden = {n: m for n, m in sys.modules.items() if n.partition(".")[0] in others}
        for name in hidden:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        before = set(sys.modules)
        failure = None
        try:
            with _beside(path):
                spec.loader.exec_module(module)
        except (Exception, SystemExit) as err:  # noqa: BLE001  (whatever the file raises is reported as one line)
            failure = err
        imported = set(sys.modules) - before
        clash = _clash_used(path, clashes, imported) if clashes else None
        if clash is not None or failure is not None:
            # Undone: the file, and the user's modules it imported (a project package they shadowed among them).
            for name in imported:
                if user_module_file(getattr(sys.modules[name], "__file__", None)) is not None:
                    del sys.modules[name]
            del sys.modules[mod_name]
        sys.modules.update(hidden)
        if clash is not None:
            raise PolicyLoadError(clash)
        if failure is not None:
            fix = ("fix the file's import, or put the module beside the file, install it or add its folder to "
                   "PYTHONPATH"
                   if isinstance(failure, ModuleNotFoundError) else "fix the file")
            raise PolicyLoadError(f"{_load_site(failure, path)}: policy file {path} does not load: "
                                  f"{_one_line(failure)}; {fix}") from None
        # Imported while it loaded, however (importlib included): the user's modules among them count too.
        module._user_modules_imported = sorted(imported)
        module._user_sources = user_sources(module)
        module._user_sources_loaded = _digests(module._user_sources)
    return module


def _clashes(folder: Path) -> dict[str, tuple[Path, Path, bool]]:
    """The modules in ``folder`` (a policy file's, first on ``sys.path`` while the file loads) whose name means
    another module in this process: name -> (the folder's module, the other, whether the other is one of the
    project's packages). A module's name is global in a process: the folder's ``plots.py`` would stand for the
    project's ``plots`` package wherever it is imported, and a second policy's ``helper.py`` would be ignored
    for the first's ``helper``, already loaded. A folder without ``__init__.py`` shadows nothing."""
    tops = {n for n in sys.modules if "." not in n}
    try:
        names = {entry.name.partition(".")[0] for entry in folder.iterdir()}
    except OSError:
        return {}
    found = {}
    for name in sorted(names & (tops | set(_PROJECT_PACKAGES))):
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, [str(folder)])
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.has_location:
            continue
        ours = Path(spec.origin).resolve()
        if name in _PROJECT_PACKAGES:
            theirs = _PROJECT / name
            if not ours.is_relative_to(theirs):          # the policy file in the project's root: its own
                found[name] = (ours, theirs, True)
            continue
        theirs = user_module_file(getattr(sys.modules[name], "__file__", None))
        if theirs is not None and theirs != ours:
            found[name] = (ours, theirs, False)
    return found


def _clash_used(path: Path, clashes: dict[str, tuple[Path, Path, bool]], imported: set[str]) -> str | None:
    """The message refusing the policy file ``path`` when it uses one of the ``clashes`` of its folder (imports
    it while loading, or names it in an import statement of its own or of a user's module it loaded), or None."""
    sources = [path, *(p for p in (user_module_file(getattr(sys.modules.get(n), "__file__", None)) for n in imported)
                       if p is not None)]
    used = {n.partition(".")[0] for n in imported}
    for source in sources:
        used.update(n.partition(".")[0] for n in imported_module_names(source, None))
    name = next((n for n in clashes if n in used), None)
    if name is None:
        return None
    ours, theirs, project = clashes[name]
    if project:
        return (f"policy file {path} imports {name}, and {ours} beside it has the name of the project's package "
                f"{name} ({theirs}): one process holds one module of a name, so one would stand for the other; "
                f"rename {ours.name} (and the imports of it)")
    return (f"policy file {path} imports {name}, which is {ours} beside it, but a module {name} from {theirs} "
            f"is already loaded (another policy's, or from PYTHONPATH), and one process holds one module of a "
            f"name: rename one of them")


def _import_module(spec: str, where: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name is not None and (where == err.name or where.startswith(err.name + ".")):
            raise PolicyLoadError(f"policy {spec!r}: cannot import module {where!r} ({err}); "
                                  f"check the name or put it on PYTHONPATH") from None
        raise PolicyLoadError(f"{_load_site(err, None)}: policy module {where!r} does not load: "
                              f"{_one_line(err)}; install the missing module or fix the import") from None
    except (Exception, SystemExit) as err:  # noqa: BLE001  (whatever the module raises is reported as one line)
        raise PolicyLoadError(f"{_load_site(err, None, _module_file(where))}: policy module {where!r} does not "
                              f"load: {_one_line(err)}; fix the module") from None


# How a policy parameter is written for the sweep (policy.NAME=value) and in every label of a policy given some.
POLICY_PARAM_PREFIX = "policy."


def param_text(value) -> str:
    """A policy parameter's value as it is written on the command line (true, null, 0.5, text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def policy_label(policy: str, params) -> str:
    """The policy with the parameters given to it (a dict or (name, value) pairs), as every command labels a
    configuration: ``oracle policy.cross_tokens=false``; a policy given none keeps its plain name."""
    items = params.items() if isinstance(params, dict) else params
    return " ".join([policy, *(f"{POLICY_PARAM_PREFIX}{k}={param_text(v)}" for k, v in items)])


def _named_module(spec: str) -> tuple[types.ModuleType, str, str]:
    """(the module that ``spec`` names, loaded; its file or module name as given; the class's name)."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise PolicyLoadError(f"unknown policy {spec!r}; registered: {', '.join(available_policies())}; "
                              f"or give your own as FILE.py:Class or module:Class")
    where, cls_name = target.rsplit(":", 1)
    return (_load_file(Path(where)) if where.endswith(".py") else _import_module(spec, where)), where, cls_name


def resolve_policy(spec: str) -> type[Policy]:
    """A registered name, ``path/to/file.py:Class`` or ``package.module:Class``."""
    module, where, cls_name = _named_module(spec)
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise PolicyLoadError(f"policy {spec!r}: {where} has no class {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyLoadError(f"policy {spec!r}: {cls_name} must subclass policies.Policy")
    if cls.choose_victim is Policy.choose_victim:
        raise PolicyLoadError(f"policy {spec!r}: {cls_name} does not implement the hook choose_victim(self, scope, "
                              f"cache, job), which every policy needs to make room for a copy; define it (return "
                              f"an evictable key of `scope`, e.g. from cache.evictable(scope)) or subclass a "
                              f"policy that has one (policies.lru.LRU)")
    return cls


# The fix for an error whose cause is how a policy runs, not what its code says: added to the message of such
# an error raised in the policy's code (``crash_site``), since the one-line report names no cause.
_RUN_FIXES = (
    (lambda err: isinstance(err, ModuleNotFoundError),
     "a module imported inside a hook is looked up when the hook runs, and the policy file's folder is on "
     "sys.path only while the file loads: import it at the top of the file, install it or add its folder to "
     "PYTHONPATH"),
    (lambda err: type(err) is ValueError and "read-only" in str(err),
     "the run's traces are read-only for policies (one trace serves every configuration): copy what you "
     "change, e.g. np.array(ctx.trace.experts)"),
)


def crash_site(policy_cls: type[Policy], err: BaseException) -> str:
    """``file:line in function`` where ``err`` left the policy's code: the deepest frame in the
    class's own file, else in its base classes' files (so a user's file is named before the
    package's), else the deepest frame of all. An error of the policy's code that ``_RUN_FIXES`` knows
    gains its fix in its message (once), which the reports that call this read after it."""
    for c in policy_cls.__mro__:
        source = getattr(sys.modules.get(c.__module__), "__file__", None)
        frame = _innermost(err.__traceback__, Path(source)) if source else None
        if frame is not None:
            fix = next((fix for applies, fix in _RUN_FIXES if applies(err)), None)
            if fix is not None and fix not in str(err):
                err.args = (f"{err}; {fix}",)
                if isinstance(err, ImportError):
                    err.msg = err.args[0]
            break
    else:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames:
            return "?"
        frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


# What a run catches from the code it runs (a policy's hooks above all), to report that configuration as
# failed and go on with the others: every exception, and SystemExit too, since a policy's sys.exit() must
# not end a sweep or an engine command with no word about it. KeyboardInterrupt is left to end the command.
RUN_FAILURES = (Exception, SystemExit)


def failure_site(policy_cls: type, err: BaseException) -> str:
    """Where a run failed, for its one-line report: the hook that returned a value the controller refused
    (``PolicyError.site``: the error left the policy by returning), else ``crash_site``."""
    from offload.controller import PolicyError
    if isinstance(err, PolicyError) and err.site:
        return err.site
    return crash_site(policy_cls, err)


# The project's own packages: their code is in every row's code digest, not in a policy's.
_PROJECT = Path(__file__).resolve().parents[1]
_PROJECT_PACKAGES = ("traces", "hardware", "offload", "policies", "sim", "real", "validation", "experiments", "plots")
_LIBRARIES = {Path(p).resolve() for p in (*(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib",
                                                                                  "platlib")),
                                           *site.getsitepackages(), site.getusersitepackages(),
                                           sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}


def user_module_file(filename: str | None) -> Path | None:
    """``filename`` (a module's ``__file__``, a profiled code object's file) resolved when it is a user's own
    module: an existing file outside the project's packages and outside the standard library, site-packages
    and the Python installation; else None. The rule that decides which modules' source a policy's key
    (``policy_sha256``) holds; ``experiments.bench_sim`` groups a profile's time by it."""
    if not filename:
        return None
    path = Path(filename).resolve()
    if not path.is_file():
        return None
    if any(path.is_relative_to(_PROJECT / p) for p in _PROJECT_PACKAGES):
        return None
    return None if any(path.is_relative_to(lib) for lib in _LIBRARIES) else path


def imported_module_names(source: Path, package: str | None) -> list[str]:
    """Every module name the import statements of the Python file ``source`` name, at module level or in a
    function, each with its parent packages (``a.b.c`` gives ``a``, ``a.b``, ``a.b.c``; ``from a import b`` gives
    ``a`` and ``a.b``, which may be a module or a name in ``a``), in order of first appearance. Relative imports
    are resolved against ``package`` (the package ``source`` is in; None for a top-level module: they are
    skipped). A file that does not parse names none. Read from the source, nothing is imported: the project's
    one import walker (a policy's own modules here, the engine's code key in ``validation.store``)."""
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except (SyntaxError, ValueError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module
            except (ImportError, ValueError):
                continue
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    parts = [name.split(".") for name in names if name]
    return list(dict.fromkeys(".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)))


def _module_file(name: str) -> str | None:
    """Where module ``name`` is, without importing it (a name whose parent is not imported is skipped)."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    parent = name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


def user_sources(module) -> set[Path]:
    """The user's own module files ``module`` depends on: its file (when a user's), and, transitively, every
    user's module that it or they import (by import statement, at module level or in a function) or that was
    imported while a policy file loaded. A user's module is any file outside the project's packages, the
    standard library, site-packages and the Python installation (``user_module_file``)."""
    start = user_module_file(getattr(module, "__file__", None))
    if start is None:
        return set()
    found, todo = set(), [(start, getattr(module, "__package__", None) or None)]
    for name in getattr(module, "_user_modules_imported", ()):
        loaded = sys.modules.get(name)
        path = user_module_file(getattr(loaded, "__file__", None))
        if path is not None:
            todo.append((path, getattr(loaded, "__package__", None) or None))
    # Names are looked up as the policy file's import saw them: its folder first on sys.path.
    with _beside(start) if module.__name__.startswith("_user_policy_") else contextlib.nullcontext():
        while todo:
            path, package = todo.pop()
            if path in found:
                continue
            found.add(path)
            for name in imported_module_names(path, package):
                dep = user_module_file(_module_file(name))
                if dep is not None and dep not in found:
                    todo.append((dep, name if dep.name == "__init__.py" else name.rpartition(".")[0] or None))
    return found


def _digests(paths) -> list[str]:
    return sorted(bytes_sha256(Path(p).read_bytes()) for p in paths)


def policy_sha256(spec: str) -> str:
    """Digest of the source files of the policy's class and its base classes, and of the user's own modules
    those import (``user_sources``: a helper module beside a policy file, a user's package on PYTHONPATH):
    a user's code is in no package's digest, and editing any of it must recompute the results it produced.
    The project's packages are in the rows' code digest; the standard library and installed packages are
    in neither."""
    # The module the spec names too: its class may be defined elsewhere (``Mine = A`` of a helper module, whose
    # classes' files are the same whichever of them it picks).
    modules = {sys.modules.get(c.__module__) for c in resolve_policy(spec).__mro__} | {_named_module(spec)[0]}
    modules.discard(None)
    sources = {Path(m.__file__).resolve() for m in modules if getattr(m, "__file__", None)}
    for m in modules:      # a policy file's set was found when it loaded (and checked by resolve_policy)
        stored = getattr(m, "_user_sources", None)
        sources |= stored if stored is not None else user_sources(m)
    # Contents only, sorted: the same files give the same digest wherever the project is checked out.
    return bytes_sha256("".join(_digests(sources)))
