"""The controller checks every key and victim a policy returns, in both clocks (issue: user policies
are trusted blindly). A violation is one PolicyError naming the policy class, the hook, the value
and the rule; never a bare IndexError/KeyError deep in the cache, never a silent wrong row."""
from __future__ import annotations

import numpy as np
import pytest
from pathlib import Path

from hardware import load_hardware
from offload.access import PrefetchRequest
from offload.controller import PolicyError
from offload.session import RunSettings
from policies.lru import LRU
from sim.replay import replay_untimed
from sim.simulator import simulate
from traces import synthetic_trace

TRACE = synthetic_trace(num_tokens=40, num_layers=3, num_experts=8, top_k=2, seed=3)
H100 = load_hardware("h100-pcie5")


class NextLayerUnguarded(LRU):
    """Prefetches 'the next layer' without guarding the last one: keys >= layers * experts."""

    def prefetch(self, access):
        base = (access.layer + 1) * self.ctx.num_experts
        return [PrefetchRequest(base + e, access.step + 1) for e in access.experts]


class VictimOfAnotherLayer(LRU):
    def choose_victim(self, scope, cache, job):
        return ((scope + 1) % self.ctx.num_layers) * self.ctx.num_experts


class VictimInUse(LRU):
    def choose_victim(self, scope, cache, job):
        in_use = [k for k in cache.residents() if cache.scope(k) == scope and not cache.is_evictable(k)]
        return in_use[0] if in_use else super().choose_victim(scope, cache, job)


class PrefetchGarbage(LRU):
    def prefetch(self, access):
        return ["not a request"]


class PrefetchFloatKey(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(1.5, access.step + 1)]


class PreloadTooMuch(LRU):
    def preload(self):
        return [(k, False) for k in range(self.ctx.num_experts)]     # 8 keys of layer 0 into 4 slots


class PreloadNone(LRU):
    def preload(self):
        return None             # a forgotten ``return list``


INSERTED: list[int] = []


class PreloadBadLastEntry(LRU):
    """A valid entry, then a broken one: refused before anything is placed or reported inserted."""

    def preload(self):
        return [(0, False), ("1", False)]

    def on_insert(self, key):
        INSERTED.append(key)
        super().on_insert(key)


class PrefetchBoolKey(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(True, access.step + 1)]      # True is not expert 1


class RefusesDemand(LRU):
    def choose_victim(self, scope, cache, job):
        return None


class PinsFillTheScope(LRU):
    """Pins every slot of layer 0 (and in global mode the shared ones): a miss can never get a slot."""

    def preload(self):
        return [(k, True) for k in range(self.ctx.cache_slots * (1 if self.ctx.cache_mode == "per_layer" else 3))]


class ExecutesFloats(LRU):
    lossless = False

    def execute(self, access):
        return [float(e) for e in access.experts]


class NumpyKeys(LRU):
    """numpy integers are valid keys (policies often compute them with numpy)."""

    def prefetch(self, access):
        if access.layer + 1 >= self.ctx.num_layers:
            return []
        base = (access.layer + 1) * self.ctx.num_experts
        return [PrefetchRequest(np.int64(base + e), np.int64(access.step + 1)) for e in access.experts]


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("policy, hook, rule", [
    (NextLayerUnguarded, "prefetch", r"expert keys are in \[0, 24\).*a prefetch past the last layer"),
    (VictimOfAnotherLayer, "choose_victim", "the victim must be in the asked scope"),
    (VictimInUse, "choose_victim", "resident, unpinned and not in use"),
    (PrefetchGarbage, "prefetch", "expected a list of PrefetchRequest"),
    (PrefetchFloatKey, "prefetch", "an expert key must be an integer"),
    (PreloadTooMuch, "preload", "no free slot left"),
    (PreloadNone, "preload", r"expected a list of \(key, pinned\) pairs"),
    (PreloadBadLastEntry, "preload", "an expert key must be an integer"),
    (PrefetchBoolKey, "prefetch", "an expert key must be an integer"),
    (RefusesDemand, "choose_victim", "may refuse only prefetches"),
    (PinsFillTheScope, "preload", "pinned experts leave no slot of scope 0 for a demand fetch"),
    (ExecutesFloats, "execute", r"expected 2 distinct integer expert ids in \[0, 8\)"),
])
def test_a_policy_that_breaks_a_rule_gets_one_error_naming_it(policy, hook, rule, mode):
    if policy is VictimOfAnotherLayer and mode == "global":
        pytest.skip("one scope in global mode: every layer's expert is in the asked scope")
    for run in (lambda s: replay_untimed(TRACE, policy, s),
                lambda s: simulate(TRACE, policy, H100, s)):
        with pytest.raises(PolicyError, match=rule) as err:
            run(RunSettings(cache_slots=4 if mode == "per_layer" else 2, cache_mode=mode))
        assert f"policy {policy.__name__}.{hook} returned" in str(err.value)
    assert not INSERTED


