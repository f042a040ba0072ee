"""A fresh user's policy files at the sweep's edges: a missing hook, SystemExit, a constructor that raises,
an --out that is a file, helper modules beside the policy file (imported without PYTHONPATH, and in the
digest that keys its rows)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.hook_signatures import check_hook_signatures
from experiments.sweep import main
from policies.registry import PolicyLoadError, policy_sha256, resolve_policy
from traces import save_trace, synthetic_trace

from conftest import refused

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "user.npz"
    save_trace(synthetic_trace(num_tokens=400, num_layers=4, num_experts=8, top_k=2, num_requests=8, seed=5), path)
    return path


def _sweep(trace_path, out, *tokens, workers=1):
    return main([f"trace={trace_path}", "max_tokens=100", *tokens, "--out", out, "--no-plots",
                 "--workers", str(workers)])


# -- a missing hook ------------------------------------------------------------------------------------

def test_a_policy_without_choose_victim_is_refused_naming_the_class_hook_and_fix(trace_path, tmp_path, capsys):
    policy = tmp_path / "novictim.py"
    policy.write_text("from offload.policy import Policy\n\n\nclass NoVictim(Policy):\n    pass\n")
    with pytest.raises(PolicyLoadError, match=r"NoVictim does not implement the hook choose_victim.*policies.lru.LRU"):
        resolve_policy(f"{policy}:NoVictim")
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={policy}:NoVictim") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NotImplementedError" not in err, err
    assert not out.exists()


HOOKS = {
    "missing-args": ("def choose_victim(self, scope):\n        return None", r"choose_victim\(self, scope\) \(at .*bad\.py:\d+\) cannot take"),
    "not-callable": ("choose_victim = 5", r"choose_victim is int 5, not a method"),
    "on_access-short": ("def on_access(self, access, key):\n        pass", r"on_access\(self, access, key\).*def on_access\(self, access, index, key, hit\)"),
    "async": ("async def on_access(self, access, index, key, hit):\n        pass", r"on_access is an async def"),
    "property": ("@property\n    def choose_victim(self):\n        return None", r"choose_victim is a property, not a method"),
    "prefetch-keyword-only": ("def prefetch(self, *, access):\n        return None", r"def prefetch\(self, access\)"),
}


@pytest.mark.parametrize("name", list(HOOKS))
def test_a_hook_that_cannot_take_the_controllers_arguments_is_refused_at_load(name, trace_path, tmp_path, capsys):
    """Was a TypeError at the first call, deep in the controller, once per configuration."""
    body, message = HOOKS[name]
    policy = tmp_path / "bad.py"
    policy.write_text(f"from policies.lru import LRU\n\n\nclass Bad(LRU):\n    {body}\n")
    with pytest.raises(PolicyLoadError, match=message):
        check_hook_signatures(f"{policy}:Bad", resolve_policy(f"{policy}:Bad"))
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={policy}:Bad") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("body", ["@staticmethod\n    def choose_victim(scope, cache, job):\n        return None",
                                  "def choose_victim(self, *args, **kwargs):\n        return super().choose_victim(*args)",
                                  "@classmethod\n    def on_insert(cls, key):\n        pass",
                                  "on_evict = type('Call', (), {'__call__': lambda self, key: None})()"])
def test_hooks_of_any_shape_that_take_the_arguments_load(body, tmp_path):
    policy = tmp_path / "fine.py"
    policy.write_text(f"from policies.lru import LRU\n\n\nclass Fine(LRU):\n    {body}\n")
    check_hook_signatures(f"{policy}:Fine", resolve_policy(f"{policy}:Fine"))


# -- SystemExit from policy code -----------------------------------------------------------------------

EXITING = '''from policies.lru import LRU


class Exit(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        if access.step > 5:
            raise {raises}
'''


@pytest.mark.parametrize("raises, what", [("SystemExit(3)", "SystemExit: 3"),
                                          ("KeyboardInterrupt('x')", "KeyboardInterrupt: x")])
@pytest.mark.parametrize("slots, workers", [("2", 1), ("2,3", 2)], ids=["one-config", "pool"])
def test_system_exit_in_a_hook_is_a_policy_failure_with_file_line_and_hook(trace_path, tmp_path, capsys, slots,
                                                                           workers, raises, what):
    """A sys.exit() or a KeyboardInterrupt raised by a policy's code (a real Ctrl-C reaches the sweep as a signal:
    tests/test_sweep_robustness.py) fails that configuration, in the sweep's process as in a worker."""
    policy = tmp_path / "exiting.py"
    policy.write_text(EXITING.format(raises=raises))
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy=lru,{policy}:Exit", f"cache_slots={slots}", workers=workers) == 1
    captured = capsys.readouterr()
    n = len(slots.split(","))
    assert f"{n} of {2 * n} configurations failed" in captured.err
    assert captured.err.count(f"{what} at {policy}:8 in on_access") == 2 * n   # as it happens, and at the end
    assert len(list((out / "errors").glob("*.txt"))) == n and len(list((out / "rows").glob("*.json"))) == n


