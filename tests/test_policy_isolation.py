"""What a user's policy can reach of the rest of the process is not its to change (a fresh user's break
test): the traces its context holds are read-only for it, so one configuration cannot change another's
numbers; its helper modules cannot stand in for another policy's or for one of the project's packages;
and its failures say what to do."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.sweep import main
from hardware import load_hardware
from offload.access import PrefetchRequest
from offload.controller import PolicyError
from offload.predictors import TrackPredictor
from offload.session import RunSettings, open_session
from policies.belady import Belady
from policies.lru import LRU
from policies.mixtral_offloading import MixtralOffloading
from policies.registry import PolicyLoadError, failure_site, resolve_policy
from policies.static import Static
from sim.simulator import simulate
from traces import save_trace, synthetic_trace

REPO = Path(__file__).resolve().parents[1]
H100 = load_hardware("h100-pcie5")


def _trace():
    """A small trace with a prediction track, made anew for each use (the reference to compare with)."""
    trace = synthetic_trace(num_tokens=60, num_layers=3, num_experts=8, top_k=2, num_requests=4, seed=3)
    track = np.random.default_rng(0).random((trace.num_tokens, 3, 1, 8)).astype(np.float32)
    return dataclasses.replace(trace, predictions={"pregate": track})


@pytest.fixture(autouse=True)
def _forget_user_modules(tmp_path):
    """A test's modules from its tmp_path are its own: one process keeps a module by name."""
    yield
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", None)).startswith(str(tmp_path))]:
        del sys.modules[name]


# -- 1. the traces a policy can reach are read-only for it ----------------------------------------------------------