class VictimPastTheEnd(LRU):
    def choose_victim(self, scope, cache, job):
        return self.ctx.num_layers * self.ctx.num_experts


class PrefetchNegative(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(-1, access.step + 1)]


@pytest.mark.parametrize("policy, hook", [(NextLayerUnguarded, "prefetch"), (VictimPastTheEnd, "choose_victim"),
                                          (PrefetchNegative, "prefetch")])
def test_an_out_of_range_key_hints_the_last_layer_only_for_a_prefetch_past_it_and_names_the_hook_site(policy, hook):
    with pytest.raises(PolicyError, match=r"expert keys are in \[0, 24\)") as err:
        simulate(TRACE, policy, H100, RunSettings(cache_slots=4))
    past_the_last = policy is NextLayerUnguarded
    assert ("a prefetch past the last layer" in str(err.value)) == past_the_last
    assert "guard the last layer" not in str(err.value)
    # The file and line of the class's hook: the controller's own frames say nothing of the user's code.
    line = getattr(policy, hook).__code__.co_firstlineno
    assert err.value.site == f"{__file__}:{line} in {hook}"


class PrefetchForThePast(LRU):
    def prefetch(self, access):
        return [PrefetchRequest(((access.layer + 1) % self.ctx.num_layers) * self.ctx.num_experts, access.step - 100)]


@pytest.mark.parametrize("clock", ["replay", "reference"])
def test_a_prefetch_needed_in_the_past_is_refused_naming_the_step(clock):
    """A need step before the asking layer's own (a slip in token * num_layers + layer) would be queued as the
    most urgent prefetch of all: refused, naming both steps."""
    with pytest.raises(PolicyError, match=r"need_step -?\d+ is in the past: the layer asking is at step \d+") as err:
        if clock == "replay":
            replay_untimed(TRACE, PrefetchForThePast, RunSettings(cache_slots=4))
        else:
            simulate(TRACE, PrefetchForThePast, H100, RunSettings(cache_slots=4), path="reference")
    assert err.value.site == f"{__file__}:{PrefetchForThePast.prefetch.__code__.co_firstlineno} in prefetch"


def test_numpy_integer_keys_are_accepted_and_counted_as_their_ints():
    settings = RunSettings(cache_slots=3)
    stats = replay_untimed(TRACE, NumpyKeys, settings)
    assert stats.prefetches > 0 and stats.accesses == TRACE.experts.size


@pytest.mark.parametrize("hook", ["choose_victim", "on_access", "prefetch"])
@pytest.mark.parametrize("clock", ["replay", "reference"])
def test_a_hook_raising_stop_iteration_is_named_not_a_bare_runtime_error(hook, clock):
    """Inside a generator Python turns a StopIteration into 'RuntimeError: generator raised StopIteration';
    the layer turn names the policy and hook instead."""
    from hardware import load_hardware
    from offload.controller import PolicyError
    from offload.session import RunSettings
    from policies.oracle_prefetch import OraclePrefetch
    from sim.replay import replay_untimed
    from sim.simulator import simulate
    from traces import load_trace

    def stop(self, *args, **kwargs):
        raise StopIteration

    stop.__code__ = stop.__code__.replace(co_name=hook)      # as a user's hook of that name would be
    cls = type("Stopper", (OraclePrefetch,), {hook: stop})
    trace = load_trace(Path(__file__).resolve().parent / "data" / "tiny-moe-trace.npz")
    settings = RunSettings(cache_slots=3)
    with pytest.raises(PolicyError, match=f"Stopper.{hook}.*StopIteration"):
        if clock == "replay":
            replay_untimed(trace, cls, settings, trace)
        else:
            simulate(trace, cls, load_hardware("h100-pcie5"), settings, train_trace=trace, path="reference")