def test_system_exit_while_a_policy_file_loads_is_one_line(tmp_path):
    policy = tmp_path / "exits.py"
    policy.write_text("import sys\n\nsys.exit(4)\n")
    with pytest.raises(PolicyLoadError, match=rf"^{policy}:3: policy file .* does not load: SystemExit: 4; fix the file"):
        resolve_policy(f"{policy}:Mine")


def test_a_policy_file_that_is_not_python_text_is_named(tmp_path, monkeypatch):
    """A file with null bytes (a binary saved as .py) fails to compile before any of its lines runs: the line
    named it "?" (a file given as FILE.py:Class) or importlib's own file (as module:Class); it names the file."""
    policy = tmp_path / "nulls.py"
    policy.write_bytes(b"class Mine:\n    pass\n\x00\x01\n")
    with pytest.raises(PolicyLoadError, match=rf"^{policy}: policy file {policy} does not load: SyntaxError: .*null"):
        resolve_policy(f"{policy}:Mine")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PolicyLoadError, match=rf"^{policy}: policy module 'nulls' does not load: SyntaxError: .*null"):
        resolve_policy("nulls:Mine")
    # A module that raises while it loads is still named at the line that raised, in the module it imported.
    (tmp_path / "raises_helper.py").write_text("x = 1\nraise RuntimeError('boom')\n")
    (tmp_path / "imports_raising.py").write_text("import raises_helper\n")
    with pytest.raises(PolicyLoadError, match=rf"^{tmp_path / 'raises_helper.py'}:2: policy module 'imports_raising' "
                                              r"does not load: RuntimeError: boom"):
        resolve_policy("imports_raising:Mine")


# -- exceptions from the constructor: found before anything runs --------------------------------------

CONSTRUCTORS = '''from policies.lru import LRU


class Seeded(LRU):
    parameters = {"seed": "a seed"}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.seed = int(ctx.params.get("seed", 0))


class Keyed(LRU):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.table = {}["missing"]


class Exits(LRU):
    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.cache_slots == 3:
            raise SystemExit(5)


class Picky(LRU):
    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.cache_slots == 3:
            raise ValueError("I hate 3 slots")
'''


@pytest.mark.parametrize("tokens, line", [
    (["policy={p}:Seeded", "policy.seed=abc", "cache_slots=2"],
     "error: policy={p}:Seeded policy.seed=abc: invalid literal for int() with base 10: 'abc' (at {p}:9 in __init__)"),
    (["policy={p}:Keyed", "cache_slots=2"],
     "error: policy={p}:Keyed cache_slots=2: building the policy raised KeyError: 'missing' at {p}:15 in __init__; "
     "fix its __init__"),
    # The grid's one slot count: every run of the policy would fail.
    (["policy={p}:Exits", "cache_slots=3"],
     "error: policy={p}:Exits cache_slots=3: building the policy raised SystemExit: 5 at {p}:22 in __init__"),
    (["policy={p}:Picky", "cache_slots=3"], "error: policy={p}:Picky: I hate 3 slots (at {p}:29 in __init__)"),
], ids=["value-error", "key-error", "system-exit-at-every-size", "value-error-at-every-size"])
def test_whatever_a_constructor_raises_at_every_configuration_is_refused_before_anything_runs_with_file_and_line(
        trace_path, tmp_path, capsys, tokens, line):
    policy = tmp_path / "ctors.py"
    policy.write_text(CONSTRUCTORS)
    out = tmp_path / "out"
    code = _sweep(trace_path, out, *(t.format(p=policy) for t in tokens))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(line.format(p=policy)), err
    assert not out.exists()


