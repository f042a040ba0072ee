"""The policy plug-ins: one policy per file, one line each in ``policies.registry``.

What a policy (built in, or a user's own file) is written against is re-exported here from the
shared core, ``offload``: ``Policy``, ``PolicyContext``, ``LayerAccess``, ``PrefetchRequest`` and the
read-only ``CacheView`` its hooks see.
"""
from offload.access import LayerAccess, PrefetchRequest
from offload.cache import CacheMode, CacheView
from offload.policy import Policy, PolicyContext
from policies.registry import BASELINES, BUILTIN, available_policies, resolve_policy

__all__ = ["BASELINES", "BUILTIN", "CacheMode", "CacheView", "LayerAccess", "Policy", "PolicyContext",
           "PrefetchRequest", "available_policies", "resolve_policy"]
