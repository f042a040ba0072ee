"""CUDA graphs of the decoder (``MoEModel.capture_graphs``, ``MoEModel.expert_graphs``).

At batch 1 a layer is a few dozen small kernels, and launching them one by one from Python costs far
more than running them (about 0.7 ms a layer on an H100, against microseconds of GPU time), which
would hide every copy behind host overhead. So on CUDA everything between two routing decisions is
one graph (``LayerGraphs``): layer l's front graph runs layer l-1's combine (the experts' outputs
weighed and summed) and then layer l's attention and router, and a last graph runs the last combine
and the head. There is one graph per layer and context bucket (``MoEModel.context_buckets``): the
token's position and the attention mask are device tensors that ``MoEModel.set_position`` writes once
per step, the key and value are written with ``index_copy_``, and attention reads the bucket's
positions only, so its time grows with the context. The graph also packs what the host must read
after the layer (the routed ids and weights, and a live predictor's scores) into one float32 buffer,
so that the routing read-back is one copy into page-locked memory and one synchronisation; the
combine reads its weights from that same buffer, where an engine that runs other experts than the
router chose (forced routing, a lossy policy) puts theirs (``LayerGraphs.set_run``).

The kernels, when the model compiles (``real.layer_ops``): Inductor's Triton kernels for the front's
batch-1 products (q, k and v in one; o_proj with its residual; the router), the top-k, the bucket's
attention with its RoPE lookup and KV write, and the elementwise work around them (norms, softmax,
top-k weighting, the weighted sum); the experts' products are cuBLAS GEMMs (gate and up in one). The
compiled functions take the layer's weights as arguments, so one compilation serves every layer (and,
for attention, one per bucket). Uncompiled: PyTorch's eager kernels, SDPA for attention.

Routing is data-dependent, so the experts cannot join those graphs; they get graphs of their own
(``ExpertGraphs``), one per (expert weight blob, top-k position), so that the host picks which to
launch from the routing it has read, for a few microseconds each instead of about 100 us per expert
launched op by op. A layer is thus K + 1 graph launches. Every path (the resident model, the
offloaded engine at any cache size) runs the same graphs, so they stay bit-identical with each
other; against the eager path they agree to rounding.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from real.layer_ops import Front

if TYPE_CHECKING:
    from real.model import MoEModel

DISABLE_ENV = "MOE_LAB_EXPERT_GRAPHS"         # "0": experts launched op by op (for comparison)

Extra = Callable[[int, torch.Tensor], torch.Tensor]   # (layer, post-attention residual [1, H]) -> scores


class LayerGraphs:
    """Graphs of each layer's front half: ``graphs[layer][bucket]`` runs the previous layer's combine (for
    layer 0: reads ``h_in``, the embedding) and then the layer's attention + router; ``backs[bucket]``
    runs the last layer's combine and the head. Static buffers: ``x_shared`` (the layer's normalised
    expert input; shared by every layer, so one expert graph per weight blob serves any layer),
    ``expert_out`` [K, 1, H] (the experts' outputs by top-k position, which the next graph combines)
    and ``readouts[layer]`` (ids | weights | extra, float32: what the host reads back, and what the
    combine weighs the experts with, so that ``set_run`` can put other experts' weights there). A
    graph's other outputs (the residual after attention, ids, weights, probs, logits) are its own, fixed
    across replays: the next layer's graph of the same bucket reads the residual in place. Graphs share
    one memory pool and are replayed in the order they were captured (layers in order within a step,
    whose bucket is fixed), so no graph's temporaries overwrite an output still to be read."""

    @torch.no_grad()
    def __init__(self, model: "MoEModel", extra: Extra | None = None):
        c, device = model.config, model.device
        L, K, H = c.num_layers, c.top_k, c.hidden_size
        self.extra = extra
        self.top_k = K
        self.device = device
        self.h_in = torch.zeros((1, H), dtype=model.dtype, device=device)
        self.x_shared = torch.zeros_like(self.h_in)
        self.expert_out = model.expert_out
        probe = None if extra is None else extra(0, self.h_in)
        self.extra_shape = None if probe is None else tuple(probe.shape)
        width = 2 * K + (0 if probe is None else probe.numel())
        # One tensor per layer (not rows of one): compiled code then writes into them as whole inputs.
        self.readouts = [torch.zeros(width, dtype=torch.float32, device=device) for _ in range(L)]
        # The host's copies: page-locked, so that the read-back and ``set_run``'s upload are plain
        # asynchronous copies; one row per layer, so that no copy in flight is overwritten.
        self._host = torch.empty((L, width), dtype=torch.float32, pin_memory=True)
        self._host_np = self._host.numpy()
        self._upload = torch.empty((L, 2 * K), dtype=torch.float32, pin_memory=True)
        self._upload_np = self._upload.numpy()
        self.graphs: list[list[torch.cuda.CUDAGraph]] = []
        self.outputs: list[list[Front]] = []                          # [layer][bucket]
        self.backs: list[torch.cuda.CUDAGraph] = []
        self.logits: list[torch.Tensor] = []                         # [bucket]
        self.replays = [0] * L                          # replays per layer, to tell a host copy is current
        self.host_extra: list[tuple[int, np.ndarray] | None] = [None] * L
        self._model = model
        saved = model.kv_cache.clone()
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for layer in range(L):
                graphs, outputs = [], []
                for b, length in enumerate(model.context_buckets):
                    previous = None if layer == 0 else self.outputs[layer - 1][b].h
                    for _ in range(2):      # warm-up: kernels compiled and chosen, workspaces allocated
                        self._front(model, layer, length, previous)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        front = self._front(model, layer, length, previous)
                    pool = graph.pool()
                    graphs.append(graph)
                    outputs.append(front._replace(x=self.x_shared))
                self.graphs.append(graphs)
                self.outputs.append(outputs)
            for b in range(len(model.context_buckets)):
                last = self.outputs[L - 1][b].h
                for _ in range(2):
                    self._back(model, last)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self._back(model, last)
                pool = graph.pool()
                self.backs.append(graph)
                self.logits.append(logits)
        torch.cuda.current_stream(device).wait_stream(stream)
        model.kv_cache.copy_(saved)          # warm-up and capture wrote the current position

    def _combine(self, model: "MoEModel", layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s combine on its residual h, with the experts and weights its readout holds."""
        K, readout = self.top_k, self.readouts[layer]
        return model.moe_sum(layer, h, self.x_shared, readout[:K], readout[K:2 * K], self.expert_out)

    def _front(self, model: "MoEModel", layer: int, length: int, previous: torch.Tensor | None):
        """What one front graph runs: the previous layer's combine on its residual ``previous`` (layer 0:
        ``h_in``), then this layer's attention + router; returns the ``Front`` (its own tensors, x aside)."""
        h = self.h_in if previous is None else self._combine(model, layer - 1, previous)
        front = model.front_at(layer, h, length, x_out=self.x_shared, readout=self.readouts[layer])
        if self.extra is not None:
            self.readouts[layer][2 * self.top_k:].copy_(self.extra(layer, front.h).reshape(-1))
        return front

    def _back(self, model: "MoEModel", last: torch.Tensor) -> torch.Tensor:
        return model.final(self._combine(model, model.config.num_layers - 1, last))

    def replay(self, layer: int, bucket: int) -> Front:
        """Layer ``layer``'s front graph over context bucket ``bucket``: the previous layer's combine,
        then attention + router; its static outputs."""
        self.graphs[layer][bucket].replay()
        self.replays[layer] += 1
        return self.outputs[layer][bucket]

    def replay_back(self, bucket: int) -> torch.Tensor:
        """The last layer's combine and the head: the logits [1, V] (a copy: callers may keep them)."""
        self.backs[bucket].replay()
        return self.logits[bucket].clone()

    def set_run(self, layer: int, experts, weights: torch.Tensor) -> None:
        """Put the experts that run at ``layer`` (top-k position order) and their weights [K] into its
        readout, where the next graph's combine reads them: host weights through a page-locked row
        (asynchronous), device weights (a lossy policy's reweighing) by a device copy."""
        K, readout = self.top_k, self.readouts[layer]
        row = self._upload_np[layer]
        row[:K] = experts
        if weights.device.type == "cpu":
            row[K:] = weights.reshape(-1).float().numpy()
            readout[:2 * K].copy_(self._upload[layer], non_blocking=True)
        else:
            readout[:K].copy_(self._upload[layer, :K], non_blocking=True)
            readout[K:2 * K].copy_(weights.reshape(-1))

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
        return self.readouts[layer][2 * self.top_k:].view(self.extra_shape)

    def extra_host(self, layer: int) -> np.ndarray:
        """The extra output of ``layer``'s latest replay on the host: the copy ``read_routing`` brought
        back, or (if routing was not read since) a copy made now."""
        cached = self.host_extra[layer]
        if cached is not None and cached[0] == self.replays[layer]:
            return cached[1]
        return self.extra_view(layer).cpu().numpy()


class ExpertGraphs:
    """A layer's experts as CUDA graphs, over a fixed set of expert weight blobs [N, blob] (an engine's
    slots, or a resident model's experts): graph (n, i) runs the expert whose weights are ``blobs[n]``
    on the layer's normalised input (``LayerGraphs.x_shared``) and leaves the result in output position
    i of ``LayerGraphs.expert_out`` (the i-th expert that runs, in top-k order), which the next front
    graph combines."""

    MAX_GRAPHS = 4096           # above this, capture time and graph memory outweigh the launch savings

    def __init__(self, layers: LayerGraphs, experts: list):
        self.layers = layers    # the layer graphs these read from and write to (stale once recaptured)
        self.out = layers.expert_out
        self._experts = experts

    @classmethod
    @torch.no_grad()
    def capture(cls, model: "MoEModel", g: LayerGraphs, blobs: torch.Tensor) -> "ExpertGraphs | None":
        """Graphs over ``blobs`` [N, blob] on the GPU that read and write the layer graphs ``g``'s buffers;
        None when there would be too many graphs or ``MOE_LAB_EXPERT_GRAPHS=0``."""
        K = model.config.top_k
        if len(blobs) * K > cls.MAX_GRAPHS or os.environ.get(DISABLE_ENV) == "0":
            return None
        device = model.device
        out = g.expert_out
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        pool = None
        experts = []
        with torch.cuda.stream(stream):
            for _ in range(2):      # warm-up: kernels compiled and chosen, workspace allocated
                model.expert(g.x_shared, blobs[0], out=out[0])
            for n in range(len(blobs)):
                row = []
                for i in range(K):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        model.expert(g.x_shared, blobs[n], out=out[i])
                    pool = graph.pool()
                    row.append(graph)
                experts.append(row)
        torch.cuda.current_stream(device).wait_stream(stream)
        return cls(g, experts)

    def expert(self, n: int, i: int) -> None:
        """Run the expert in blob ``n`` on the current layer's input, into ``out[i]``."""
        self._experts[n][i].replay()
