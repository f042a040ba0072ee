"""Live predictors for the engine: they read the post-attention residual ``h_l`` entering MoE layer l
(``LayerAccess.hidden``) and score the experts of layers l+1..l+D with the model's own routers.

Every predictor here answers two ways from one computation: ``scores(access)`` for one token in the
engine ([D, E] numpy, as ``offload.predictors.Predictor`` asks), and ``track(hidden_states)`` for a
recorded run ([N, L, D, E], the prediction track ``experiments.make_tracks`` stores so the simulator
replays exactly the same scores). Rows past the last layer are zero.

Per call the work is a few small matmuls: each target layer's RMSNorm weight is folded into its router
in the constructor (router_t(norm_t(h)) = (router_t * w_t) @ (h / rms(h)), in float32), and the rows
of a source layer's D targets are stacked, so the multi-layer pre-gate is one [D*E, H] matvec.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from offload.policy import LayerAccess
from real.predictor_inputs import FrozenRouters, previous_token_states

if TYPE_CHECKING:
    from real.lookahead_gate import LookaheadGate
    from real.model import MoEModel

TRACK_CHUNK = 1024   # tokens per batch when computing tracks and default vectors


class HiddenStatePredictor:
    """Shared plumbing: ``probs(layer, h [B, H]) -> [D, B, E]`` is what a subclass defines."""

    depth: int
    routers: FrozenRouters

    def probs(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, access: LayerAccess) -> np.ndarray:
        h = access.hidden.reshape(1, -1)
        return self.probs(access.layer, h)[:, 0].cpu().numpy()

    @torch.no_grad()
    def track(self, hidden_states, device: str | torch.device | None = None) -> np.ndarray:
        """Scores for every recorded token and layer: hidden_states [N, L, H] -> float32 [N, L, D, E]."""
        device = self.routers.folded.device if device is None else device
        hs = torch.as_tensor(np.asarray(hidden_states))
        N, L = hs.shape[:2]
        out = np.zeros((N, L, self.depth, self.routers.num_experts), dtype=np.float32)
        for start in range(0, N, TRACK_CHUNK):
            chunk = hs[start:start + TRACK_CHUNK].to(device=device, dtype=torch.float32)
            self._chunk_started(hs, start, start + len(chunk), device)
            for layer in range(L):
                out[start:start + len(chunk), layer] = self.probs(layer, chunk[:, layer]).permute(1, 0, 2).cpu().numpy()
        self._chunk_started(hs, 0, 0, device)
        return out

    def _chunk_started(self, hs: torch.Tensor, start: int, stop: int, device) -> None:
        """``track`` is about to score tokens [start, stop) of ``hs``: a hook for predictors that read
        more than each token's own residuals."""

    def _targets(self, layer: int) -> int:
        """How many of the D target layers exist after ``layer``."""
        return max(0, min(self.depth, self.routers.num_layers - 1 - layer))


