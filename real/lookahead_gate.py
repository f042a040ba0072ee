"""Lookahead gate (Ou et al. 2025): a small trained network that maps the residual h_l entering MoE
layer l to expert scores for layers l+1..l+D.

For each source layer l and distance d with l+d < L (a "pair" p):

    scores_{l,d}(h) = router_{l+d}(norm_{l+d}(h + s(h) * A_p(h / s(h)))),   s(h) = sqrt(mean(h^2) + eps)
    A_p(u) = W2_p silu(W1_p u + b1_p) + b2_p                                 (H -> r -> H)

With ``context=True`` the adapter also reads the *previous token's* residual at the target layer,
c = h_{t-1, l+d} (unit-RMS, zero for a sequence's first token): A_p(u, c) = W2_p silu(W1_p u + C_p c +
b1_p) + b2_p. That is our extension, not Ou et al.'s. The hypothesis: much of what h_l cannot know about
layer l+d is what that layer's attention adds from earlier tokens, which the previous token's residual
there summarises.
It is scored offline only so far (``LookaheadGatePredictor(gate, window).track``): the live engine
keeps no previous-token state yet.

The target layers' norms and routers are frozen copies of the model's. A_p reads the unit-RMS residual
and its output is scaled back by s(h): the residual's magnitude grows with depth, and a correction of
fixed relative size keeps one learning rate right for every layer (it is the spec's h + A(h) with the
scale factored out). W2 and b2 start at zero, so the untrained gate *is* the multi-layer pre-gate, bit
for bit: layer-wise gate alignment by initialisation. Training then aligns each target layer's
distribution: it minimises sum_d KL(p_true_{l+d} || p_gate_{l,d}), averaged over tokens and source
layers, where p_true_{l+d} = softmax(router_{l+d}(norm_{l+d}(h_{l+d}))) from the recorded h at l+d.

Size, with P = sum_l min(D, L-1-l) = D(L-1) - D(D-1)/2 pairs (D <= L-1):
    parameters       P * (2*H*r + r + H)          (Mixtral-8x7B, L=32, H=4096, D=3, r=64: 47.6 M)
    FLOPs per token  P * (4*H*r + 2*H*E + ~8*H)   (same: 103 MFLOP, against ~2*13e9 for the model's step)
One source layer costs min(D, L-1-l) pairs: about 3.4 MFLOP per layer for Mixtral at D=3.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save as safetensors_bytes

from real.predictor_inputs import FrozenRouters, previous_token_states
from traces.io import atomic_write

WEIGHTS_NAME = "gate.safetensors"
CONFIG_NAME = "gate.json"
FORMAT = "moe-offload-lab/lookahead-gate"
FORMAT_VERSION = 1
VAL_TOKENS = 4096      # held-out tokens the training log scores


def _pairs(num_layers: int, depth: int) -> list[tuple[int, int]]:
    """(source layer, distance) for every target that exists, ordered by source then distance."""
    return [(l, d) for l in range(num_layers) for d in range(1, depth + 1) if l + d < num_layers]


@dataclass(frozen=True)
class GateConfig:
    num_layers: int
    num_experts: int
    hidden_size: int
    depth: int
    rank: int
    context: bool = False


class LookaheadGate(torch.nn.Module):
    def __init__(self, routers: FrozenRouters, depth: int, rank: int = 64, seed: int = 0, context: bool = False):
        super().__init__()
        if depth < 1 or rank < 1:
            raise ValueError(f"LookaheadGate: depth={depth} and rank={rank} must be at least 1")
        self.routers = routers                      # frozen: plain tensors, not parameters
        L, E, H = routers.folded.shape[0], routers.folded.shape[1], routers.folded.shape[2]
        self.config = GateConfig(L, E, H, depth, rank, bool(context))
        self.context = bool(context)
        self.depth = depth
        pairs = _pairs(L, depth)
        if not pairs:
            raise ValueError(f"LookaheadGate: a model with {L} layer(s) has no later layer to predict")
        device = routers.folded.device
        self.register_buffer("source", torch.tensor([l for l, _ in pairs], device=device), persistent=False)
        self.register_buffer("target", torch.tensor([l + d for l, d in pairs], device=device), persistent=False)
        self._first = [0] * (L + 1)                 # pairs of source layer l: [_first[l], _first[l + 1])
        for l, _ in pairs:
            self._first[l + 1] += 1
        self._num_sources = sum(1 for l in range(L) if self._first[l + 1])
        for l in range(L):
            self._first[l + 1] += self._first[l]
        g = torch.Generator().manual_seed(seed)
        P = len(pairs)
        self.w1 = torch.nn.Parameter((torch.randn((P, rank, H), generator=g) / H ** 0.5).to(device))
        self.b1 = torch.nn.Parameter(torch.zeros((P, rank), device=device))
        self.w2 = torch.nn.Parameter(torch.zeros((P, H, rank), device=device))
        self.b2 = torch.nn.Parameter(torch.zeros((P, H), device=device))
        if self.context:    # drawn after the others, so a context gate's W1 equals the plain gate's
            self.c1 = torch.nn.Parameter((torch.randn((P, rank, H), generator=g) / H ** 0.5).to(device))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        c, P = self.config, len(self.source)
        context = 2 * c.hidden_size * c.rank + 2 * c.hidden_size if c.context else 0
        return P * (4 * c.hidden_size * c.rank + 2 * c.hidden_size * c.num_experts + 8 * c.hidden_size + context)

    def pair_logits(self, first: int, stop: int, h: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of pairs [first, stop) for their source residuals h [P', B, H] -> [P', B, E]; a
        context gate also needs ``prev`` [P', B, H], the previous token's residual at each pair's target."""
        eps = self.routers.eps
        scale = torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        u = h / scale
        pre = torch.baddbmm(self.b1[first:stop, None], u, self.w1[first:stop].transpose(1, 2))
        if self.context:
            if prev is None:
                raise ValueError("a context gate needs the previous token's residuals (prev)")
            c = prev / torch.sqrt(prev.pow(2).mean(-1, keepdim=True) + eps)      # zero rows stay zero
            pre = pre + torch.bmm(c, self.c1[first:stop].transpose(1, 2))
        a = F.silu(pre)
        delta = torch.baddbmm(self.b2[first:stop, None], a, self.w2[first:stop].transpose(1, 2))
        z = h + scale * delta
        folded = self.routers.folded[self.target[first:stop]]                           # [P', E, H]
        return torch.bmm(self.routers.unit(z), folded.transpose(1, 2))

    def logits(self, layer: int, h: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """[D, B, E] logits for layers layer+1..layer+D from h [B, H] (float32); rows past the last
        layer are zero. A context gate also reads ``prev`` [B, L, H]: every layer's residual of each
        row's previous token (zeros for a sequence's first token)."""
        first, stop = self._first[layer], self._first[layer + 1]
        out = torch.zeros((self.depth, len(h), self.config.num_experts), dtype=torch.float32, device=h.device)
        if stop > first:
            p = None if prev is None else prev[:, self.target[first:stop]].transpose(0, 1)
            out[:stop - first] = self.pair_logits(first, stop, h.expand(stop - first, *h.shape), p)
        return out

    def loss(self, hidden: torch.Tensor, true_probs: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over distances of KL(true || gate), averaged over tokens and source layers.
        hidden [B, L, H] float32, true_probs [B, L, E]; ``prev`` [B, L, H] for a context gate."""
        h = hidden[:, self.source].transpose(0, 1)                                      # [P, B, H]
        p_ctx = None if prev is None else prev[:, self.target].transpose(0, 1)
        logq = F.log_softmax(self.pair_logits(0, len(self.source), h, p_ctx), dim=-1)
        p = true_probs[:, self.target].transpose(0, 1)
        kl = (p * (torch.log(p.clamp_min(1e-12)) - logq)).sum(-1)                      # [P, B]
        return kl.sum() / (hidden.shape[0] * self._num_sources)

    # -- persistence: safetensors weights + a small JSON config, never pickle ----------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """The gate as ``path``/gate.safetensors and ``path``/gate.json, each written atomically
        (``traces.io.atomic_write``: a reader never sees half a file; the umask's mode, as every result file,
        where safetensors' own ``save_file`` leaves its temp file's 0600)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        atomic_write(path / WEIGHTS_NAME, lambda f: f.write(safetensors_bytes(tensors)), binary=True)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, **self.config.__dict__,
                "rms_norm_eps": self.routers.eps, "parameters": self.num_parameters,
                "flops_per_token": self.flops_per_token(), "extra": dict(extra or {})}
        atomic_write(path / CONFIG_NAME, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n"))

    @classmethod
    def load(cls, path: str | Path, model, device: str | torch.device | None = None) -> "LookaheadGate":
        """The gate saved in ``path`` for ``model`` (whose norms and routers it freezes again)."""
        path = Path(path)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_path, weights_path):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; train a gate with `python -m experiments.train_gate "
                                        f"--out {path}`")
        meta = json.loads(config_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format {meta.get('format')!r} v{meta.get('version')}, expected "
                             f"{FORMAT!r} v{FORMAT_VERSION}; retrain the gate")
        c = model.config
        want = {"num_layers": c.num_layers, "num_experts": c.num_experts, "hidden_size": c.hidden_size}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"{config_path}: the gate was trained for {got}, the model has {want}; pass the "
                             f"checkpoint the gate was trained on")
        routers = FrozenRouters(model)
        if device is not None:
            routers.folded = routers.folded.to(device)
        gate = cls(routers, int(meta["depth"]), int(meta["rank"]), context=bool(meta.get("context", False)))
        state = load_file(str(weights_path), device=str(routers.folded.device))
        gate.load_state_dict(state, strict=True)
        return gate


