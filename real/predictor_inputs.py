"""What the hidden-state predictors read besides a token's own residual, shared by the live predictors
(``real.predictors``) and the lookahead gate (``real.lookahead_gate``): every layer's router with its
norm folded in, and, for a gate that reads context, the previous token's residuals."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from real.model import MoEModel


class FrozenRouters:
    """Every layer's router with its MoE norm folded in, float32, on the model's device."""

    def __init__(self, model: "MoEModel"):
        c = model.config
        self.num_layers, self.num_experts, self.top_k = c.num_layers, c.num_experts, c.top_k
        self.eps = c.rms_norm_eps
        self.norm_topk_prob = c.norm_topk_prob
        norms = torch.stack([layer.moe_norm for layer in model.layers]).float()          # [L, H]
        routers = torch.stack([layer.router for layer in model.layers]).float()          # [L, E, H]
        self.folded = routers * norms[:, None, :]                                        # [L, E, H]

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        """h / rms(h) in float32: what every layer's norm sees before its own weight."""
        hf = h.float()
        return hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)

    def logits(self, target: int, h: torch.Tensor) -> torch.Tensor:
        """router_target(norm_target(h)) for h [B, H] -> [B, E]."""
        return self.unit(h) @ self.folded[target].T

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k ids [B, K] and the weights [B, K] the model would apply, from router logits [B, E]."""
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


def previous_token_states(hidden: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """hidden [N, L, H] holds consecutive tokens in windows of ``window`` (as ``real.hidden_capture``
    returns them): the residuals of the token before each of ``rows``, zeros for a window's first."""
    prev = hidden[(rows - 1).clamp_min(0)]
    return prev.masked_fill((rows % window == 0).view(-1, 1, 1), 0.0)
