"""CUDA graphs of the decoder (``MoEModel.capture_graphs``, ``MoEModel.expert_graphs``).

At batch 1 a layer's attention and router are a few dozen small kernels, and launching them one by
one from Python costs far more than running them (about 0.7 ms a layer on an H100, against
microseconds of GPU time), which would hide every copy behind host overhead. So on CUDA the attention
and router of each layer are captured as graphs (``LayerGraphs``), one per context bucket
(``MoEModel.context_buckets``): the token's position and the attention mask are device tensors that
``MoEModel.set_position`` writes once per step, the key and value are written with ``index_copy_``,
and attention reads the bucket's positions only, so its time grows with the context. Every bucket's
graph of a layer writes the same static buffers. The graph also packs what the host must read after
the layer (the routed ids and weights, and a live predictor's scores) into one float32 buffer, so that
the routing read-back is one copy into page-locked memory and one synchronisation.

The kernels are PyTorch's own: cuBLAS GEMMs (q, k and v in one; gate and up in one), the fused
RMSNorm, the memory-efficient SDPA kernel. No ``torch.compile``: Dynamo specialises on the layer index
and the bucket length, so it would compile layers x buckets variants (minutes on the GPU, longer on a
two-core CPU runner) for elementwise fusions worth a few microseconds a layer; measure first
(``experiments/bench_layer.py`` counts the kernels).

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
    """Graphs of attention + router: ``graphs[layer][bucket]``, all reading ``h_in`` and writing the
    layer's static buffers: ``h[layer]`` (the post-attention residual), ``x_shared`` (the layer's
    normalised expert input; shared by every layer, so one expert graph per weight blob serves any
    layer) and ``readouts[layer]`` (ids | weights | extra, float32)."""

    @torch.no_grad()
    def __init__(self, model: "MoEModel", extra: Extra | None = None):
        c, device = model.config, model.device
        L, K, H = c.num_layers, c.top_k, c.hidden_size
        self.extra = extra
        self.top_k = K
        self.device = device
        self.h_in = torch.zeros((1, H), dtype=model.dtype, device=device)
        self.x_shared = torch.zeros_like(self.h_in)
        self.h = torch.zeros((L, 1, H), dtype=model.dtype, device=device)
        probe = None if extra is None else extra(0, self.h_in)
        self.extra_shape = None if probe is None else tuple(probe.shape)
        width = 2 * K + (0 if probe is None else probe.numel())
        self.readouts = torch.zeros((L, width), dtype=torch.float32, device=device)
        # The host's copy: page-locked, so the read-back is a plain asynchronous copy.
        self._host = torch.empty((L, width), dtype=torch.float32, pin_memory=True)
        self._host_np = self._host.numpy()
        self.graphs: list[list[torch.cuda.CUDAGraph]] = []
        self.outputs: list[list[tuple[torch.Tensor, ...]]] = []     # [layer][bucket]: (h, x, ids, w, probs)
        self.replays = [0] * L                          # replays per layer, to tell a host copy is current
        self.host_extra: list[tuple[int, np.ndarray] | None] = [None] * L
        saved = model.kv_cache.clone()
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for layer in range(L):
                graphs, outputs = [], []
                for length in model.context_buckets:
                    for _ in range(2):      # warm-up: kernels chosen and workspaces allocated before capture
                        self._body(model, layer, length)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        ids, weights, probs = self._body(model, layer, length)
                    pool = graph.pool()
                    graphs.append(graph)
                    outputs.append((self.h[layer], self.x_shared, ids, weights, probs))
                self.graphs.append(graphs)
                self.outputs.append(outputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        model.kv_cache.copy_(saved)          # warm-up and capture wrote the current position

    def _body(self, model: "MoEModel", layer: int, length: int):
        """What one graph runs; returns the router's ids, weights and probs (the graph's own buffers)."""
        h = model.attention_at(layer, self.h_in, length, out=self.h[layer])
        x, ids, weights, probs = model.route_with_probs(layer, h)
        self.x_shared.copy_(x)
        parts = [ids.reshape(-1), weights.reshape(-1)]
        if self.extra is not None:
            parts.append(self.extra(layer, h).reshape(-1))
        torch.cat(parts, out=self.readouts[layer])
        return ids, weights, probs

    def replay(self, layer: int, bucket: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s attention + router on ``h`` [1, H] over context bucket ``bucket``: the
        static outputs (h, x, ids, weights, probs)."""
        if h is not self.h_in:                # an ExpertGraphs combine leaves h in place already
            self.h_in.copy_(h)
        self.graphs[layer][bucket].replay()
        self.replays[layer] += 1
        return self.outputs[layer][bucket]

    def read_routing(self, layer: int) -> tuple[list[int], list[float]]:
        """The routed ids and weights of the latest replay of ``layer`` on the host (one copy, one
        synchronisation); the extra output of the same replay is kept for ``extra_host``."""
        self._host[layer].copy_(self.readouts[layer], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        host, K = self._host_np[layer], self.top_k
        if self.extra is not None:     # a copy: the row is overwritten when the layer is read again
            self.host_extra[layer] = (self.replays[layer], host[2 * K:].reshape(self.extra_shape).copy())
        return host[:K].astype(np.int64).tolist(), host[K:2 * K].tolist()

    def extra_view(self, layer: int) -> torch.Tensor:
        """The extra output of ``layer``'s latest replay, on the device (a view of its readout)."""
        return self.readouts[layer, 2 * self.top_k:].view(self.extra_shape)

    def extra_host(self, layer: int) -> np.ndarray:
        """The extra output of ``layer``'s latest replay on the host: the copy ``read_routing`` brought
        back, or (if routing was not read since) a copy made now."""
        cached = self.host_extra[layer]
        if cached is not None and cached[0] == self.replays[layer]:
            return cached[1]
        return self.extra_view(layer).cpu().numpy()


class ExpertGraphs:
    """A layer's experts and its combine as CUDA graphs, over a fixed set of expert weight blobs [N, blob]
    (an engine's slots, or a resident model's experts). Graph (n, i) runs the expert whose weights are
    ``blobs[n]`` on the layer's normalised input and leaves the result in output position i (the i-th
    expert in router order); the combine graph of a layer applies ``MoEModel.weighted_sum`` to the
    outputs with the router's ids and weights from the layer's readout, and leaves the sum in the layer
    graphs' input buffer, where the next layer's graph reads it. So it serves only when the routed
    experts are the ones that ran (an engine with forced routing or lossy substitution combines
    eagerly from ``out``)."""

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
            model.expert(g.x_shared, blobs[0], out=out[0])     # warm-up: kernels chosen, workspace allocated
            for n in range(len(blobs)):
                row = []
                for i in range(K):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        model.expert(g.x_shared, blobs[n], out=out[i])
                    pool = graph.pool()
                    row.append(graph)
                experts.append(row)
            for layer in range(c.num_layers):
                readout = g.readouts[layer]
                for warm in (True, False):
                    graph = None if warm else torch.cuda.CUDAGraph()
                    ctx = torch.cuda.graph(graph, pool=pool, stream=stream) if graph is not None else nullcontext()
                    with ctx:
                        # ascending expert id; ids are exact in float32
                        order = torch.argsort(readout[:K]) if K > 2 else range(K)
                        model.weighted_sum(layer, g.h[layer], g.x_shared, out, readout[K:2 * K], order, out=g.h_in)
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
