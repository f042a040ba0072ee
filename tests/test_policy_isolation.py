"""What a user's policy can reach of the rest of the process is not its to change (a fresh user's break
test): the traces its context holds are read-only for it, so one configuration cannot change another's
numbers."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.sweep import main
from hardware import load_hardware
from offload.predictors import TrackPredictor
from offload.session import RunSettings, open_session
from policies.belady import Belady
from policies.lru import LRU
from policies.mixtral_offloading import MixtralOffloading
from policies.registry import failure_site
from policies.static import Static
from sim.simulator import simulate
from traces import save_trace, synthetic_trace

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
