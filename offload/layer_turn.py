"""The per-layer protocol, written once: every clock walks a layer through ``layer_turn``.

One MoE layer of one token is, in this order:

1. ``route``, ``chosen`` the clock runs attention and the router and learns the routing (the
                 simulator advances its compute stream; the engine reads the routing back from the GPU);
2. the controller is asked which experts run (a lossy policy may substitute its speculation;
                 ``reweigh`` lets the clock recompute their weights) and ``begin_layer`` counts hits,
                 protects the chosen experts and queues demand fetches;
3. ``start_copies`` (demand) the clock starts copies; until step 5 only demand fetches can start;
4. ``launch_experts`` the compute stream is given the layer's experts, resident ones first, each
                 waiting for its own copy (the engine launches them on the GPU and does not wait on the
                 host; the simulator has nothing to do yet);
5. ``decide``    the host's time between launching the experts and the policy's prefetch decision
                 (the engine launches the combine and the next layer's attention here; the simulator
                 charges the host's measured decision time); then the policy's prefetch decision
                 (``prefetch_layer``, its copies stamped with the clock's ``decided_ns``) and
6. ``start_copies`` (prefetch) the clock starts copies again;
7. ``finish_experts`` the clock completes the layer's experts (the simulator waits for their copies
                 and advances its compute stream; the engine has nothing to do: its next routing
                 read-back waits for the GPU), and ``end_layer`` releases the layer's protection.

SimPy's ``RealtimeEnvironment`` is the pattern: the walk is written once and the environment that
keeps time is swapped. ``layer_turn`` is a generator. A clock method that may wait returns an
iterable of what it waits for: a generator of SimPy events in the simulator, ``()`` in a clock that
waits by itself (the engine, the untimed replay). The simulator runs the turn with ``yield from``
inside its SimPy process; the other clocks with ``drive``.
"""
from __future__ import annotations

from typing import Generator, Iterable, Protocol

from offload.controller import Need, OffloadController, PolicyError


class Clock(Protocol):
    """What a clock does at the named points of ``layer_turn``. Methods that may wait return an
    iterable of the events waited for (``()`` when the clock waits by itself)."""

    def now_ns(self) -> int:
        """The clock's time, integer ns (the controller stamps copies with it)."""
        ...

    def route(self, token: int, layer: int) -> Iterable:
        """Run attention and the router of ``layer``."""
        ...

    def chosen(self, token: int, layer: int) -> tuple[list[int], list[float] | None, object]:
        """What the router of ``layer`` chose: (experts, their weights, the hidden state that
        predictors read, or None)."""
        ...

    def reweigh(self, layer: int, run: list[int], weights: list[float] | None) -> list[float] | None:
        """Weights of ``run``, experts a lossy policy substituted for the routed ones."""
        ...

    def start_copies(self) -> Iterable:
        """Start the copies the controller allows now (``OffloadController.next_copy``)."""
        ...

    def launch_experts(self, token: int, layer: int, run: list[int], needs: list[Need]) -> Iterable:
        """Give the compute stream ``needs`` (resident first, then in copy order); the host may first
        have to wait for room on the copy stream to start the copies they wait for."""
        ...

    def decide(self, token: int, layer: int) -> Iterable:
        """The host's work between launching the experts and the prefetch decision."""
        ...

    def decided_ns(self) -> int:
        """The host's time when the policy's prefetch decision is taken (after ``decide``): the prefetches it
        queues are stamped with it and start no earlier. The engine's ``now_ns``; the simulator's may lie
        ahead of the host time that bounds the layer (``MeasuredCompute.prefetch_latency_us``)."""
        ...

    def finish_experts(self, token: int, layer: int, needs: list[Need]) -> Iterable:
        """Complete the layer's experts before their protection ends."""
        ...


def layer_turn(ctrl: OffloadController, clock: Clock, token: int, layer: int) -> Generator:
    """One layer of one token (module docstring): the one order of controller calls. A policy hook that
    raises StopIteration (which a generator would turn into a bare RuntimeError naming nobody) raises
    ``PolicyError`` naming the class and hook instead."""
    try:
        yield from clock.route(token, layer)
        experts, weights, hidden = clock.chosen(token, layer)
        run = ctrl.executed_experts(token, layer, experts, weights)
        if run is not experts:
            weights = clock.reweigh(layer, run, weights)
        needs = ctrl.begin_layer(token, layer, run, weights, clock.now_ns(), hidden)
        yield from clock.start_copies()
        yield from clock.launch_experts(token, layer, run, needs)
        yield from clock.decide(token, layer)
        ctrl.prefetch_layer(clock.decided_ns())
        yield from clock.start_copies()
        yield from clock.finish_experts(token, layer, needs)
        ctrl.end_layer(needs)
    except (StopIteration, RuntimeError) as err:
        # A hook's StopIteration: leaving a generator (this one, or a clock's that called the hook) Python
        # turns it into a bare RuntimeError naming nobody.
        stop = err if isinstance(err, StopIteration) else err.__cause__
        hook = _policy_frame(ctrl.policy, stop) if isinstance(stop, StopIteration) else None
        if hook is None:
            raise
        raise PolicyError(ctrl.policy, hook, "StopIteration", "a hook may not raise StopIteration (the layer turn "
                          "is a generator); return, or raise another exception") from stop


def _policy_frame(policy, err: BaseException) -> str | None:
    """The name of the deepest frame of ``err``'s traceback in the policy class's own files, or None."""
    import sys
    import traceback
    files = {getattr(sys.modules.get(c.__module__), "__file__", None) for c in type(policy).__mro__} - {None}
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in files]
    return frames[-1].name if frames else None


def drive(turn: Generator) -> None:
    """Run a turn whose clock never waits through the generator (the engine, the untimed replay)."""
    for waited in turn:
        raise RuntimeError(f"a synchronous clock yielded {waited!r}; its methods must wait themselves")