def true_router_probs(routers: FrozenRouters, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(router_l(norm_l(h_l))) for every token and layer: hidden [N, L, H] -> [N, L, E] float32."""
    return torch.stack([torch.softmax(routers.logits(l, hidden[:, l]), dim=-1)
                        for l in range(hidden.shape[1])], dim=1)


def train_lookahead_gate(model, hidden_states, depth: int = 3, rank: int = 64, steps: int = 2000,
                         lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                         batch_size: int = 256, log_every: int = 0, val_hidden_states=None,
                         keep_best: bool = False, context: bool = False, window: int = 0) -> LookaheadGate:
    """Train a gate on recorded residuals ``hidden_states`` [N, L, H] (a trace's ``hidden_states``):
    AdamW on random minibatches of tokens. Deterministic for a seed on the CPU. With ``log_every``, the
    log also shows the KL on ``val_hidden_states`` (text the gate never trains on), so overfitting shows;
    with ``keep_best`` too, the gate returned is the one of the logged step with the lowest such KL
    (then pass validation text, not the text the gate will be scored on). A ``context`` gate needs
    ``window``: both arrays hold consecutive tokens in windows of that many (``previous_token_states``)."""
    if context and window < 2:
        raise ValueError(f"train_lookahead_gate: a context gate needs window >= 2 (tokens per sequence), got {window}")
    if keep_best and not (log_every and val_hidden_states is not None):
        raise ValueError("train_lookahead_gate: keep_best needs log_every and val_hidden_states")
    device = torch.device(device)
    routers = FrozenRouters(model)
    routers.folded = routers.folded.to(device)
    hidden = torch.as_tensor(np.asarray(hidden_states)).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        probs = true_router_probs(routers, hidden)
    gate = LookaheadGate(routers, depth, rank, seed, context=context)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    N = len(hidden)
    val = val_probs = val_prev = None
    if log_every and val_hidden_states is not None:
        val = torch.as_tensor(np.asarray(val_hidden_states[:VAL_TOKENS])).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            val_probs = true_router_probs(routers, val)
        if context:
            val_prev = previous_token_states(val, torch.arange(len(val), device=device), window)
    best = (float("inf"), -1, None)
    for step in range(steps):
        idx = torch.randint(N, (min(batch_size, N),), generator=g).to(device)
        prev = previous_token_states(hidden, idx, window) if context else None
        loss = gate.loss(hidden[idx], probs[idx], prev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            held = ""
            if val is not None:
                with torch.no_grad():
                    val_kl = gate.loss(val, val_probs, val_prev).item()
                held = f"  held-out KL {val_kl:.5f}"
                if keep_best and val_kl < best[0]:
                    best = (val_kl, step, {k: v.detach().clone() for k, v in gate.state_dict().items()})
            print(f"step {step:5d}  KL {loss.item():.5f}{held}", flush=True)
    if keep_best and best[2] is not None:
        gate.load_state_dict(best[2])
        print(f"kept step {best[1]} (held-out KL {best[0]:.5f})", flush=True)
    return gate.eval()
