"""Speculating Experts (Madan et al. 2026): prefetch the next layer's top-k as layer l+1's router
scores a quasi-hidden state (track "quasi"), with mixtral-offloading's LRU and schedule.

``speculating-experts`` is lossless: only the predictor differs from ``mixtral-offloading``, so the
two compare predictors one to one. ``speculating-experts-lossy`` also *runs* the speculated experts in
place of the routed ones (the paper's optional mode): layer l+1 then never waits for a copy its
prediction missed, at a cost in accuracy that is always reported next to its speed
(``experiments.engine_bench``: held-out perplexity and top-1 agreement with the lossless model).
The speculated experts are weighted by layer l+1's own router probabilities for them (its softmax on
the true hidden state, with the model's renormalisation rule), so only the choice is speculative.
Layer 0 has no earlier layer to speculate from and runs its routed experts.
"""
from __future__ import annotations

import numpy as np

from offload.policy import LayerAccess
from policies.mixtral_offloading import MixtralOffloading


class SpeculatingExperts(MixtralOffloading):
    track = "quasi"


class SpeculatingExpertsLossy(SpeculatingExperts):
    lossless = False

    def execute(self, access: LayerAccess) -> list[int] | None:
        latest = self.latest_scores
        if latest is None or latest[0] != access.step - 1 or access.layer == 0:
            return None            # no speculation for this layer (first layer of a token)
        speculated = np.argsort(-latest[1][0], kind="stable")[: len(access.experts)].tolist()
        # routed experts that were speculated keep their routed order; the others follow
        kept = [e for e in access.experts if e in speculated]
        return kept + [e for e in speculated if e not in kept]
