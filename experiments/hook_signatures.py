"""A user policy's hooks checked against the calls the controller makes, before a sweep runs.

A hook that cannot take the controller's arguments (``def choose_victim(self, scope)``, ``choose_victim = 5``,
a keyword-only ``prefetch``) used to fail only when first called, as a TypeError inside the controller, once per
configuration. The sweep's grid check (``experiments.runner.validate_grid``) refuses it at load instead, in one
line naming the hook, where it is defined and the signature to define.

Why here and not in ``policies.registry.resolve_policy``: every module of ``policies/`` is in the engine's code
digest (``validation.store.engine_modules``), which keys the stored engine measurements; a load-time check changes
no measurement, and the engine commands still report such a hook when it fails, with its file and line.
"""
from __future__ import annotations

import inspect

from offload.policy import Policy
from policies.registry import PolicyLoadError

# Every hook the controller calls, with the arguments it passes after self (offload/controller.py).
HOOK_ARGUMENTS = {"preload": (), "on_access": ("access", "index", "key", "hit"), "on_insert": ("key",),
                  "on_evict": ("key",), "choose_victim": ("scope", "cache", "job"), "execute": ("access",),
                  "prefetch": ("access",)}


def check_hook_signatures(spec: str, cls: type[Policy]) -> None:
    """PolicyLoadError for a hook ``cls`` overrides with something that is not callable or cannot take the
    controller's arguments (``HOOK_ARGUMENTS``), naming the hook, its file:line and the signature to define. A
    signature Python cannot read (a builtin, a C extension's callable) is left to fail at run time."""
    for hook, args in HOOK_ARGUMENTS.items():
        raw = inspect.getattr_static(cls, hook)
        if raw is inspect.getattr_static(Policy, hook):
            continue
        wanted = f"def {hook}(self{''.join(', ' + a for a in args)})"
        if isinstance(raw, property):
            raise PolicyLoadError(f"policy {spec!r}: {cls.__name__}.{hook} is a property, not a method; the "
                                  f"controller calls it: define {wanted}")
        attr = getattr(cls, hook)
        if inspect.iscoroutinefunction(attr) or inspect.isasyncgenfunction(attr):
            # calling it only makes a coroutine, which nothing awaits: the hook would never run, without a word
            raise PolicyLoadError(f"policy {spec!r}: {cls.__name__}.{hook} is an async def: the controller calls "
                                  f"hooks synchronously and never awaits them; define {wanted}")
        if not callable(attr):
            shown = repr(attr) if len(repr(attr)) <= 40 else repr(attr)[:37] + "..."
            raise PolicyLoadError(f"policy {spec!r}: {cls.__name__}.{hook} is {type(attr).__name__} {shown}, not a "
                                  f"method; the controller calls it: define {wanted}")
        try:
            signature = inspect.signature(attr)
        except (TypeError, ValueError):
            continue
        # a plain function read from the class takes self first (Python binds it to the policy); a staticmethod,
        # a classmethod or a callable object (an instance with __call__, a functools.partial) is called as it is
        passed = ("self", *args) if inspect.isfunction(raw) else args
        try:
            signature.bind(*passed)
        except TypeError:
            code = getattr(inspect.unwrap(attr), "__code__", None)
            site = f" (at {code.co_filename}:{code.co_firstlineno})" if code is not None else ""
            raise PolicyLoadError(f"policy {spec!r}: {cls.__name__}.{hook}{signature}{site} cannot take the "
                                  f"arguments the controller passes; define {wanted}") from None