@pytest.mark.parametrize("cls, what, line", [("Picky", "ValueError: I hate 3 slots", 29),
                                             ("Exits", "SystemExit: 5", 22)])
def test_a_constructor_raising_at_one_slot_count_fails_that_configuration_only(trace_path, tmp_path, capsys, cls,
                                                                               what, line):
    """Built at each distinct context, the policy raises at cache_slots=3 only: that configuration fails like
    any other (one line naming it, with the file and line; its traceback kept), the others finish."""
    policy = tmp_path / "ctors.py"
    policy.write_text(CONSTRUCTORS)
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={policy}:{cls},lru", "cache_slots=2,3") == 1
    captured = capsys.readouterr()
    assert "1 of 4 configurations failed" in captured.err and "Traceback" not in captured.err
    assert captured.err.count(f"error: config (policy={policy}:{cls} cache_slots=3) failed: {what} at "
                              f"{policy}:{line} in __init__ (traceback: {out / 'errors'}") == 1
    assert len(list((out / "rows").glob("*.json"))) == 3 and len(list((out / "errors").glob("*.txt"))) == 1


# -- --out that is a file ------------------------------------------------------------------------------

@pytest.mark.parametrize("below", [False, True], ids=["the-file", "below-it"])
def test_out_that_is_a_file_is_refused_before_anything_runs(trace_path, tmp_path, capsys, below):
    blocking = tmp_path / "results.txt"
    blocking.write_text("keep me\n")
    out = blocking / "run" if below else blocking
    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2") == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --out {out}: {blocking} is a file, not a folder; give a folder (a new one is created), "
        f"or move the file away"]
    assert captured.out == "" and blocking.read_text() == "keep me\n"


@pytest.mark.parametrize("sub", ["rows", "perf", "errors"])
def test_out_whose_subfolder_takes_no_file_is_refused_before_anything_runs(trace_path, tmp_path, capsys,
                                                                           monkeypatch, sub):
    """OUT is writable but a folder the sweep writes in below it is not (read-only; made so by failing the
    creation, since tests may run as root): one line, exit code 2, nothing computed."""
    import tempfile
    out = tmp_path / "out"
    (out / sub).mkdir(parents=True)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out / sub:
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    assert _sweep(trace_path, out, "policy=lru", "cache_slots=2") == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --out {out}: nothing can be created in {out / sub} (Permission denied); give a folder you can "
        f"write to"]
    assert captured.out == "" and [p.name for p in out.iterdir()] == [sub]


# -- modules beside a policy file ----------------------------------------------------------------------

HELPED = '''from helper import MRU
from policies.lru import LRU


class Helped(LRU):
    def choose_victim(self, scope, cache, job):
        order = self.recency_order(scope, cache)
        return (order[-1] if MRU else order[0]) if order else None
'''


@pytest.fixture(autouse=True)
def _forget_helpers():
    """Each test's helper modules are its own: one process caches a module by name, as Python does."""
    def forget():
        for name in [n for n in sys.modules if n in ("helper", "mylib") or n.startswith("mylib.")]:
            del sys.modules[name]
    forget()
    yield
    forget()


def _helped(folder: Path, mru: bool) -> Path:
    (folder / "helper.py").write_text(f"MRU = {mru}\n")
    policy = folder / "helped.py"
    policy.write_text(HELPED)
    return policy


