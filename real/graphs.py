"""CUDA graphs of the decoder (``MoEModel.capture_graphs``, ``MoEModel.expert_graphs``).

At batch 1 a layer's attention and router are some forty small kernels, and launching them one by one
from Python costs far more than running them (about 0.7 ms a layer on an H100, against microseconds of
GPU time), which would hide every copy behind host overhead. So on CUDA the attention and router of
each layer are captured as one graph (``LayerGraphs``): the token's position is a device tensor, the
key and value are written with ``index_copy_``, and attention reads the whole KV window under a
position mask. The graph also packs what the host must read after the layer (the routed ids and
weights, and a live predictor's scores) into one buffer, so that the routing read-back is one copy.

Routing is data-dependent, so the experts and the combine cannot join that graph; they get graphs of
their own (``ExpertGraphs``): one per (expert weight blob, top-k position) and one combine per layer,
so that the host picks which to launch from the routing it has read, for a few microseconds each
instead of about 100 us per expert launched op by op. Every path (the resident model, the offloaded
engine at any cache size) runs the same graphs, so they stay bit-identical with each other; against
the eager path they agree to rounding.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from real.model import MoEModel

DISABLE_ENV = "MOE_LAB_EXPERT_GRAPHS"         # "0": experts and combine launched op by op (for comparison)

Extra = Callable[[int, torch.Tensor], torch.Tensor]   # (layer, post-attention residual [1, H]) -> scores


class LayerGraphs:
    """One CUDA graph per layer for attention + router, sharing one input buffer and the position."""

    @torch.no_grad()
    def __init__(self, model: "MoEModel", extra: Extra | None = None):
        device = model.device
        self.extra = extra
        self.extras: list[torch.Tensor | None] = []
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.h_in = torch.zeros((1, model.config.hidden_size), dtype=model.dtype, device=device)
        # Every layer's expert input x also lands here, so one expert graph per weight blob serves any layer.
        self.x_shared = torch.zeros_like(self.h_in)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[tuple[torch.Tensor, ...]] = []
        # What the host reads after each layer, packed by the graph into one float32 buffer: ids (exact
        # in float32), weights, then the extra output. One device-to-host copy, one synchronisation.
        self.readouts: list[torch.Tensor] = []
        self.top_k = model.config.top_k
        L = model.config.num_layers
        self.replays = [0] * L                          # replays per layer, to tell a host copy is current
        self.host_extra: list[tuple[int, np.ndarray] | None] = [None] * L
        saved = model.kv_cache.clone()
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for layer in range(L):
                for _ in range(2):          # warm-up: kernels chosen and workspaces allocated before capture
                    h = model._attention_graphable(layer, self.h_in, self.pos)
                    if extra is not None:
                        extra(layer, h)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    h = model._attention_graphable(layer, self.h_in, self.pos)
                    out = (h, *model.route_with_probs(layer, h))
                    self.x_shared.copy_(out[1])
                    extra_out = None if extra is None else extra(layer, h)
                    parts = [out[2].reshape(-1).float(), out[3].reshape(-1).float()]
                    if extra_out is not None:
                        parts.append(extra_out.reshape(-1).float())
                    readout = torch.cat(parts)
                pool = graph.pool()
                self.graphs.append(graph)
                self.outputs.append(out)
                self.extras.append(extra_out)
                self.readouts.append(readout)
        torch.cuda.current_stream(device).wait_stream(stream)
        model.kv_cache.copy_(saved)          # warm-up and capture wrote position 0

    def replay(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s attention + router on ``h`` [1, H]: its static outputs (h, x, ids, weights,
        probs), valid until the same layer replays again."""
        if h is not self.h_in:                # an ExpertGraphs combine leaves h in place already
            self.h_in.copy_(h)
        self.graphs[layer].replay()
        self.replays[layer] += 1
        return self.outputs[layer]

    def read_routing(self, layer: int) -> tuple[list[int], list[float]]:
        """The routed ids and weights of the latest replay of ``layer`` on the host (one copy, one
        synchronisation); the extra output of the same replay is kept for ``extra_host``."""
        host = self.readouts[layer].cpu().numpy()
        K = self.top_k
        if self.extra is not None:
            self.host_extra[layer] = (self.replays[layer], host[2 * K:].reshape(self.extras[layer].shape))
        return host[:K].astype(np.int64).tolist(), host[K:2 * K].tolist()

    def extra_host(self, layer: int) -> np.ndarray:
        """The extra output of ``layer``'s latest replay on the host: the copy ``read_routing`` brought
        back, or (if routing was not read since) a copy made now."""
        cached = self.host_extra[layer]
        if cached is not None and cached[0] == self.replays[layer]:
            return cached[1]
        return self.extras[layer].cpu().numpy()


