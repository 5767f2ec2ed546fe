"""Forward + backward of the relaxed arg-max loss, per backend.

Run:  pytest benchmarks/bench_relaxed_argmax.py --benchmark-only
      (add --benchmark-json=out.json to keep the numbers; -k cpu or -k cuda to filter)

Backends (tau = 0.1, mean over the rows, all targets valid):
  eager     reference_relaxed_argmax_rows(...).mean() in plain PyTorch, autograd backward
  compiled  torch.compile(dynamic=False) of that same function
  cpp       ddf.relaxed_argmax_loss(..., backend='cpp'): the fused CPU kernel (public API)
  cpp_kernel  the 'cpp' backend's relaxed_argmax_forward alone (no custom op / autograd
            layer): the kernel's own cost, loss rows and gradient in one call
  triton    ddf.relaxed_argmax_loss(..., backend='triton'), only when CUDA is available

CPU rows run with torch.set_num_threads(2), float32, (N, V) in {(65536, 32),
(65536, 64), (16384, 1024), (2048, 32000)} in logit mode and two shapes in prob
mode. GPU rows (when CUDA exists) add (65536, 32000) in bfloat16.

extra_info of each benchmark:
  logits_bytes, bytes_moved     logits read once + gradient written once (2 N V bytes/elem)
  achieved_GBps                 bytes_moved / mean time (achieved_GBps_best: / min time;
                                the min is the robust figure on a shared machine)
  peak_extra_bytes              peak memory of one forward+backward above what was live
                                before it (the logits, the targets), x.grad included
  peak_extra_over_logits        peak_extra_bytes / logits_bytes
CPU memory is measured in a fresh subprocess (this file run as a script) with
glibc's mmap threshold pinned to 64 KiB (MALLOC_MMAP_THRESHOLD_), so every
block >= 64 KiB is its own mapping, returned to the OS when freed: the resident
set then tracks live memory, and the kernel's high-water mark VmHWM, reset via
/proc/self/clear_refs right before the measured step, is the step's true peak.
GPU memory is torch.cuda.max_memory_allocated over the step.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import ddvae_fast as ddf
from ddvae_fast.loss.reference import relaxed_argmax_rows as reference_relaxed_argmax_rows

TAU = 0.1
NUM_THREADS = 2
CPU_LOGIT_SHAPES = [(65536, 32), (65536, 64), (16384, 1024), (2048, 32000)]
PROB_SHAPES = [(65536, 64), (16384, 1024)]
GPU_BF16_SHAPES = [(65536, 32000)]

if hasattr(torch._dynamo.config, "recompile_limit"):
    # one compiled graph per shape and score: stay under the recompile limit
    torch._dynamo.config.recompile_limit = 64


def _cases():
    cases = []
    for backend in ("eager", "compiled", "cpp", "cpp_kernel"):
        cases += [("cpu", backend, "logit", n, v, torch.float32) for n, v in CPU_LOGIT_SHAPES]
        cases += [("cpu", backend, "prob", n, v, torch.float32) for n, v in PROB_SHAPES]
    if torch.cuda.is_available():
        for backend in ("eager", "compiled", "triton"):
            cases += [("cuda", backend, "logit", n, v, torch.float32) for n, v in CPU_LOGIT_SHAPES]
            cases += [("cuda", backend, "prob", n, v, torch.float32) for n, v in PROB_SHAPES]
            cases += [("cuda", backend, "logit", n, v, torch.bfloat16) for n, v in GPU_BF16_SHAPES]
    return cases


def _case_id(case):
    device, backend, score, n, v, dtype = case
    return f"{device}-{backend}-{score}-{n}x{v}-{str(dtype).replace('torch.', '')}"


def reference_loss(logits, target, tau, score):
    return reference_relaxed_argmax_rows(logits, target, tau, score).float().mean()


def make_loss(backend: str, score: str):
    if backend == "eager":
        return lambda x, t: reference_loss(x, t, TAU, score)
    if backend == "compiled":
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda x, t: compiled(x, t, TAU, score)
    if backend in ("cpp", "triton"):
        return lambda x, t: ddf.relaxed_argmax_loss(x, t, TAU, score=score, backend=backend)
    if backend == "cpp_kernel":
        return KernelOnlyLoss(score)
    raise ValueError(backend)


class KernelOnlyLoss:
    """The cpp kernel called directly: loss and gradient from one call, no autograd."""

    def __init__(self, score):
        from ddvae_fast.loss.cpp import forward as relaxed_argmax_forward

        self.forward = relaxed_argmax_forward
        self.prob_mode = score == "prob"

    def __call__(self, logits, target):
        grad_scale = torch.tensor(1.0 / max(target.numel(), 1))
        rows, _, _, grad = self.forward(
            logits.detach(), target, TAU, self.prob_mode, -100, 1.0, 0.0, grad_scale, True, False
        )
        return _Precomputed(rows.sum() / max(target.numel(), 1), logits, grad)


class _Precomputed:
    """Quacks like a loss tensor: .backward() stores the precomputed gradient."""

    def __init__(self, value, logits, grad):
        self.value, self.logits, self.grad = value, logits, grad

    def backward(self):
        self.logits.grad = self.grad


def make_inputs(device, num_rows, num_classes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, num_classes, generator=gen) * 3.0).to(
        device=device, dtype=dtype
    )
    target = torch.randint(0, num_classes, (num_rows,), generator=gen).to(device)
    return logits.requires_grad_(True), target


def step(loss_fn, logits, target):
    loss_fn(logits, target).backward()
    logits.grad = None
    if logits.device.type == "cuda":
        torch.cuda.synchronize()


def _rounds(device, num_rows, num_classes):
    if device == "cuda":
        return 20
    # eager takes ~0.03-0.1 s per million elements on 2 threads: keep a case < ~20 s
    return max(3, min(10, int(6e7 // (num_rows * num_classes))))


# ------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_cpu_peak_in_this_process(backend, score, num_rows, num_classes, dtype) -> dict:
    torch.set_num_threads(NUM_THREADS)
    logits, target = make_inputs("cpu", num_rows, num_classes, dtype)
    loss_fn = make_loss(backend, score)
    step(loss_fn, logits, target)  # warm-up: compilation, lazy imports, thread pool
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current RSS
    loss_fn(logits, target).backward()  # keep logits.grad: it is part of the step's memory
    peak = _status_kib("VmHWM")
    return {
        "peak_extra_bytes": (peak - before) * 1024,
        "logits_bytes": logits.numel() * logits.element_size(),
    }


def cpu_peak_extra_bytes(backend, score, num_rows, num_classes, dtype) -> dict:
    """Run this file as a script in a fresh process and return its measurement."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(NUM_THREADS))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--peak-memory",
        backend,
        score,
        str(num_rows),
        str(num_classes),
        str(dtype).replace("torch.", ""),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_peak_extra_bytes(loss_fn, logits, target) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_fn(logits, target).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    logits.grad = None
    return {
        "peak_extra_bytes": peak - before,
        "logits_bytes": logits.numel() * logits.element_size(),
    }


