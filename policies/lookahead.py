"""Lookahead gate with speculative expert scheduling (Ou et al. 2025): a trained gate predicts layers
l+1..l+D (track "lookahead"); copies are ordered, cancelled, depth-limited and protected as in
``policies.speculative``.
"""
from __future__ import annotations

from policies.speculative import SpeculativePrefetch


class Lookahead(SpeculativePrefetch):
    track = "lookahead"