class ExpertGraphs:
    """A layer's experts and its combine as CUDA graphs, over a fixed set of expert weight blobs [N, blob]
    (an engine's slots, or a resident model's experts). Graph (n, i) runs the expert whose weights are
    ``blobs[n]`` on the layer's normalised input and leaves the result in output position i (the i-th
    expert in router order); the combine graph of a layer adds the weighted outputs to the residual in
    ascending expert id, exactly as ``MoEModel.combine`` does, and leaves the sum in the layer graphs'
    input buffer, where the next layer's graph reads it. The combine reads the router's own ids and
    weights from the layer graph, so it serves only when the routed experts are the ones that ran
    (an engine with forced routing or lossy substitution combines eagerly from ``out``)."""

    MAX_GRAPHS = 4096           # above this, capture time and graph memory outweigh the launch savings

    def __init__(self, layers: LayerGraphs, out: torch.Tensor, experts: list, combines: list):
        self.layers = layers    # the layer graphs these read from and write to (stale once recaptured)
        self.out = out          # [K, 1, H] expert outputs by top-k position
        self._experts = experts
        self._combines = combines

    @classmethod
    @torch.no_grad()
    def capture(cls, model: "MoEModel", g: LayerGraphs, blobs: torch.Tensor) -> "ExpertGraphs | None":
        """Graphs over ``blobs`` [N, blob] on the GPU that read and write the layer graphs ``g``; None when
        there would be too many graphs or ``MOE_LAB_EXPERT_GRAPHS=0``."""
        c = model.config
        K, H = c.top_k, c.hidden_size
        if len(blobs) * K + c.num_layers > cls.MAX_GRAPHS or os.environ.get(DISABLE_ENV) == "0":
            return None
        device = model.device
        out = torch.zeros((K, 1, H), dtype=model.dtype, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        pool = None
        experts, combines = [], []
        with torch.cuda.stream(stream):
            model.expert(g.x_shared, blobs[0])          # warm-up: kernels chosen, workspace allocated
            for n in range(len(blobs)):
                row = []
                for i in range(K):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        out[i].copy_(model.expert(g.x_shared, blobs[n]))
                    pool = graph.pool()
                    row.append(graph)
                experts.append(row)
            for layer in range(c.num_layers):
                h, x, ids, weights, _ = g.outputs[layer]
                for warm in (True, False):
                    graph = None if warm else torch.cuda.CUDAGraph()
                    ctx = torch.cuda.graph(graph, pool=pool, stream=stream) if graph is not None else nullcontext()
                    with ctx:
                        order = torch.argsort(ids.reshape(-1))          # ascending expert id, on the device
                        w = weights.reshape(-1)
                        terms = ((out.index_select(0, at).reshape(1, H), w.index_select(0, at))
                                 for at in (order[j:j + 1] for j in range(K)))
                        g.h_in.copy_(model.weighted_sum(layer, h, x, terms))
                    if graph is not None:
                        pool = graph.pool()
                        combines.append(graph)
        torch.cuda.current_stream(device).wait_stream(stream)
        return cls(g, out, experts, combines)

    def expert(self, n: int, i: int) -> None:
        """Run the expert in blob ``n`` on the current layer's input, into ``out[i]``."""
        self._experts[n][i].replay()

    def combine(self, layer: int) -> torch.Tensor:
        """The residual after ``layer``'s MoE (the layer graphs' input buffer), from ``out``."""
        self._combines[layer].replay()
        return self.layers.h_in
