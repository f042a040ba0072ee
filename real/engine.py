"""The offloaded MoE engine: non-expert weights on the GPU, every expert in one pinned host arena,
a GPU slot cache filled by a dedicated copy stream, and the shared ``policies`` controller deciding
what is copied, when, and what is evicted.

The decode path per layer mirrors the simulator's: attention, router (its ids are read on the host:
that is the one synchronisation a routed model needs), ``begin_layer`` (hits, demand fetches), the
demand copies, then the chosen experts with resident ones first, each made to wait on the GPU for its
own copy only; then the combine and the next layer's attention are launched, and only then does the
policy predict and schedule this layer's prefetches (``prefetch_layer``): that host work overlaps the
GPU's expert and attention compute instead of leaving the GPU idle. Expert outputs are combined in a
fixed order, so every cache size and policy performs exactly the same arithmetic as the all-resident
engine: lossless policies give identical tokens, bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from offload.policy import Policy, PolicyContext
from offload.cache import CacheMode, ExpertCache
from offload.controller import OffloadController, OffloadStats
from offload.predictors import Predictor
from offload.predictors import predictor_name
from real.copies import CopyFeeder, CopyRecord
from real.marks import Marks
from real.model import quiet_gc
from real.predictors import GraphedPredictor, HiddenStatePredictor
from real.pinned import is_page_locked, pinned_empty
from traces import ModelShape, Trace


@dataclass(frozen=True)
class EngineSettings:
    cache_slots: int
    cache_mode: CacheMode | str = CacheMode.PER_LAYER
    prefetch_depth: int = 1
    max_copies_in_flight: int = 2
    policy_params: Mapping = field(default_factory=dict)
    # The clock's estimates that predictive policies use to limit prefetch depth (as the simulator
    # derives them from its hardware profile): one expert's copy time and one layer's compute time.
    # None: no depth limit. ``experiments.engine_bench`` passes what it measured on this machine.
    expert_copy_ns: int | None = None
    layer_compute_ns: int | None = None


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
    def __init__(self, model, shape: ModelShape, policy_cls: type[Policy], settings: EngineSettings,
                 future: Trace | None = None, train_trace: Trace | None = None,
                 record_hidden_steps: int = 0, predictors: Mapping[str, Predictor] | None = None,
                 record_layer_timings: bool = False):
        """``predictors``: live predictors by name (``real.predictors``); a predictive policy gets the
        one its class names (``policies.speculative.predictor_name``), as the simulator gets the
        prediction track of that name. ``record_layer_timings``: mark each layer's start, routing and end
        on the compute stream (CUDA events, resolved after the run) and keep each copy's start and end
        events, for ``Routing.layer_timings``."""
        self.model = model
        self.shape = shape
        L, E, K = shape.num_layers, shape.num_experts, shape.top_k
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
        self.cache = ExpertCache(L, E, settings.cache_slots, settings.cache_mode, K)
        try:
            self.slots = torch.empty((self.cache.num_slots, blob_numel), dtype=blobs.dtype,
                                     device=self.device)
        except torch.OutOfMemoryError as err:
            need = self.cache.num_slots * blob_numel * blobs.element_size() / 1e9
            raise MemoryError(f"the GPU cannot hold {self.cache.num_slots} expert slots ({need:.1f} GB); "
                              f"lower cache_slots") from err
        self.expert_bytes = blob_numel * blobs.element_size()
        params = dict(settings.policy_params)
        predictor = _live_predictor(policy_cls, predictors or {}, params)
        # Attention + router as CUDA graphs (no-op off CUDA), with a hidden-state predictor inside them.
        if isinstance(predictor, HiddenStatePredictor) and model.capture_graphs(extra=predictor.probs):
            predictor = GraphedPredictor(predictor, model)
        else:
            model.capture_graphs()
        # Experts and combine as graphs too, one expert graph per (slot, top-k position); None on CPU.
        self.expert_graphs = model.expert_graphs(self.slots)
        ctx = PolicyContext(shape, settings.cache_slots, CacheMode(settings.cache_mode),
                            settings.prefetch_depth, future, train_trace, params,
                            predictor=predictor,
                            expert_copy_ns=settings.expert_copy_ns, layer_compute_ns=settings.layer_compute_ns)
        self.policy = policy_cls(ctx)
        self.ctrl = OffloadController(self.policy, self.cache, self.expert_bytes)
        self.copies = CopyFeeder(self.ctrl, self.arena, self.slots, settings.max_copies_in_flight)
        self.ctrl.preload()
        for key, slot in self.cache.key_slot.items():   # model load: untimed, not counted
            self.slots[slot].copy_(self.arena[key])
        self.record_hidden_steps = record_hidden_steps
        self.marks = Marks(self.cuda) if record_layer_timings else None
        self._layer_marks: list[tuple] = []     # (step, layer, start, routed, end, [(k, job)])
        if record_layer_timings:
            self.copies.job_marks = {}
            self._base_mark = self.marks.mark()
        self.routing = Routing()
        self._step_index = 0

    # -- one decode step -----------------------------------------------------------------------
    def _step(self, token_id: int, pos: int, forced: list[list[int]] | None = None,
              forced_weights: list[list[float]] | None = None) -> torch.Tensor:
        m, ctrl, copies, cache = self.model, self.ctrl, self.copies, self.cache
        E = self.shape.num_experts
        step = self._step_index
        lossy = not self.policy.lossless
        keep_hidden = step < self.record_hidden_steps
        hidden = []
        experts_of_step, weights_of_step = [], []
        m.set_position(pos)
        h = m.embed(token_id)
        marks = self.marks
        graphs = self.expert_graphs
        if graphs is not None and graphs.layers is not m._graphs:
            graphs = None                                 # the layer graphs were recaptured since
        L = self.shape.num_layers
        if marks is not None:
            layer_start = marks.mark()
        launched = m.attention_route(0, h, pos)
        for layer in range(L):
            h, x, ids, w, probs = launched
            router_ids, weights = m.read_routing(layer, ids, w)    # the host learns the routing here
            experts = router_ids
            if forced is not None:                        # shape replay: routing from a trace
                experts, weights = forced[layer], forced_weights[layer]
                w = torch.tensor(weights, dtype=w.dtype, device=w.device)
            if lossy:                                     # run the speculated experts instead
                run = ctrl.executed_experts(step, layer, experts, weights)
                if run != experts:
                    w = m.weights_for(probs, torch.tensor([run], device=probs.device))
                    experts, weights = run, w.reshape(-1).float().tolist()
            experts_of_step.append(experts)
            weights_of_step.append(weights)
            # Predictors read the post-attention residual (before this layer's MoE norm), so that
            # pre-gating can apply a later layer's own norm and router to it.
            if keep_hidden:
                hidden.append(h.reshape(-1).float().cpu().numpy())
            if marks is not None:
                routed = marks.mark()
            needs = ctrl.begin_layer(step, layer, experts, weights, copies.now_ns(), hidden=h)
            copies.pump()                                 # demand fetches only, until prefetch_layer
            outputs: dict[int, torch.Tensor] = {}
            used = []
            base = layer * E
            for key, job in needs:
                if job is not None:
                    copies.make_ready(job)
                slot = cache.key_slot[key]
                used.append(slot)
                if graphs is not None:
                    position = experts.index(key - base)
                    graphs.expert(slot, position)
                    outputs[key - base] = graphs.out[position]
                else:
                    outputs[key - base] = m.expert(x, self.slots[slot])
            copies.release_slots(used)
            if graphs is not None and experts is router_ids:    # not forced, not substituted
                h_next = graphs.combine(layer)            # the router's own ids and weights, on the device
            else:
                h_next = m.combine(layer, h, x, experts, w, outputs)
            if marks is not None:
                copied = [(experts.index(key - base), job) for key, job in needs if job is not None]
                self._layer_marks.append((step, layer, layer_start, routed, marks.mark(), copied))
            # The GPU has this layer's experts and the next layer's attention to run; the host meanwhile
            # asks the policy for this layer's prefetches and feeds the copies (same controller order).
            if layer + 1 < L:
                if marks is not None:
                    layer_start = marks.mark()
                launched = m.attention_route(layer + 1, h_next, pos)
            ctrl.prefetch_layer(copies.now_ns())
            copies.pump()
            ctrl.end_layer(needs)
            h = h_next
        self.routing.experts.append(experts_of_step)
        self.routing.weights.append(weights_of_step)
        if keep_hidden:
            self.routing.hidden.append(np.stack(hidden))
        self._step_index += 1
        return m.final(h)

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

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> EngineResult:
        """Greedy decoding, batch 1, one request after another (the expert cache persists).
        Prompt tokens go through the same per-token path; only generated tokens are timed."""
        generated = []
        decode_ms: list[float] = []
        with quiet_gc():
            for prompt in prompts:
                self.model.reset()
                pos = 0
                logits = None
                for tok in prompt:
                    start = time.perf_counter()
                    logits = self._step(tok, pos)
                    self.routing.step_ms.append((time.perf_counter() - start) * 1e3)
                    pos += 1
                out = []
                nxt = int(logits.argmax(-1).reshape(-1)[0])
                for _ in range(max_new_tokens):
                    out.append(nxt)
                    start = time.perf_counter()
                    logits = self._step(nxt, pos)
                    nxt = int(logits.argmax(-1).reshape(-1)[0])   # synchronises: the token is known
                    ms = (time.perf_counter() - start) * 1e3
                    decode_ms.append(ms)
                    self.routing.step_ms.append(ms)
                    pos += 1
                generated.append(out)
                self.routing.request_starts.append(self._step_index)
        return self._result(generated, decode_ms)

    def replay(self, trace: Trace, max_tokens: int | None = None) -> EngineResult:
        """Shape replay: run every step of ``trace`` with its routing forced (real copies and real
        compute at the model's size, real routing), requests restarting the KV cache."""
        starts = trace.request_starts.tolist()
        decode_ms: list[float] = []
        generated = []
        done = 0
        with quiet_gc():
            for r in range(len(starts) - 1):
                self.model.reset()
                nxt, out = 0, []
                for t in range(starts[r], starts[r + 1]):
                    if max_tokens is not None and done >= max_tokens:
                        break
                    start = time.perf_counter()
                    logits = self._step(nxt, t - starts[r], trace.experts[t].tolist(),
                                        trace.weights[t].astype(np.float32).tolist())
                    nxt = int(logits.argmax(-1).reshape(-1)[0])
                    ms = (time.perf_counter() - start) * 1e3
                    decode_ms.append(ms)
                    self.routing.step_ms.append(ms)
                    out.append(nxt)
                    done += 1
                generated.append(out)
                self.routing.request_starts.append(self._step_index)
                if max_tokens is not None and done >= max_tokens:
                    break
        return self._result(generated, decode_ms)

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

    def _result(self, generated, decode_ms) -> EngineResult:
        self.copies.drain()
        self._resolve_layer_timings()
        stats = self.ctrl.stats
        tpot = np.asarray(decode_ms, dtype=np.float64)
        demand = [c.duration_ms for c in self.copies.records if c.demand and c.duration_ms > 0]
        metrics = {
            "tokens": len(tpot),
            "tokens_per_s": 1e3 / tpot.mean() if len(tpot) else 0.0,
            "tpot_ms": float(tpot.mean()) if len(tpot) else 0.0,
            "tpot_ms_p50": float(np.percentile(tpot, 50)) if len(tpot) else 0.0,
            "tpot_ms_p99": float(np.percentile(tpot, 99)) if len(tpot) else 0.0,
            "hit_rate": stats.hits / stats.accesses if stats.accesses else 0.0,
            "misses": stats.misses,
            "bytes_moved": stats.bytes_moved,
            "copy_GBps": (self.expert_bytes / 1e9) / (float(np.median(demand)) / 1e3) if demand else float("nan"),
            "replaced": stats.replaced,
            "gpu_mem_GB": torch.cuda.max_memory_allocated(self.device) / 1e9 if self.cuda else 0.0,
        }
        return EngineResult(generated, metrics, stats, list(self.copies.records), self.routing)


def _live_predictor(policy_cls: type[Policy], predictors: Mapping[str, Predictor], params: Mapping):
    name = predictor_name(policy_cls, params)
    if name is None:
        return None
    if name not in predictors:
        have = ", ".join(sorted(predictors)) or "none"
        raise ValueError(f"policy {policy_cls.__name__} consults the predictor {name!r}, but the engine was "
                         f"given {have}; pass predictors={{{name!r}: ...}} (real.predictors; a lookahead gate "
                         f"comes from python -m experiments.train_gate)")
    return predictors[name]
