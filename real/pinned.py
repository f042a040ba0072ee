"""Page-locked host memory of exactly the size asked for.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds every
allocation up to a power of two: gpt-oss-20b's 38 GB of bf16 experts would lock 64 GB of host memory,
and allocations that large can fail outright. Here the tensor is allocated as ordinary memory and then
registered with the driver (``cudaHostRegister``), which locks exactly its pages. Registered arenas
are kept for the life of the process (they hold a model's experts; unregistering memory that is
still the source of an in-flight copy would be a bug that is hard to see), so allocate one per model.
Without CUDA, or if registration fails, it falls back to PyTorch's pinned allocator.
"""
from __future__ import annotations

import torch

_REGISTERED: dict[int, torch.Tensor] = {}     # data_ptr -> the registered tensor, kept alive


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    if not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype)
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:          # not registrable here: the caching allocator's pinned memory instead
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    _REGISTERED[t.data_ptr()] = t
    return t


def is_page_locked(t: torch.Tensor) -> bool:
    """True for memory from ``pinned_empty`` or PyTorch's pinned allocator (views included)."""
    if t.device.type != "cpu":
        return False
    if t.is_pinned():
        return True
    ptr = t.untyped_storage().data_ptr()
    return ptr in _REGISTERED