class PreGate(HiddenStatePredictor):
    """Multi-layer pre-gate: score layer l+d's experts with router_{l+d}(norm_{l+d}(h_l)), softmaxed.

    ``depth=1`` is the classic next-layer pre-gate. Per token and layer: one [D*E, H] @ [H] matvec."""

    def __init__(self, model: "MoEModel", depth: int):
        if depth < 1:
            raise ValueError(f"PreGate depth={depth}: look at least one layer ahead")
        self.depth = depth
        self.routers = FrozenRouters(model)
        L, E = self.routers.num_layers, self.routers.num_experts
        H = self.routers.folded.shape[-1]
        # stacked[l] = the folded routers of layers l+1..l+D, zero rows past the last layer
        self._stacked = torch.zeros((L, depth * E, H), dtype=torch.float32, device=self.routers.folded.device)
        for layer in range(L):
            n = self._targets(layer)
            self._stacked[layer, :n * E] = self.routers.folded[layer + 1:layer + 1 + n].reshape(n * E, H)

    def probs(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        E, n = self.routers.num_experts, self._targets(layer)
        logits = (self.routers.unit(h) @ self._stacked[layer].T).reshape(-1, self.depth, E)   # [B, D, E]
        p = torch.softmax(logits, dim=-1).transpose(0, 1).contiguous()
        p[n:] = 0.0
        return p


@torch.no_grad()
def default_vectors(model: "MoEModel", hidden_states, prior_tokens: float = 8.0) -> torch.Tensor:
    """Each expert's average output, [L, E, H] float32 on the model's device (Madan et al. 2026).

    Every expert of layer l runs on x = norm_l(h_l) of every recorded token. The default vector is the
    mean over the tokens the router actually sent to that expert, because the quasi-hidden state only
    ever uses it in place of that expert's output when the router picks it: it should estimate
    E[expert(x) | expert chosen], not the output on inputs the expert never sees. An expert routed to
    few tokens would get a noisy mean, so it is shrunk towards the mean over all tokens with the weight
    of ``prior_tokens`` pseudo-tokens: (n * routed_mean + m * all_mean) / (n + m).
    ``hidden_states``: [N, L, H] (a trace's ``hidden_states``). ``model.expert_blobs`` must be present
    (compute the vectors before an ``OffloadEngine`` takes the experts over)."""
    if model.expert_blobs is None:
        raise ValueError("default_vectors needs model.expert_blobs; compute it before building an OffloadEngine "
                         "(which moves the experts into its own host arena)")
    c = model.config
    L, E, H = c.num_layers, c.num_experts, c.hidden_size
    hs = torch.as_tensor(np.asarray(hidden_states))
    if hs.ndim != 3 or hs.shape[1:] != (L, H):
        raise ValueError(f"default_vectors: hidden_states shape {tuple(hs.shape)}, expected [N, {L}, {H}]")
    routed_sum = torch.zeros((L, E, H), dtype=torch.float32, device=model.device)
    all_sum = torch.zeros_like(routed_sum)
    counts = torch.zeros((L, E), dtype=torch.float32, device=model.device)
    for start in range(0, len(hs), TRACK_CHUNK):
        chunk = hs[start:start + TRACK_CHUNK].to(model.device)
        for layer in range(L):
            h = chunk[:, layer].to(model.dtype)
            x, ids, _, _ = model.route_with_probs(layer, h)
            chosen = torch.zeros((len(h), E), dtype=torch.float32, device=model.device)
            chosen.scatter_(1, ids, 1.0)
            counts[layer] += chosen.sum(0)
            for e in range(E):
                y = model.expert(x, model.expert_blobs[layer, e].to(model.device)).float()    # [B, H]
                all_sum[layer, e] += y.sum(0)
                routed_sum[layer, e] += chosen[:, e] @ y
    n = counts[..., None]
    all_mean = all_sum / max(len(hs), 1)
    return (routed_sum + prior_tokens * all_mean) / (n + prior_tokens)


class QuasiHiddenPreGate(HiddenStatePredictor):
    """Madan et al. 2026, "Speculating Experts": guess layer l+1's input as the quasi-hidden state
    q_{l+1} = h_l + sum_{e in top-k_l} w_e * v_{l,e}, the MoE output of layer l with each chosen expert's
    output replaced by its default vector v (``default_vectors``) and the routing (top-k and applied
    weights, as the model computes them) taken from h_l; layer l+1's norm and router score q_{l+1}.

    Beyond one layer the same step is iterated: q_{l+d+1} = q_{l+d} + sum_{e in top-k_{l+d}(q_{l+d})}
    w_e v_{l+d,e}, routing each guessed layer from its own quasi-hidden state. Attention's contribution
    to the residual of layers l+1.. is unknown before they run and is left out (the paper's choice for
    one layer). Qwen2-MoE's shared expert is left out too. Per token and target layer: one [E, H]
    router matvec, a top-k and a [K, H] weighted sum."""

    def __init__(self, model: "MoEModel", default_vectors: torch.Tensor, depth: int):
        if depth < 1:
            raise ValueError(f"QuasiHiddenPreGate depth={depth}: look at least one layer ahead")
        self.depth = depth
        self.routers = FrozenRouters(model)
        L, E = self.routers.num_layers, self.routers.num_experts
        if tuple(default_vectors.shape[:2]) != (L, E):
            raise ValueError(f"default vectors of shape {tuple(default_vectors.shape)}, expected [{L}, {E}, H]")
        self.vectors = default_vectors.to(device=self.routers.folded.device, dtype=torch.float32)

    def probs(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        E = self.routers.num_experts
        q = h.float()
        out = torch.zeros((self.depth, len(q), E), dtype=torch.float32, device=q.device)
        source_logits = self.routers.logits(layer, q)
        for d in range(self._targets(layer)):
            ids, weights = self.routers.choose(source_logits)
            q = q + (weights[..., None] * self.vectors[layer + d][ids]).sum(1)             # [B, H]
            source_logits = self.routers.logits(layer + d + 1, q)
            out[d] = torch.softmax(source_logits, dim=-1)
        return out


class LookaheadGatePredictor(HiddenStatePredictor):
    """A trained ``real.lookahead_gate.LookaheadGate`` (Ou et al. 2025) as a predictor."""

    def __init__(self, gate: "LookaheadGate", window: int = 0):
        """``window``: for a context gate (``LookaheadGate(context=True)``), which scores only offline so
        far, the tokens per sequence of the hidden states ``track`` gets."""
        if gate.context and window < 2:
            raise ValueError("a context lookahead gate scores recorded text only, in windows: pass window "
                             "(tokens per sequence); the live engine keeps no previous-token state yet")
        self.gate = gate.eval()
        self.depth = gate.depth
        self.routers = gate.routers
        self.window = window
        self._prev: torch.Tensor | None = None       # the chunk's previous-token residuals, during track

    def probs(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.gate.context and (self._prev is None or len(self._prev) != len(h)):
            raise RuntimeError("a context lookahead gate scores only inside track(), which knows each "
                               "token's predecessor")
        p = torch.softmax(self.gate.logits(layer, h.float(), self._prev), dim=-1)
        p[self._targets(layer):] = 0.0
        return p

    def _chunk_started(self, hs: torch.Tensor, start: int, stop: int, device) -> None:
        if self.gate.context:
            rows = torch.arange(start, stop)
            self._prev = previous_token_states(hs, rows, self.window).to(device=device, dtype=torch.float32)


class GraphedPredictor:
    """A hidden-state predictor whose ``probs`` run inside the model's per-layer CUDA graph
    (``MoEModel.capture_graphs(extra=predictor.probs)``): by the time the engine has read the layer's
    routing, the scores are already computed, and they came back in the same copy as the routing
    (``MoEModel.read_routing``): no synchronisation of their own."""

    def __init__(self, predictor: HiddenStatePredictor, model: "MoEModel"):
        self.depth = predictor.depth
        self.model = model

    def scores(self, access: LayerAccess) -> np.ndarray:
        return self.model.graph_extra_host(access.layer)[:, 0]


def track_recall(track: np.ndarray, experts: np.ndarray) -> list[float]:
    """Recall per distance d = 1..D: the fraction of the routed top-k at layer l+d found in the top-k of
    the scores that layer l gave it, averaged over tokens and source layers with l+d < L.
    ``track`` [N, L, D, E]; ``experts`` [N, L, K] (the routing that actually happened)."""
    N, L, D, E = track.shape
    K = experts.shape[-1]
    out = []
    for d in range(1, D + 1):
        if d >= L:
            out.append(float("nan"))
            continue
        scores = track[:, :L - d, d - 1].astype(np.float32)                      # [N, L-d, E]
        predicted = np.argsort(-scores, axis=-1, kind="stable")[..., :K]
        hit = np.zeros((N, L - d, E), dtype=bool)
        np.put_along_axis(hit, predicted, True, axis=-1)
        truth = experts[:, d:].astype(np.int64)                                   # [N, L-d, K]
        out.append(float(np.take_along_axis(hit, truth, axis=-1).mean()))
    return out


def kl_to_router(track: np.ndarray | torch.Tensor, true_probs: np.ndarray | torch.Tensor) -> float:
    """Mean over tokens, distances and source layers (l+d < L) of KL(true router probs at l+d || track).
    ``track`` [N, L, D, E] probabilities; ``true_probs`` [N, L, E]."""
    track, true_probs = torch.as_tensor(track).float(), torch.as_tensor(true_probs).float()
    N, L, D, E = track.shape
    total, count = 0.0, 0
    for d in range(1, min(D, L - 1) + 1):
        p = true_probs[:, d:]
        logq = torch.log(track[:, :L - d, d - 1].clamp_min(1e-12))
        total += float(F.kl_div(logq, p, reduction="sum"))
        count += N * (L - d)
    return total / max(count, 1)
