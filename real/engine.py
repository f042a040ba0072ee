"""The offloaded MoE engine: non-expert weights on the GPU, every expert in one pinned host arena,
a GPU slot cache filled by a dedicated copy stream, and the shared ``policies`` controller deciding
what is copied, when, and what is evicted.

The decode path per layer mirrors the simulator's: the layer's front graph (the previous layer's
combine, then attention and router), whose ids are read on the host (the one synchronisation a routed
model needs), the experts already resident launched at once (a lossless policy's hits: the GPU computes
while the host does the bookkeeping), ``begin_layer`` (hits, demand fetches), the demand copies, then
the other experts, each made to wait on the GPU for its own copy only; then the next layer's front
graph is launched, and only then does the policy predict and schedule this layer's prefetches
(``prefetch_layer``): that host work overlaps the GPU's expert and attention compute instead of
leaving the GPU idle. A layer is K + 1 graph launches (``real.graphs``). Expert outputs are combined
in a fixed order, so every cache size and policy performs exactly the same arithmetic as the
all-resident engine: lossless policies give identical tokens, bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from offload.cache import RESIDENT
from offload.controller import Need, OffloadStats
from offload.layer_turn import drive, layer_turn
from offload.metrics import run_metrics
from offload.policy import Policy
from offload.predictors import Predictor, predictor_for
from offload.session import RunSettings, SettingsError, open_session
from real.copies import CopyFeeder, CopyRecord
from real.marks import Marks
from real.model import quiet_gc
from real.predictors import GraphedPredictor, HiddenStatePredictor
from real.pinned import is_page_locked, pinned_empty
from traces import ModelShape, Trace

if TYPE_CHECKING:
    from hardware import HardwareProfile


class RoutingError(RuntimeError):
    """The router produced non-finite weights (an overflowed layer, a broken checkpoint): the model's
    output from here on is garbage, so the run stops at the step and layer where it happened.
    ``step`` and ``layer`` name them; what the engine recorded before stays in ``engine.routing``."""

    def __init__(self, step: int, layer: int, weights: list[float]):
        super().__init__(f"router of layer {layer} gave non-finite weights {weights} at decode step {step}: "
                         f"the checkpoint or its dtype overflows there; check the weights of layer {layer} "
                         f"(load in float32 to tell an overflow from broken weights)")
        self.step, self.layer = step, layer


@dataclass
class Routing:
    """What the engine saw, step by step: becomes a trace."""
    experts: list[list[list[int]]] = field(default_factory=list)     # [T][L][K]
    weights: list[list[list[float]]] = field(default_factory=list)
    request_starts: list[int] = field(default_factory=lambda: [0])
    hidden: list[np.ndarray] = field(default_factory=list)            # [L, H] per recorded step:
    # the post-attention residual entering each MoE layer (before its norm)
    step_ms: list[float] = field(default_factory=list)
    # With ``record_layer_timings``: per step [L] arrays (layer_start_ms, layer_ms, stall_ms) and [L, K]
    # arrays (copy_start_ms, copy_end_ms; -1 where the expert was resident). Points in time are ms
    # from the engine's creation (always >= 0: a prefetch may start layers before it is used).
    layer_timings: dict[str, list[np.ndarray]] = field(default_factory=dict)


@dataclass
class EngineResult:
    generated: list[list[int]]        # per request: the generated token ids
    metrics: dict
    stats: OffloadStats
    copies: list[CopyRecord]
    routing: Routing


class OffloadEngine:
    """The CUDA clock: interprets ``offload.layer_turn`` with the GPU's streams and events."""

    def __init__(self, model, shape: ModelShape, policy_cls: type[Policy], settings: RunSettings, *,
                 hardware: "HardwareProfile | None" = None, future: Trace | None = None,
                 train_trace: Trace | None = None, record_hidden_steps: int = 0,
                 predictors: Mapping[str, Predictor] | None = None, record_layer_timings: bool = False,
                 record_host_stamps: bool = False):
        """``settings``: the run's settings, as the simulator takes them (``offload.session``).
        ``hardware``: a profile measured on this machine, whose copy and layer estimates limit a
        predictive policy's prefetch depth as in the simulator; None: no limit. ``future``: the run's
        routing, recorded before, for the bounds (Belady, oracle); ``train_trace``: the separate slice
        ``static`` and ``affinity`` learn from. ``predictors``: live predictors by name
        (``real.predictors``); a predictive policy gets the one its class names
        (``offload.predictors.predictor_name``), as the simulator gets the prediction track of that
        name. ``record_layer_timings``: mark each layer's start, routing and end on the compute stream
        (CUDA events, resolved after the run) and keep each copy's start and end events, for
        ``Routing.layer_timings``. ``record_host_stamps``: keep, per layer, the host clock from the routing
        read-back to the first demand copy's issue (``miss_issue_ns``) or, on a layer without one, to the
        prefetch decision (``decide_ns``): what the calibration's patterns measure (two clock reads a layer;
        off, the run pays nothing for them). The copies handed to the copy stream at once are
        ``settings.copies_in_flight`` (``real.copies``; the simulator models the same window). Raises
        MemoryError when the GPU cannot hold the slots, naming the fix, and SettingsError for
        ``copies_in_flight=None`` (the simulator's ideal link, which no stream implements)."""
        self.model = model
        self.shape = shape
        L, E = shape.num_layers, shape.num_experts
        blobs = model.expert_blobs                      # [L, E, blob]
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        blob_numel = blobs.shape[-1]
        # One pinned allocation for every expert: thousands of small pinned tensors would each be
        # rounded up by the caching allocator, and pinning is slow per call. A model built with its
        # experts on the host already has one; several engines can share it, one after another.
        if blobs.device.type == "cpu" and (is_page_locked(blobs) or not self.cuda):
            self.arena = blobs.reshape(L * E, blob_numel)
        else:
            self.arena = pinned_empty((L * E, blob_numel), blobs.dtype) if self.cuda else torch.empty(
                (L * E, blob_numel), dtype=blobs.dtype)
            self.arena.copy_(blobs.reshape(L * E, blob_numel))
            model.drop_resident_experts()               # free the GPU copy: the engine owns the experts
        if settings.copies_in_flight is None:
            raise SettingsError("copies_in_flight=None is the simulator's ideal link; the engine feeds a CUDA "
                                "stream and needs a window (e.g. 2)")
        num_slots = settings.cache_slots * L
        try:
            self.slots = torch.empty((num_slots, blob_numel), dtype=blobs.dtype, device=self.device)
        except torch.OutOfMemoryError as err:
            need = num_slots * blob_numel * blobs.element_size() / 1e9
            raise MemoryError(f"the GPU cannot hold {num_slots} expert slots ({need:.1f} GB); "
                              f"lower cache_slots") from err
        self.expert_bytes = blob_numel * blobs.element_size()
        predictor = predictor_for(policy_cls, settings.policy_params, settings.prefetch_depth,
                                  live=predictors or {})
        # Attention + router as CUDA graphs (no-op off CUDA), with a hidden-state predictor inside them.
        if isinstance(predictor, HiddenStatePredictor) and model.capture_graphs(extra=predictor.probs):
            predictor = GraphedPredictor(predictor, model)
        else:
            model.capture_graphs()
        # Experts and combine as graphs too, one expert graph per (slot, top-k position); None on CPU.
        self.expert_graphs = model.expert_graphs(self.slots)
        self.session = open_session(shape, policy_cls, settings, expert_bytes=self.expert_bytes,
                                    trace=future, train_trace=train_trace, predictor=predictor,
                                    hardware=hardware)
        self.policy, self.ctrl, self.cache = self.session.policy, self.session.ctrl, self.session.cache
        self._lossless = self.policy.lossless
        self._early: dict[int, int] = {}
        self.copies = CopyFeeder(self.ctrl, self.arena, self.slots, settings.copies_in_flight)
        for key, slot in self.cache.key_slot.items():   # the preload is model load: untimed, not counted
            self.slots[slot].copy_(self.arena[key])
        self.record_hidden_steps = record_hidden_steps
        self.marks = Marks(self.cuda) if record_layer_timings else None
        self._layer_marks: list[tuple] = []     # (step, layer, start, routed, end, [(k, job)])
        if record_layer_timings:
            self.copies.job_marks = {}
            self._base_mark = self.marks.mark()
        self.routing = Routing()
        self._step_index = 0
        self._stamps = record_host_stamps
        self.copies.stamp_demands = record_host_stamps
        # per layer with a demand copy: host ns from the routing read-back to the first demand copy's issue
        # (perf_counter_ns, no CUDA event: the calibration's miss_latency, real.calibration.run_pattern)
        self.miss_issue_ns: list[int] = []
        # per layer without a demand copy: host ns from the routing read-back to the prefetch decision's start
        # (the calibration's prefetch_latency, real.calibration.run_pattern)
        self.decide_ns: list[int] = []
        self._routed_ns = 0

    # -- one decode step -----------------------------------------------------------------------
    def _step(self, token_id: int, pos: int, forced: list[list[int]] | None = None,
              forced_weights: list[list[float]] | None = None) -> torch.Tensor:
        m = self.model
        step = self._step_index
        self._forced, self._forced_weights = forced, forced_weights
        self._hidden = [] if step < self.record_hidden_steps else None
        self._experts_of_step, self._weights_of_step = [], []
        m.begin_token(token_id, pos)
        self._graphs = self.expert_graphs
        if self._graphs is not None and self._graphs.layers is not m._graphs:
            self._graphs = None                          # the layer graphs were recaptured since
        if self.marks is not None:
            self._layer_start = self.marks.mark()
        self._front = m.front(0)
        for layer in range(self.shape.num_layers):
            drive(layer_turn(self.ctrl, self, step, layer))
        self.routing.experts.append(self._experts_of_step)
        self.routing.weights.append(self._weights_of_step)
        if self._hidden is not None:
            self.routing.hidden.append(np.stack(self._hidden))
        self._step_index += 1
        return m.back()

    # -- the named points of the layer turn (offload.layer_turn) --------------------------------
    def now_ns(self) -> int:
        return self.copies.now_ns()

    def route(self, token: int, layer: int):
        return ()                # attention + router were launched at the previous layer's decide

    def chosen(self, token: int, layer: int):
        front = self._front
        experts, weights = self.model.read_routing(layer, front.ids, front.weights)   # the host learns the routing here
        if self._stamps:
            self._routed_ns = time.perf_counter_ns()
            self.copies.first_demand_ns = 0
        if self.marks is not None:
            self._routed_mark = self.marks.mark()
        if not all(map(math.isfinite, weights)):
            raise RoutingError(token, layer, weights)
        if self._forced is not None:                     # shape replay: routing from a trace
            experts, weights = self._forced[layer], self._forced_weights[layer]
            self.model.set_run(layer, experts, weights)
        self._early = self._launch_resident(layer, experts) if self._lossless else {}
        self._experts_of_step.append(experts)
        self._weights_of_step.append(weights)
        # Predictors read the post-attention residual (before this layer's MoE norm), so that
        # pre-gating can apply a later layer's own norm and router to it.
        if self._hidden is not None:
            self._hidden.append(front.h.reshape(-1).float().cpu().numpy())
        return experts, weights, front.h

    def _launch_resident(self, layer: int, experts: list[int]) -> dict[int, int]:
        """Launch at once the routed experts whose weights are already in a slot (their copy retired):
        the GPU computes them while the host does the controller's bookkeeping (``begin_layer``), which
        would otherwise sit between the routing read-back and the first expert, the GPU idle. Returns
        {key: slot} of those launched. Safe: nothing evicts between here and ``begin_layer``, which
        protects them, and ``launch_experts`` releases their slots with the others. A lossless policy
        runs exactly the routed experts, and these are its hits; a lossy one may substitute, so
        its experts wait for ``launch_experts``."""
        key_slot, slot_state = self.cache.key_slot, self.cache.slot_state
        base = layer * self.shape.num_experts
        launched = {}
        for position, e in enumerate(experts):
            slot = key_slot.get(base + e)
            if slot is not None and slot_state[slot] == RESIDENT:
                self._launch(slot, position)
                launched[base + e] = slot
        return launched

    def reweigh(self, layer: int, run: list[int], weights):
        """A lossy policy runs ``run`` instead: the model's own weighting of them."""
        probs = self._front.probs
        w = self.model.weights_for(probs, torch.tensor([run], device=probs.device))
        self.model.set_run(layer, run, w)
        weights = w.reshape(-1).float().tolist()
        self._experts_of_step[-1], self._weights_of_step[-1] = run, weights
        return weights

    def start_copies(self):
        self.copies.pump()
        return ()

    def launch_experts(self, token: int, layer: int, run: list[int], needs: list[Need]):
        """Each expert not launched already (``_launch_resident``) made to wait on the GPU for its own
        copy, then launched into its top-k position (the next front graph combines them)."""
        copies, key_slot, early = self.copies, self.cache.key_slot, self._early
        base = layer * self.shape.num_experts
        used = list(early.values())
        for key, job in needs:
            if key in early:
                continue
            if job is not None:
                copies.make_ready(job)
            slot = key_slot[key]
            used.append(slot)
            self._launch(slot, run.index(key - base))
        if copies.first_demand_ns:           # every demand copy of this layer is issued by now
            self.miss_issue_ns.append(copies.first_demand_ns - self._routed_ns)
        copies.release_slots(used)
        if self.marks is not None:
            copied = [(run.index(key - base), job) for key, job in needs if job is not None]
            self._layer_marks.append((token, layer, self._layer_start, self._routed_mark, self.marks.mark(),
                                      copied))
        return ()

    def _launch(self, slot: int, position: int) -> None:
        """The expert in ``slot`` on the current layer's input, into top-k ``position``: its graph, or
        launched op by op without expert graphs."""
        if self._graphs is not None:
            self._graphs.expert(slot, position)
        else:
            self.model.run_expert(position, self.slots[slot])

    def decide(self, token: int, layer: int):
        """The GPU has this layer's experts to run; the host launches this layer's combine and the next
        layer's attention and router (one graph), then takes the policy's prefetch decision (the layer
        turn's next step) while the GPU works."""
        if layer + 1 < self.shape.num_layers:
            if self.marks is not None:
                self._layer_start = self.marks.mark()
            self._front = self.model.front(layer + 1)
        return ()

    def decided_ns(self) -> int:
        """The host clock as it decides; on a layer no copy waits for, the routing read-back to here goes to
        ``decide_ns`` (``prefetch_latency``: the launches of the layer's experts and the next layer's front)."""
        now = self.copies.now_ns()
        if self._stamps and not self.copies.first_demand_ns:
            self.decide_ns.append(now - self._routed_ns)
        return now

    def finish_experts(self, token: int, layer: int, needs):
        return ()                # the next routing read-back waits for the GPU

    # -- runs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> dict:
        """Teacher-forced pass over ``sequences`` (new requests, one after another): the negative
        log-likelihood of every next token and the argmax at every position, so a lossy policy's
        accuracy can be compared with the lossless model's (``perplexity``, top-1 agreement)."""
        nll, argmax = [], []
        for seq in sequences:
            self.model.reset()
            for pos, tok in enumerate(seq[:-1]):
                logits = self._step(tok, pos).float().reshape(-1)
                nll.append(float(torch.logsumexp(logits, 0) - logits[seq[pos + 1]]))
                argmax.append(int(logits.argmax()))
        self.copies.drain()
        return {"nll": nll, "argmax": argmax, "perplexity": float(np.exp(np.mean(nll))) if nll else float("nan")}

    def _timed_step(self, token_id: int, pos: int, forced=None) -> tuple[int, int]:
        """One step, timed from its start to its next token on the host (the argmax read-back
        synchronises): (the next token, integer ns). ``forced``: (experts, weights) of a trace step."""
        start = time.perf_counter_ns()
        logits = self._step(token_id, pos) if forced is None else self._step(token_id, pos, *forced)
        nxt = int(logits.argmax(-1).reshape(-1)[0])
        ns = time.perf_counter_ns() - start
        self.routing.step_ms.append(ns / 1e6)
        return nxt, ns

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> EngineResult:
        """Greedy decoding, batch 1, one request after another (the expert cache persists).
        Prompt tokens go through the same per-token path; only generated tokens are timed.
        Raises ValueError, before anything runs, for an empty prompt."""
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty or not prompts:
            raise ValueError(f"prompts {empty} are empty: every request needs at least one token to start "
                             f"decoding from" if prompts else "no prompts given: pass at least one request")
        generated = []
        decode_ns: list[int] = []
        with quiet_gc():
            for prompt in prompts:
                self.model.reset()
                for pos, tok in enumerate(prompt):
                    nxt, _ = self._timed_step(tok, pos)
                out = []
                for i in range(max_new_tokens):
                    out.append(nxt)
                    nxt, ns = self._timed_step(nxt, len(prompt) + i)
                    decode_ns.append(ns)
                generated.append(out)
                self.routing.request_starts.append(self._step_index)
        return self._result(generated, decode_ns)

    def replay(self, trace: Trace, max_tokens: int | None = None) -> EngineResult:
        """Shape replay: run every step of ``trace`` with its routing forced (real copies and real
        compute at the model's size, real routing), requests restarting the KV cache."""
        starts = trace.request_starts.tolist()
        decode_ns: list[int] = []
        generated = []
        with quiet_gc():
            for r in range(len(starts) - 1):
                if max_tokens is not None and len(decode_ns) >= max_tokens:
                    break
                self.model.reset()
                nxt, out = 0, []
                for t in range(starts[r], starts[r + 1]):
                    if max_tokens is not None and len(decode_ns) >= max_tokens:
                        break
                    forced = (trace.experts[t].tolist(), trace.weights[t].astype(np.float32).tolist())
                    nxt, ns = self._timed_step(nxt, t - starts[r], forced)
                    decode_ns.append(ns)
                    out.append(nxt)
                generated.append(out)
                self.routing.request_starts.append(self._step_index)
        return self._result(generated, decode_ns)

    def _resolve_layer_timings(self) -> None:
        """Turn the recorded marks into per-step arrays (the run has drained: every event completed)."""
        if self.marks is None or not self._layer_marks:
            return
        ms, L, K = self.marks.ms, self.shape.num_layers, self.shape.top_k
        job_marks = self.copies.job_marks
        out = self.routing.layer_timings
        names = ("layer_start_ms", "layer_ms", "stall_ms", "copy_start_ms", "copy_end_ms")
        for name in names:
            out.setdefault(name, [])
        base = self._base_mark
        current, arrays = None, None
        for step, layer, start, routed, end, copied in self._layer_marks:
            if step != current:
                current = step
                arrays = (np.zeros(L, np.float32), np.zeros(L, np.float32), np.zeros(L, np.float32),
                          np.full((L, K), -1.0, np.float32), np.full((L, K), -1.0, np.float32))
                for name, a in zip(names, arrays):
                    out[name].append(a)
            layer_start, layer_ms, stall_ms, copy_start, copy_end = arrays
            layer_start[layer] = ms(base, start)
            layer_ms[layer] = ms(start, end)
            routed_ms = ms(base, routed)
            for k, job in copied:
                marked = job_marks.get(id(job))
                if marked is None:
                    continue
                copy_start[layer, k] = ms(base, marked[1])
                copy_end[layer, k] = ms(base, marked[2])
                # the experts could start once routed; a copy ending later made the layer wait
                stall_ms[layer] = max(stall_ms[layer], copy_end[layer, k] - routed_ms)
        self._layer_marks.clear()

    def _result(self, generated, decode_ns: list[int]) -> EngineResult:
        self.copies.drain()
        self._resolve_layer_timings()
        stats = self.ctrl.stats
        demand = [c.duration_ms for c in self.copies.records if c.demand and c.duration_ms > 0]
        metrics = run_metrics(decode_ns, stats)
        # What only the engine measures: the copies' achieved bandwidth and the GPU's peak memory.
        metrics["copy_GBps"] = (self.expert_bytes / 1e9) / (float(np.median(demand)) / 1e3) if demand else float("nan")
        metrics["gpu_mem_GB"] = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.cuda else 0.0
        return EngineResult(generated, metrics, stats, list(self.copies.records), self.routing)