def test_a_policy_file_imports_modules_beside_it_without_pythonpath(tmp_path):
    policy = _helped(tmp_path, False)
    assert str(tmp_path) not in sys.path
    assert resolve_policy(f"{policy}:Helped").__name__ == "Helped"
    assert str(tmp_path) not in sys.path            # only while the file loads


def test_the_policy_digest_covers_the_users_modules_it_imports_and_nothing_else(tmp_path):
    pkg = tmp_path / "mylib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "deep.py").write_text("from . import deeper\n")
    (pkg / "deeper.py").write_text("K = 1\n")
    policy = _helped(tmp_path, False)
    policy.write_text("import json\nimport numpy\nimport mylib.deep\n" + HELPED)
    before = policy_sha256(f"{policy}:Helped")
    for path, text in [(pkg / "deeper.py", "K = 2\n"), (tmp_path / "helper.py", "MRU = 0\n")]:
        path.write_text(text)
        after = policy_sha256(f"{policy}:Helped")
        assert after != before, path
        before = after
    (tmp_path / "unrelated.py").write_text("X = 1\n")
    assert policy_sha256(f"{policy}:Helped") == before
    # Built-in policies and the example: their digest is that of their class files, as before.
    assert policy_sha256("examples/my_policy.py:PopularNextLayer") == policy_sha256(
        str(REPO / "examples/my_policy.py") + ":PopularNextLayer")


def _hits(out: Path) -> int:
    (row,) = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    return row["hits"]


def test_a_file_that_picks_its_class_from_a_helper_is_in_the_rows_key(trace_path, tmp_path, capsys):
    """``pick.py`` holds ``Mine = A`` of a helper module beside it; ``Mine = B`` (a class of the same module and
    bases) gave the same key, so the resumed sweep kept A's row for B without a word: the named file is in it."""
    (tmp_path / "pick_helpers.py").write_text(
        "from policies.lru import LRU\n\n\nclass A(LRU):\n    pass\n\n\nclass B(LRU):\n"
        "    def choose_victim(self, scope, cache, job):\n        return max(cache.evictable(scope), default=None)\n")
    pick = tmp_path / "pick.py"
    pick.write_text("from pick_helpers import A, B\n\nMine = A\n")
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={pick}:Mine", "cache_slots=3") == 0
    picked_a = _hits(out)
    pick.write_text("from pick_helpers import A, B\n\nMine = B\n")
    assert _sweep(trace_path, out, f"policy={pick}:Mine", "cache_slots=3") == 0
    assert "recomputing them (policy source changed: 1)" in capsys.readouterr().out
    assert _sweep(trace_path, tmp_path / "fresh", f"policy={pick}:Mine", "cache_slots=3") == 0
    assert _hits(tmp_path / "fresh") != picked_a
    assert len(list((out / "rows").glob("*.json"))) == 2 and _hits(tmp_path / "fresh") in {
        json.loads(p.read_text())["hits"] for p in (out / "rows").glob("*.json")}


