"""Pure decision logic shared by the simulator and the engine: cache state, copy queue, the policy
interface, the registry and the built-in policies."""
from policies.base import LayerAccess, Policy, PolicyContext, PrefetchRequest
from policies.cache import CacheMode, ExpertCache
from policies.controller import OffloadController, OffloadStats
from policies.registry import BASELINES, BUILTIN, available_policies, resolve_policy

__all__ = ["BASELINES", "BUILTIN", "CacheMode", "ExpertCache", "LayerAccess", "OffloadController",
           "OffloadStats", "Policy", "PolicyContext", "PrefetchRequest", "available_policies",
           "resolve_policy"]