# ------------------------------------------------------------------ benchmark


@pytest.fixture
def cpu_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_relaxed_argmax_forward_backward(benchmark, cpu_threads, case):
    device, backend, score, num_rows, num_classes, dtype = case
    logits, target = make_inputs(device, num_rows, num_classes, dtype)
    loss_fn = make_loss(backend, score)
    step(loss_fn, logits, target)  # compile / warm up outside the timed rounds

    benchmark.group = (
        f"{device} {score} {num_rows}x{num_classes} {str(dtype).replace('torch.', '')}"
    )
    benchmark.pedantic(
        step,
        args=(loss_fn, logits, target),
        rounds=_rounds(device, num_rows, num_classes),
        iterations=1,
        warmup_rounds=1,
    )

    if device == "cpu":
        memory = cpu_peak_extra_bytes(backend, score, num_rows, num_classes, dtype)
    else:
        memory = cuda_peak_extra_bytes(loss_fn, logits, target)
    bytes_moved = 2 * logits.numel() * logits.element_size()
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        backend=backend,
        threads=NUM_THREADS if device == "cpu" else None,
        logits_bytes=memory["logits_bytes"],
        bytes_moved=bytes_moved,
        achieved_GBps=bytes_moved / mean_s / 1e9,
        achieved_GBps_best=bytes_moved / benchmark.stats.stats.min / 1e9,
        peak_extra_bytes=memory["peak_extra_bytes"],
        peak_extra_over_logits=memory["peak_extra_bytes"] / memory["logits_bytes"],
    )


if __name__ == "__main__":
    # python bench_relaxed_argmax.py --peak-memory BACKEND SCORE N V DTYPE
    if len(sys.argv) != 7 or sys.argv[1] != "--peak-memory":
        raise SystemExit(__doc__)
    _, _, backend_arg, score_arg, n_arg, v_arg, dtype_arg = sys.argv
    result = _measure_cpu_peak_in_this_process(
        backend_arg, score_arg, int(n_arg), int(v_arg), getattr(torch, dtype_arg)
    )
    print(json.dumps(result))