def test_editing_a_helper_module_recomputes_the_row_in_process(trace_path, tmp_path, capsys):
    policy = _helped(tmp_path, False)
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={policy}:Helped", "cache_slots=3") == 0
    lru_like = _hits(out)
    (tmp_path / "helper.py").write_text("MRU = True\n")
    assert _sweep(trace_path, out, f"policy={policy}:Helped", "cache_slots=3") == 0
    assert "stale: 1 of 1 configurations have rows computed from other inputs; recomputing them " \
           "(policy source changed: 1)" in capsys.readouterr().out
    rows = sorted((out / "rows").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert json.loads(rows[-1].read_text())["hits"] != lru_like


def test_editing_a_helper_module_recomputes_the_row_in_a_fresh_process(trace_path, tmp_path):
    """The user's report: ``from helper import ...`` beside the policy, the sweep run, helper.py edited, run again."""
    policy = _helped(tmp_path, False)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run():
        return subprocess.run([sys.executable, "-m", "experiments.sweep", f"trace={trace_path}", f"policy={policy}:Helped",
                               "cache_slots=3", "max_tokens=100", "--no-plots", "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    first = run()
    assert first.returncode == 0, first.stderr
    (tmp_path / "helper.py").write_text("MRU = True\n")
    second = run()
    assert second.returncode == 0, second.stderr
    assert "resumed" not in second.stdout and "(policy source changed: 1)" in second.stdout


# -- parameter values equal in Python but not to a policy -----------------------------------------------

def test_true_and_1_are_two_values_of_a_policy_parameter(trace_path, tmp_path, capsys):
    """``policy.cross_tokens=true,1`` used to run one configuration: Python's True == 1 merged the values, so
    the 1 that oracle refuses was neither refused nor run. Both are kept, and the 1 is refused before
    anything runs; a policy that takes both runs one row of each."""
    from experiments.config import RunConfig
    from experiments.overrides import build_spec
    grid = build_spec(["policy=oracle", "policy.cross_tokens=true,1", "policy.x=1,1.0"]).grid()
    assert [c.to_dict()["policy_params"] for c in grid] == [
        {"cross_tokens": True, "x": 1}, {"cross_tokens": True, "x": 1.0}, {"cross_tokens": 1, "x": 1},
        {"cross_tokens": 1, "x": 1.0}]
    assert len(set(grid)) == 4 and RunConfig(policy_params=(("a", True),)) != RunConfig(policy_params=(("a", 1),))
    assert RunConfig(policy_params=(("a", 1),)) == RunConfig(policy_params=(("a", 1),))

    assert _sweep(trace_path, tmp_path / "oracle", "policy=oracle", "policy.cross_tokens=true,1", "cache_slots=2") == 2
    assert "policy=oracle policy.cross_tokens=1: policy oracle: cross_tokens=1 must be true or false" in \
        capsys.readouterr().err
    policy = tmp_path / "takes.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Takes(LRU):\n    parameters = {'flag': 'anything'}\n")
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={policy}:Takes", "policy.flag=true,1", "cache_slots=2") == 0
    import pandas as pd
    assert sorted(pd.read_csv(out / "results.csv")["policy_params"]) == ['{"flag": 1}', '{"flag": true}']


@pytest.mark.parametrize("where", ["yaml", "command-line"])
def test_two_values_of_one_label_are_refused_before_anything_runs(trace_path, tmp_path, capsys, where):
    """YAML's "1" and 1 (or a quoted "1" and 1 on the command line) are two configurations that every line, the
    table and its figures label policy.flag=1: the two rows could not be told apart. Refused in one line."""
    policy = tmp_path / "takes.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Takes(LRU):\n    parameters = {'flag': 'anything'}\n")
    out = tmp_path / "out"
    if where == "yaml":
        scenario = tmp_path / "s.yaml"
        scenario.write_text(f'trace: {trace_path}\npolicy: {policy}:Takes\ncache_slots: 2\npolicy.flag: ["1", 1]\n')
        tokens = ["--config", scenario]
    else:
        tokens = [f"policy={policy}:Takes", "cache_slots=2", 'policy.flag="1",1']
    line = refused(capsys, lambda: sys.exit(_sweep(trace_path, out, *tokens)))
    assert line == ("error: policy.flag: the values '1' (str) and 1 (int) are both labelled policy.flag=1 in the "
                    "table, its figures and its lines, so their rows could not be told apart; give one of them, or "
                    "each in a sweep of its own (--out apart)"), line
    assert not out.exists()


def test_a_quoted_value_is_a_string_as_in_a_yaml_scenario():
    """``policy.flag="1"`` reached the policy as the float 1.0 (and merged with 1.0 in the grid), while the
    same value in a YAML scenario stays the string "1"."""
    from experiments.overrides import build_spec
    grid = build_spec(["policy=lru", 'policy.flag="1",1,1.0,\'x\'']).grid()
    assert [c.to_dict()["policy_params"]["flag"] for c in grid] == ["1", 1, 1.0, "x"]
