"""The bound: Belady eviction plus perfect prefetch of the next ``prefetch_depth`` layers' experts.

No real predictor knows the future routing; this shows how fast any policy could be with the same
cache and link, so a policy's gap to it is the room left.

The window: after layer l of token t routes (step s = t * L + l), the experts the trace chose at steps
s+1 .. s+depth, each at its first use there, ordered by that step (router order within a step).

- ``policy.cross_tokens`` (true, the default): the window runs on into the next tokens' layers, as the
  results in the README were computed; a real system cannot know them (the next token's routing
  depends on attention not yet run), but a bound may. False stops the window at the token's last layer,
  as the predictive policies' windows stop.
- Up to depth = layers (or without crossing) every layer appears in the window at most once: the
  window's steps are read afresh at each decision, as they always were.
- A deeper window costs only what can change a decision. A layer's experts compete only for that
  layer's ``cache_slots`` slots (per-layer mode), and Belady admits a prefetch only by evicting an
  expert needed later than it; so once a layer has ``cache_slots`` distinct experts in the window, the
  later ones wait until that layer routes again. The window therefore holds at most ``cache_slots``
  experts per layer whatever the depth, and is kept from step to step (only the layer that routed, the
  step that entered the window and the layers whose slots changed are looked at again), so a step
  costs about the same at depth 256 as at depth = layers. Up to depth = layers this leaves nothing
  out (top-k <= cache_slots). In global mode (one scope) every distinct expert of the window is kept:
  at most layers x experts, whatever the depth.
- Experts that already hold a slot are not requested: the controller skips them anyway.
"""
from __future__ import annotations

from offload.cache import CacheMode
from offload.policy import LayerAccess, PolicyContext, PrefetchRequest
from policies.belady import Belady

# PrefetchRequest(key, step) without the Python frame of a named tuple's __new__ (a request is built for
# every expert a decision asks for): _request(PrefetchRequest, (key, step)).
_request = tuple.__new__


class OraclePrefetch(Belady):
    parameters = {"cross_tokens": "true (default): the prefetch window runs on into the next tokens' layers; "
                                  "false: it stops at the current token's last layer"}

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        cross = ctx.params.get("cross_tokens", True)
        if not isinstance(cross, bool):
            raise ValueError(f"policy oracle: cross_tokens={cross!r} must be true or false")
        self.cross_tokens = cross
        L = ctx.num_layers
        self._deep = cross and ctx.prefetch_depth > L       # a layer can appear twice in the window
        self._per_layer_cap = ctx.cache_slots if ctx.cache_mode is CacheMode.PER_LAYER else ctx.num_experts
        self._last_step = (ctx.trace.num_tokens * L - 1) if ctx.trace is not None else -1
        # layer -> {key: its request}: the layer's first distinct experts in the window, in need order
        self._window: list[dict[int, PrefetchRequest]] = [{} for _ in range(L)]
        self._end = -1          # the window's last step, as ``_window`` stands
        # layer -> the requests of its window whose expert holds no slot, recomputed only for the layers
        # whose window or slots changed since the last decision (``_stale``)
        self._missing: list[list[PrefetchRequest]] = [[] for _ in range(L)]
        self._stale: set[int] = set()
        self._L, self._E, self._depth = L, ctx.num_experts, ctx.prefetch_depth
        self._route_keys = self._oracle.route_keys

    def on_insert(self, key: int) -> None:
        if self._deep:
            self._stale.add(key // self._E)

    def on_evict(self, key: int) -> None:
        if self._deep:
            self._stale.add(key // self._E)

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        L = self._L
        step = access.step
        end = step + self._depth
        if not self.cross_tokens:
            end = min(end, (access.token + 1) * L - 1)
        if end > self._last_step:
            end = self._last_step
        if self._deep:
            return self._kept_window(access, end)
        holds, route_keys = self.cache.holds, self._route_keys
        requests = []
        for later in range(step + 1, end + 1):
            token, layer = divmod(later, L)
            for key in route_keys(token)[layer]:
                if not holds(key):
                    requests.append(_request(PrefetchRequest, (key, later)))
        return requests

    def _kept_window(self, access: LayerAccess, end: int) -> list[PrefetchRequest]:
        """The requests of a window deeper than the layers, updated from the last decision's."""
        L = self._L
        step, layer, depth = access.step, access.layer, self._depth
        window, stale = self._window, self._stale
        for entered in range(max(self._end, step) + 1, end + 1):
            if entered % L != layer:                  # the layer that routed is walked afresh below
                self._add_routing(window[entered % L], entered)
                stale.add(entered % L)
        self._end = max(self._end, end)
        # the layer that routed: its step left the window; the window holds its next routings instead
        routed = window[layer] = {}
        for later in range(step + L, end + 1, L):
            if not self._add_routing(routed, later):
                break
        stale.add(layer)
        holds, missing = self.cache.holds, self._missing
        for j in stale:
            missing[j] = [request for key, request in window[j].items() if not holds(key)]
        stale.clear()
        requests = []
        for offset in range(1, min(depth, L) + 1):    # the layers that can have a step in the window
            requests += missing[(layer + offset) % L]
        return requests

    def _add_routing(self, experts: dict[int, PrefetchRequest], step: int) -> bool:
        """Add the experts routed at ``step`` that ``experts`` (one layer's) lacks, up to the layer's cap;
        False once the cap is reached."""
        cap = self._per_layer_cap
        if len(experts) >= cap:
            return False
        token, layer = divmod(step, self._L)
        for key in self._route_keys(token)[layer]:
            if key not in experts:
                experts[key] = _request(PrefetchRequest, (key, step))
                if len(experts) >= cap:
                    return False
        return True
