"""ddvae_fast/_memory.py: large CPU outputs on huge pages behave as torch.empty's."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import ddvae_fast as ddf
from ddvae_fast._memory import HUGE_PAGE_BYTES, MIN_HUGE_PAGE_BYTES, empty_cpu
from ddvae_fast.loss.reference import relaxed_argmax_rows

pytestmark = pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no THP")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _rows_for(dtype, columns):
    """Rows so that (rows, columns) of dtype just reaches the huge-page size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return -(-MIN_HUGE_PAGE_BYTES // (columns * itemsize))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_is_a_plain_aligned_writable_tensor(dtype):
    shape = (_rows_for(dtype, 1000), 1000)
    t = empty_cpu(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
    assert t.is_contiguous() and t.storage_offset() == 0 and t._base is None
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0  # the mapping is aligned for huge pages
    t.copy_(torch.arange(t.numel()).reshape(shape).to(dtype))
    assert torch.equal(t, torch.arange(t.numel()).reshape(shape).to(dtype))
    clone = t.clone()
    t.add_(1)  # in-place ops work on it
    assert torch.equal(t, clone + 1)


def test_small_and_empty_are_torch_empty():
    for shape in [(0,), (3, 4), (MIN_HUGE_PAGE_BYTES // 4 - 1,)]:
        t = empty_cpu(shape, torch.float32)
        assert t.shape == shape and t.is_contiguous() and t._base is None


def _mapping_sizes() -> list[int]:
    with open("/proc/self/maps") as f:
        return [int(b, 16) - int(a, 16) for a, b in (line.split()[0].split("-") for line in f)]


def test_memory_is_unmapped_with_the_last_reference_even_on_another_thread():
    nbytes = MIN_HUGE_PAGE_BYTES + 3 * 4096  # a size no other mapping here has
    size = nbytes + HUGE_PAGE_BYTES
    t = empty_cpu((nbytes // 4,), torch.float32)
    assert _mapping_sizes().count(size) == 1
    holder = [t]
    del t
    thread = threading.Thread(target=holder.clear)  # the last reference dies there
    thread.start()
    thread.join()
    gc.collect()
    assert _mapping_sizes().count(size) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_loss_gradient_on_huge_pages_equals_reference(dtype):
    # The gradient is at least MIN_HUGE_PAGE_BYTES, so the cpp backend returns a
    # huge-page gradient; it must equal the reference's, and autograd must treat
    # it as any other gradient (accumulated into .grad across two backwards).
    num_classes = 4099
    rows = _rows_for(dtype, num_classes)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, num_classes, generator=gen) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    for _ in range(2):
        ddf.relaxed_argmax_loss(logits, target, 0.1, backend="cpp").backward()
    fast = logits.grad.clone()
    logits.grad = None
    for _ in range(2):
        relaxed_argmax_rows(logits.float(), target, 0.1).mean().backward()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # the dtype's rounding of 2 grads
    torch.testing.assert_close(fast.float(), logits.grad.float(), atol=tol / rows, rtol=tol)
