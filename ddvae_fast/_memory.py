"""Large CPU outputs backed by transparent huge pages.

The cpp loss returns a fresh (N, V) gradient on every call, and autograd owns
it afterwards, so it cannot come from a reused buffer. glibc serves every
allocation of 32 MiB or more with a fresh ``mmap`` and returns it with
``munmap``, so each call faults in the whole gradient 4 KiB at a time; on
the 2-core VM that first touch cost more than the kernel's own work
("bandwidth" in benchmarks/results/cpu_loss_in_loop.json). Mapped with
``MADV_HUGEPAGE``, the same memory faults in 2 MiB at a time. Smaller outputs keep ``torch.empty``:
below 32 MiB glibc may hand back memory that is already mapped.

Where huge pages are unavailable (not Linux, THP disabled, ``madvise``
refused) the mapping is still an ordinary private anonymous one: correct,
with ``torch.empty``'s cost.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

__all__ = ["MIN_HUGE_PAGE_BYTES", "empty_cpu"]

HUGE_PAGE_BYTES = 2 * 2**20
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MIN_HUGE_PAGE_BYTES = 32 * 2**20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; huge-page backed when it is large.

    The result owns its memory like any tensor (the mapping lives as long as
    the tensor's storage) and is not a view; its storage cannot be resized.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes < MIN_HUGE_PAGE_BYTES or _MADV_HUGEPAGE is None or not _PRIVATE_ANONYMOUS:
        return torch.empty(shape, dtype=dtype)
    # Python's default for an anonymous map is MAP_SHARED (shmem), which
    # MADV_HUGEPAGE does not cover: ask for a private one.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=_PRIVATE_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP compiled out or refused: still correct
        region.madvise(_MADV_HUGEPAGE)
    start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE_BYTES
    flat = torch.frombuffer(region, dtype=dtype, count=math.prod(shape), offset=start)
    # A fresh tensor on the same storage, not a view of ``flat``: op outputs
    # must not be views, and autograd treats a view's base specially.
    return torch.empty((0,), dtype=dtype).set_(flat.untyped_storage(), 0, shape)
