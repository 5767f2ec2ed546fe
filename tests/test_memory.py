"""ddvae_fast/_memory.py: large CPU outputs come from a cache of mappings and
behave as torch.empty's; a mapping is reused only once no tensor uses it."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import ddvae_fast as ddf
from ddvae_fast import _memory
from ddvae_fast._memory import (
    HUGE_PAGE_BYTES,
    MIN_CACHED_BYTES,
    cached_cpu_bytes,
    empty_cpu,
    empty_cpu_cache,
)
from ddvae_fast.loss.reference import relaxed_argmax_rows

pytestmark = pytest.mark.skipif(not _memory._PRIVATE_ANONYMOUS, reason="no anonymous mmap")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _empty_cache():
    empty_cpu_cache()
    yield
    gc.collect()
    empty_cpu_cache()


def _rows_for(dtype, columns, nbytes=MIN_CACHED_BYTES):
    """Rows so that (rows, columns) of dtype just reaches nbytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return -(-nbytes // (columns * itemsize))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_is_a_plain_aligned_writable_tensor(dtype):
    shape = (_rows_for(dtype, 1000), 1000)
    t = empty_cpu(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
    assert t.is_contiguous() and t.storage_offset() == 0 and t._base is None
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0  # aligned for huge pages
    t.copy_(torch.arange(t.numel()).reshape(shape).to(dtype))
    assert torch.equal(t, torch.arange(t.numel()).reshape(shape).to(dtype))
    clone = t.clone()
    t.add_(1)  # in-place ops work on it
    assert torch.equal(t, clone + 1)


def test_small_and_empty_are_torch_empty():
    for shape in [(0,), (3, 4), (MIN_CACHED_BYTES // 4 - 1,)]:
        t = empty_cpu(shape, torch.float32)
        assert t.shape == shape and t.is_contiguous() and t._base is None
        del t
        assert cached_cpu_bytes() == 0


def _mapping_sizes() -> list[int]:
    with open("/proc/self/maps") as f:
        return [int(b, 16) - int(a, 16) for a, b in (line.split()[0].split("-") for line in f)]


def test_mapping_is_cached_when_the_last_reference_dies_on_another_thread_then_reused():
    nbytes = 37 * HUGE_PAGE_BYTES + 3 * 4096  # a mapped size no other mapping here has
    size = 39 * HUGE_PAGE_BYTES
    t = empty_cpu((nbytes // 4,), torch.float32)
    ptr = t.data_ptr()
    assert _mapping_sizes().count(size) == 1 and cached_cpu_bytes() == 0
    holder = [t]
    del t
    thread = threading.Thread(target=holder.clear)  # the last reference dies there
    thread.start()
    thread.join()
    assert cached_cpu_bytes() == size and _mapping_sizes().count(size) == 1
    again = empty_cpu((nbytes // 8,), torch.float64)  # same mapped size: reused
    assert again.data_ptr() == ptr and cached_cpu_bytes() == 0
    del again
    empty_cpu_cache()
    gc.collect()
    assert cached_cpu_bytes() == 0 and _mapping_sizes().count(size) == 0


def test_live_tensors_never_share_memory():
    shape = (MIN_CACHED_BYTES // 4,)
    a, b = empty_cpu(shape, torch.float32), empty_cpu(shape, torch.float32)
    assert a.data_ptr() != b.data_ptr()
    a.fill_(1.0)
    b.fill_(2.0)
    ptr_a = a.data_ptr()
    del a
    c = empty_cpu(shape, torch.float32)
    assert c.data_ptr() == ptr_a  # a's mapping, not b's
    c.fill_(3.0)
    assert bool((b == 2.0).all())
    d = empty_cpu(shape, torch.float32)  # nothing idle: a new mapping
    assert d.data_ptr() not in (b.data_ptr(), c.data_ptr())


def test_idle_bytes_stay_within_the_limit_oldest_dropped_first(monkeypatch):
    size = 2 * HUGE_PAGE_BYTES  # the mapped size of an output of MIN_CACHED_BYTES
    monkeypatch.setattr(_memory._CACHE, "limit", 2 * size)
    shape = (MIN_CACHED_BYTES // 4,)
    tensors = [empty_cpu(shape, torch.float32) for _ in range(3)]
    ptrs = [t.data_ptr() for t in tensors]
    for _ in range(3):
        del tensors[0]  # returned in order 0, 1, 2: the first one is dropped
    assert cached_cpu_bytes() == 2 * size
    reused = empty_cpu(shape, torch.float32)
    assert reused.data_ptr() == ptrs[2]  # the most recently returned
    assert cached_cpu_bytes() == size
    # A mapping larger than the whole limit is never kept.
    big = empty_cpu((3 * size // 4,), torch.float32)
    del big
    assert cached_cpu_bytes() <= 2 * size


def test_threads_allocating_and_freeing_never_see_each_others_writes():
    shape = (MIN_CACHED_BYTES // 4 + 1,)
    errors = []

    def worker(value: float):
        for _ in range(50):
            t = empty_cpu(shape, torch.float32)
            t.fill_(value)
            if not bool((t == value).all()):
                errors.append(value)
            del t

    threads = [threading.Thread(target=worker, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cached_cpu_bytes() <= _memory.CACHE_LIMIT_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_loss_gradient_from_the_cache_equals_reference(dtype):
    # The gradient is at least MIN_CACHED_BYTES, so the cpp backend returns a
    # cached mapping, and the second call reuses the first's once autograd has
    # accumulated it; the result must equal the reference's (accumulated into
    # .grad across three backwards).
    num_classes = 4099
    rows = _rows_for(dtype, num_classes)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, num_classes, generator=gen) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    for _ in range(3):
        ddf.relaxed_argmax_loss(logits, target, 0.1, backend="cpp").backward()
    assert cached_cpu_bytes() > 0  # the later gradients went back to the cache
    fast = logits.grad.clone()
    logits.grad = None
    for _ in range(3):
        relaxed_argmax_rows(logits.float(), target, 0.1).mean().backward()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # the dtype's rounding of 3 grads
    torch.testing.assert_close(fast.float(), logits.grad.float(), atol=tol / rows, rtol=tol)


def test_empty_cpu_cache_is_public():
    t = empty_cpu((MIN_CACHED_BYTES // 4,), torch.float32)
    del t
    assert cached_cpu_bytes() > 0
    ddf.empty_cpu_cache()
    assert cached_cpu_bytes() == 0