class SortsInInit(LRU):
    """The break test's policy: keeps the routing, sorted in place."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.routing = ctx.trace.experts
        self.routing.sort(axis=-1)


class ZeroesInHook(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        self.ctx.trace.experts[:] = 0


class ZeroesTheTrainingSlice(Static):
    def __init__(self, ctx):
        ctx.train_trace.experts[:] = 0
        super().__init__(ctx)


class ZeroesTheTrack(MixtralOffloading):
    def prefetch(self, access):
        self.ctx.predictor.track[:] = 0
        return super().prefetch(access)


class ZeroesTheTracePredictions(MixtralOffloading):
    def prefetch(self, access):
        self.ctx.trace.predictions["pregate"][:] = 0
        return super().prefetch(access)


@pytest.mark.parametrize("writer, hook, victim", [
    (SortsInInit, "__init__", Belady), (ZeroesInHook, "on_access", Belady),
    (ZeroesTheTrainingSlice, "__init__", Static), (ZeroesTheTrack, "prefetch", MixtralOffloading),
    (ZeroesTheTracePredictions, "prefetch", MixtralOffloading)])
def test_a_policy_writing_a_trace_fails_at_its_hook_and_the_next_configuration_is_unchanged(writer, hook, victim):
    trace = _trace()
    train, run = trace.split(0.25)
    settings = RunSettings(cache_slots=4)
    with pytest.raises(ValueError, match="read-only") as err:
        simulate(run, writer, H100, settings, train_trace=train, path="reference")
    site = failure_site(writer, err.value)
    assert site.startswith(f"{__file__}:") and site.endswith(f"in {hook}"), site
    assert "the run's traces are read-only for policies" in str(err.value)     # the fix, in the one-line report
    fresh_train, fresh_run = _trace().split(0.25)
    for path in ("reference", "auto"):
        assert simulate(run, victim, H100, settings, train_trace=train, path=path).metrics == simulate(
            fresh_run, victim, H100, settings, train_trace=fresh_train, path=path).metrics
    # The caller's own arrays are as they were, and still its to write.
    assert np.array_equal(trace.experts, _trace().experts) and trace.experts.flags.writeable
    assert np.array_equal(trace.predictions["pregate"], _trace().predictions["pregate"])
    assert trace.predictions["pregate"].flags.writeable and run.experts.flags.writeable


def test_the_policy_sees_every_array_of_its_traces_read_only_without_a_copy():
    trace = _trace()
    train, run = trace.split(0.25)
    session = open_session(run.model, MixtralOffloading, RunSettings(cache_slots=4), expert_bytes=1, trace=run,
                           train_trace=train, predictor=TrackPredictor(run, "pregate", 1))
    ctx = session.policy.ctx
    track = ctx.predictor.track
    assert not track.flags.writeable and np.shares_memory(track, run.predictions["pregate"])
    for seen, own in [(ctx.trace, run), (ctx.train_trace, train)]:
        for field in dataclasses.fields(own):
            array = getattr(own, field.name)
            if isinstance(array, np.ndarray):
                assert not getattr(seen, field.name).flags.writeable and np.shares_memory(getattr(seen, field.name),
                                                                                          array), field.name
        assert not seen.predictions["pregate"].flags.writeable
        seen.predictions["extra"] = None                # its dicts are its own
        assert "extra" not in own.predictions


def test_the_engine_keeps_the_trace_from_a_policy_writing_it():
    torch = pytest.importorskip("torch")
    from real.engine import OffloadEngine
    from real.shape_model import random_model
    from traces import ModelShape
    shape = ModelShape("tiny-moe", num_layers=3, num_experts=6, top_k=2, hidden_size=32, expert_intermediate_size=64,
                       num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64)

    def trace():
        return synthetic_trace(num_tokens=16, num_layers=3, num_experts=6, top_k=2, num_requests=2,
                               seed=4).for_shape(shape)

    def run(policy, future):
        model = random_model(shape, "cpu", torch.float32, seed=1, max_len=64)
        engine = OffloadEngine(model, shape, policy, RunSettings(cache_slots=3), future=future)
        engine.replay(future)
        return engine.ctrl.stats

    shared = trace()
    for writer in (SortsInInit, ZeroesInHook):
        with pytest.raises(ValueError, match="read-only"):
            run(writer, shared)
    assert run(Belady, shared) == run(Belady, trace())


WRITES_IN_HOOK = '''from policies.lru import LRU


class Writes(LRU):
    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        self.ctx.trace.experts[:] = 0
'''

WRITES_IN_INIT = '''from policies.lru import LRU


class Writes(LRU):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.routing = ctx.trace.experts
        self.routing.sort(axis=-1)
'''


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "user.npz"
    save_trace(synthetic_trace(num_tokens=400, num_layers=4, num_experts=8, top_k=2, num_requests=8, seed=5), path)
    return path


def _sweep(trace_path, out, *tokens):
    return main([f"trace={trace_path}", "max_tokens=100", "cache_slots=3", *tokens, "--out", out, "--no-plots",
                 "--workers", "1"])


def _rows(out: Path) -> dict[str, dict]:
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    return {row["policy"]: {k: v for k, v in row.items() if k not in ("wall_s", "sim_layer_steps_per_s")}
            for row in rows}


def test_in_one_sweep_a_policy_writing_the_trace_fails_alone(trace_path, tmp_path, capsys):
    policy = tmp_path / "writes.py"
    policy.write_text(WRITES_IN_HOOK)
    assert _sweep(trace_path, tmp_path / "alone", "policy=lru,belady") == 0
    assert _sweep(trace_path, tmp_path / "out", f"policy={policy}:Writes,lru,belady") == 1
    err = capsys.readouterr().err
    assert "ValueError: assignment destination is read-only; the run's traces are read-only for policies" in err
    assert f"at {policy}:7 in on_access" in err
    alone = _rows(tmp_path / "alone")
    assert set(alone) == {"lru", "belady"} and _rows(tmp_path / "out") == alone


def test_a_policy_writing_the_trace_in_its_constructor_is_refused_before_anything_runs(trace_path, tmp_path, capsys):
    policy = tmp_path / "writes.py"
    policy.write_text(WRITES_IN_INIT)
    assert _sweep(trace_path, tmp_path / "out", f"policy={policy}:Writes,lru,belady") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "sort array is read-only; the run's traces are read-only for policies" in err
    assert f"at {policy}:8 in __init__" in err


# -- 2. helper modules of one name, beside two policies -----------------------------------------------------------

HELPED = '''import helper
from policies.lru import LRU


class Pol(LRU):
    name = helper.NAME
'''


def _policy(folder: Path, text: str = HELPED, helper: str | None = "helper") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if helper is not None:
        (folder / f"{helper}.py").write_text(f"NAME = {str(folder)!r}\n")
    (folder / "pol.py").write_text(text)
    return folder / "pol.py"


def test_two_policies_whose_helpers_share_a_name_are_refused_naming_both_files(tmp_path):
    first, second = _policy(tmp_path / "a"), _policy(tmp_path / "b")
    assert resolve_policy(f"{first}:Pol").name == str(tmp_path / "a")
    with pytest.raises(PolicyLoadError) as err:
        resolve_policy(f"{second}:Pol")
    message = str(err.value)
    assert f"policy file {second} imports helper, which is {tmp_path / 'b' / 'helper.py'} beside it" in message
    assert f"a module helper from {tmp_path / 'a' / 'helper.py'} is already loaded" in message
    assert message.endswith("rename one of them")
    # The first is as it was: its helper still the one loaded, the policy still resolving.
    assert sys.modules["helper"].__file__ == str(tmp_path / "a" / "helper.py")
    assert resolve_policy(f"{first}:Pol").name == str(tmp_path / "a")


@pytest.mark.parametrize("how", [
    "import importlib\nimportlib.import_module('helper')\n",                      # found while it loads
    "def later():\n    import helper\n",                                          # named by an import statement
    "import second_helper\n",                                                     # by a module of its own
])
def test_a_second_helper_of_the_name_is_found_however_it_is_imported(tmp_path, how):
    resolve_policy(f"{_policy(tmp_path / 'a')}:Pol")
    second = _policy(tmp_path / "b", how + "from policies.lru import LRU\n\n\nclass Pol(LRU):\n    pass\n")
    (tmp_path / "b" / "second_helper.py").write_text("import helper\n")
    with pytest.raises(PolicyLoadError, match="already loaded"):
        resolve_policy(f"{second}:Pol")
    assert "second_helper" not in sys.modules        # what the refused load imported of the user's is gone


def test_a_helper_of_the_name_that_the_policy_does_not_import_is_no_clash(tmp_path):
    resolve_policy(f"{_policy(tmp_path / 'a')}:Pol")
    other = _policy(tmp_path / "b", "from policies.lru import LRU\n\n\nclass Pol(LRU):\n    pass\n")
    assert resolve_policy(f"{other}:Pol").__name__ == "Pol"
    assert sys.modules["helper"].__file__ == str(tmp_path / "a" / "helper.py")


LAZY = '''from policies.lru import LRU


class Lazy(LRU):
    def choose_victim(self, scope, cache, job):
        import {module}
        return {module}.first(cache.evictable(scope))
'''


def test_a_helper_imported_inside_a_hook_from_pythonpath_still_works(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "lazyhelp.py").write_text("def first(keys):\n    return min(keys)\n")
    monkeypatch.syspath_prepend(str(lib))
    policy = _policy(tmp_path / "p", LAZY.format(module="lazyhelp"), helper=None)
    trace = _trace()
    assert simulate(trace, resolve_policy(f"{policy}:Lazy"), H100, RunSettings(cache_slots=4)).stats.evictions > 0


def test_one_sweep_of_two_policies_whose_helpers_share_a_name_stops_before_anything_runs(trace_path, tmp_path,
                                                                                          capsys):
    first, second = _policy(tmp_path / "a"), _policy(tmp_path / "b")
    out = tmp_path / "out"
    assert _sweep(trace_path, out, f"policy={first}:Pol,{second}:Pol") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "rename one of them" in err, err
    assert not (out / "rows").exists()


# -- 3. a helper named like one of the project's packages ---------------------------------------------------------

def _shadowing(folder: Path, name: str) -> Path:
    return _policy(folder, f"import {name}\nfrom policies.lru import LRU\n\n\nclass Pol(LRU):\n    pass\n", helper=name)


@pytest.mark.parametrize("name", ["sim", "validation", "real", "plots", "offload"])
def test_a_helper_named_like_a_project_package_is_refused_naming_it_and_the_package(tmp_path, name):
    before = dict(sys.modules)
    policy = _shadowing(tmp_path, name)
    with pytest.raises(PolicyLoadError) as err:
        resolve_policy(f"{policy}:Pol")
    assert str(err.value) == (
        f"policy file {policy} imports {name}, and {tmp_path / (name + '.py')} beside it has the name of the project's "
        f"package {name} ({REPO / name}): one process holds one module of a name, so one would stand for the other; "
        f"rename {name}.py (and the imports of it)")
    assert all(sys.modules.get(n) is m for n, m in before.items())
    assert not any(str(getattr(m, "__file__", None)).startswith(str(tmp_path)) for m in sys.modules.values())


def test_a_helper_shadowing_a_package_not_yet_imported_leaves_the_package_importable(tmp_path):
    """The break test's sweep: plots.py beside the policy, and the project's plots imported only at the end."""
    policy = _shadowing(tmp_path, "plots")
    script = (f"import sys\nfrom policies.registry import PolicyLoadError, resolve_policy\n"
              f"assert 'plots' not in sys.modules\n"
              f"try:\n    resolve_policy({str(policy)!r} + ':Pol')\nexcept PolicyLoadError as err:\n    print(err)\n"
              f"import plots.figures\nprint(plots.__file__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, imported = done.stdout.strip().splitlines()
    assert f"{tmp_path / 'plots.py'} beside it has the name of the project's package plots" in refused
    assert imported == str(REPO / "plots" / "__init__.py")


def test_a_file_or_data_folder_named_like_a_package_that_the_policy_does_not_import_is_no_clash(tmp_path):
    policy = _policy(tmp_path, "from policies.lru import LRU\n\n\nclass Pol(LRU):\n    pass\n", helper="sim")
    (tmp_path / "traces").mkdir()                   # a folder of data: no __init__.py, it shadows nothing
    (tmp_path / "traces" / "run.npz").write_bytes(b"")
    assert resolve_policy(f"{policy}:Pol").__name__ == "Pol"
    assert sys.modules["sim"].__file__ == str(REPO / "sim" / "__init__.py")


def test_a_folder_whose_package_is_the_projects_own_is_no_clash(tmp_path):
    """A policy file in the project's root imports the project's packages beside it (here: a link to one)."""
    policy = _policy(tmp_path, "import sim\nfrom policies.lru import LRU\n\n\nclass Pol(LRU):\n    pass\n", helper=None)
    (tmp_path / "sim").symlink_to(REPO / "sim")
    assert resolve_policy(f"{policy}:Pol").__name__ == "Pol"


# -- 4. messages ---------------------------------------------------------------------------------------------------

class PreloadsEverything(LRU):
    def preload(self):
        return [(k, False) for k in range(self.ctx.num_layers * self.ctx.num_experts)]


def test_an_oversized_preload_gives_the_rule_first_and_a_short_key_list():
    shape = synthetic_trace(num_tokens=4, num_layers=24, num_experts=32, top_k=4).model
    with pytest.raises(PolicyError) as err:
        open_session(shape, PreloadsEverything, RunSettings(cache_slots=4), expert_bytes=1)
    message = str(err.value)
    assert message == ("policy PreloadsEverything.preload returned 768 entries [(0, False), (1, False), (2, False), "
                       "(3, False), ...]: 32 experts of scope 0 for its 4 slots: no free slot left; preload at most "
                       "the cache's slots")
    assert len(err.value.value) == 768          # the value itself is kept whole


class PrefetchesFarPastTheEnd(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(10 ** 9, access.step + 1)]


class PrefetchesTheLastKeyOfTheLayerPastTheEnd(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(self.ctx.num_layers * self.ctx.num_experts + self.ctx.num_experts - 1, access.step + 1)]


@pytest.mark.parametrize("policy, hinted", [(PrefetchesFarPastTheEnd, False),
                                            (PrefetchesTheLastKeyOfTheLayerPastTheEnd, True)])
def test_the_last_layer_hint_is_only_for_a_key_within_one_layer_past_the_end(policy, hinted):
    rule = r"out of range: expert keys are in \[0, 24\) \(3 layers x 8 experts\)"
    with pytest.raises(PolicyError, match=rule) as err:
        simulate(_trace(), policy, H100, RunSettings(cache_slots=4))
    assert ("a prefetch past the last layer" in str(err.value)) == hinted


def test_a_module_missing_for_an_import_inside_a_hook_gets_the_pythonpath_fix(trace_path, tmp_path, capsys):
    policy = _policy(tmp_path, LAZY.format(module="lazyhelp"), helper=None)
    assert _sweep(trace_path, tmp_path / "out", f"policy={policy}:Lazy") == 1
    err = capsys.readouterr().err
    assert (f"ModuleNotFoundError: No module named 'lazyhelp'; a module imported inside a hook is looked up when the "
            f"hook runs, and the policy file's folder is on sys.path only while the file loads: import it at the top "
            f"of the file, install it or add its folder to PYTHONPATH at {policy}:6 in choose_victim") in err
