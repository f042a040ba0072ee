"""Speculating Experts (Madan et al. 2026): prefetch the next layer's top-k as layer l+1's router
scores a quasi-hidden state (track "quasi"); lossless, with mixtral-offloading's LRU and schedule.

Only the predictor differs from ``mixtral-offloading``, so the two compare predictors one to one;
the lossy mode (running the speculated experts) is not modelled.
"""
from __future__ import annotations

from policies.mixtral_offloading import MixtralOffloading


class SpeculatingExperts(MixtralOffloading):
    track = "quasi"
