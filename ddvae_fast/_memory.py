"""Large CPU outputs from a cache of already-touched mappings.

The cpp loss returns a fresh (N, V) gradient on every call, and autograd owns
it afterwards, so it cannot be a buffer the loss keeps. With ``torch.empty``
each call's gradient is memory the kernel has never touched: glibc maps it
anew (from 32 MiB) or hands back memory it trimmed, and the first write to
every 4 KiB page faults and zeroes it. At (16384, 1024) fp32 on the 2-core
VM the kernel took 25.4 ms into a fresh ``torch.empty`` gradient and 6.9 ms
into a reused one; at (2048, 32000) 102.8 and 24.9 ms ("bandwidth" in
benchmarks/results/cpu_loss_in_loop.json).

So outputs of at least ``MIN_CACHED_BYTES`` are private anonymous mappings
whose tensor, when its storage dies, hands the mapping back to a process-wide
cache instead of unmapping it; the next output of the same mapped size reuses
it, already faulted in. The cache keeps at most ``CACHE_LIMIT_BYTES`` of idle
mappings (least recently returned dropped first); ``empty_cpu_cache()``
unmaps them all. A mapping is in the cache only while no tensor uses it, so
no two live tensors share memory. Mappings of ``MIN_HUGE_PAGE_BYTES`` or more
are also advised ``MADV_HUGEPAGE`` (faulted in 2 MiB at a time, fewer TLB
misses); where that is refused they are ordinary mappings, still correct.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import threading

import torch

__all__ = [
    "CACHE_LIMIT_BYTES",
    "MIN_CACHED_BYTES",
    "MIN_HUGE_PAGE_BYTES",
    "cached_cpu_bytes",
    "empty_cpu",
    "empty_cpu_cache",
]

HUGE_PAGE_BYTES = 2 * 2**20
# Below this glibc's heap reuses freed blocks by itself.
MIN_CACHED_BYTES = 2**20
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MIN_HUGE_PAGE_BYTES = 32 * 2**20
CACHE_LIMIT_BYTES = 2**30
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


class _MappingCache:
    """Idle mappings by size, oldest first. An RLock: a lease's __del__ may run
    (garbage collection) on a thread that is inside take() or give()."""

    def __init__(self, limit: int):
        self.limit = limit
        self._idle: list[mmap.mmap] = []
        self._idle_bytes = 0
        self._lock = threading.RLock()

    def take(self, size: int) -> mmap.mmap | None:
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):  # the most recently returned first
                if len(self._idle[i]) == size:
                    self._idle_bytes -= size
                    return self._idle.pop(i)
        return None

    def give(self, region: mmap.mmap) -> None:
        with self._lock:
            if len(region) > self.limit:
                return  # dropped: unmapped with its last reference
            self._idle.append(region)
            self._idle_bytes += len(region)
            while self._idle_bytes > self.limit:
                self._idle_bytes -= len(self._idle.pop(0))

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes


_CACHE = _MappingCache(CACHE_LIMIT_BYTES)
_LEASE_TYPES: dict[int, type] = {}
_LEASE_TYPES_LOCK = threading.Lock()


def _lease_type(size: int) -> type:
    """A ctypes byte array of ``size`` over a mapping: it exports the buffer
    torch.frombuffer keeps, and gives the mapping back when that reference dies."""
    with _LEASE_TYPES_LOCK:
        lease = _LEASE_TYPES.get(size)
        if lease is None:

            def __del__(self):
                _CACHE.give(self.region)

            lease = type(f"_Lease{size}", (ctypes.c_char * size,), {"__del__": __del__})
            _LEASE_TYPES[size] = lease
        return lease


def empty_cpu_cache() -> None:
    """Unmap the idle mappings that ``empty_cpu`` keeps for reuse (outputs still
    alive are not affected; their mappings are cached again when they die)."""
    _CACHE.clear()


def cached_cpu_bytes() -> int:
    """Bytes of idle mappings held for reuse (at most ``CACHE_LIMIT_BYTES``)."""
    return _CACHE.idle_bytes()


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; from the mapping cache when large.

    The result owns its memory like any tensor (the mapping is leased for as
    long as the tensor's storage lives) and is not a view; its storage cannot
    be resized.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    nbytes = numel * itemsize
    if nbytes < MIN_CACHED_BYTES or not _PRIVATE_ANONYMOUS:
        return torch.empty(shape, dtype=dtype)
    # Whole huge pages plus one for alignment: equal sizes meet in the cache.
    size = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES
    region = _CACHE.take(size)
    if region is None:
        # Python's default for an anonymous map is MAP_SHARED (shmem), which
        # MADV_HUGEPAGE does not cover: ask for a private one.
        region = mmap.mmap(-1, size, flags=_PRIVATE_ANONYMOUS)
        if nbytes >= MIN_HUGE_PAGE_BYTES and _MADV_HUGEPAGE is not None:
            with contextlib.suppress(OSError):  # THP compiled out or refused: still correct
                region.madvise(_MADV_HUGEPAGE)
    lease = _lease_type(size).from_buffer(region)
    lease.region = region
    start = -ctypes.addressof(lease) % HUGE_PAGE_BYTES
    flat = torch.frombuffer(lease, dtype=dtype, count=numel, offset=start)
    # A fresh tensor on the same storage, not a view of ``flat``: op outputs
    # must not be views, and autograd treats a view's base specially.
    return torch.empty((0,), dtype=dtype).set_(flat.untyped_storage(), 0, shape)
