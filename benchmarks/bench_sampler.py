"""Throughput of RejectionSampler.sample: samples per second, per kernel, backend and size.

    pytest benchmarks/bench_sampler.py --benchmark-json=bench_sampler.json
    python benchmarks/bench_sampler.py bench_sampler.json     # ratios per kernel

Compared at shapes (512, 64), (4096, 64), (65536, 64) (a DD-VAE batch of
latent codes is (batch, 64)):
- RejectionSampler(backend=...) for every proposal, backends 'cpp' and
  'reference' (and 'triton' when CUDA is available; the interpreter is not a
  speed path), one sampler per case so the persistent buffer is in play;
- method='transform' where a closed form exists;
- torch.rand of the same shape: the floor (one uniform per draw, no test);
- the authors' approach: NumPy rejection on the host with a NumPy buffer of
  surplus draws and a torch.from_numpy(...).to(device) copy per batch.

torch.set_num_threads(2): the cpp backend follows torch's thread count.
extra_info holds samples_per_s (= draws / mean time).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from ddvae_fast.distributions.smoothing import PROPOSALS, SMOOTHING_KERNELS
from ddvae_fast.sampling.sampler import TRANSFORM_KERNELS, RejectionSampler

torch.set_num_threads(2)

SHAPES = [(512, 64), (4096, 64), (65536, 64)]
BACKENDS = ["cpp", "reference"] + (["triton"] if torch.cuda.is_available() else [])


def _device(backend):
    return "cuda" if backend == "triton" else "cpu"


def _rounds(shape, slow=False):
    n = math.prod(shape)
    if n >= 1 << 22:
        return 5 if slow else 20
    return 30 if slow else 200


def _run(benchmark, fn, shape, device, slow=False):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = fn(shape)
        sync()
        return out

    for _ in range(2):  # warm-up: first allocations, buffer growth, kernel compilation
        call()
    result = benchmark.pedantic(call, rounds=_rounds(shape, slow), iterations=1, warmup_rounds=1)
    assert tuple(result.shape) == tuple(shape)
    benchmark.extra_info["samples_per_s"] = math.prod(shape) / benchmark.stats.stats.mean
    benchmark.extra_info["shape"] = list(shape)
    return result


class NumpyHostSampler:
    """The authors' approach: NumPy draws and rejection on the host, a NumPy buffer of
    surplus accepted draws, and a host-to-device copy of every batch."""

    def __init__(self, name, device="cpu", seed=0):
        self.kernel = SMOOTHING_KERNELS[name]
        self.device = device
        self.rng = np.random.RandomState(seed)
        self.buffer = np.empty(0)

    def sample(self, shape):
        n = math.prod(shape)
        while self.buffer.size < n:
            m = math.ceil((n - self.buffer.size) * 2 * self.kernel.k0)
            u = self.rng.uniform(-1, 1, size=m)
            v = self.rng.uniform(0, self.kernel.k0, size=m)
            if self.kernel.bounded:
                keep = self.kernel.pdf(torch.from_numpy(u)).numpy() > v
                u = u[keep]
            else:
                u = self.rng.standard_normal(m)
            self.buffer = np.concatenate([self.buffer, u])
        batch, self.buffer = self.buffer[:n], self.buffer[n:]
        return torch.from_numpy(batch.reshape(shape)).float().to(self.device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_rand_floor(benchmark, shape):
    benchmark.group = f"sampler {shape}"
    _run(benchmark, lambda s: torch.rand(s), shape, "cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", PROPOSALS)
def test_numpy_host_baseline(benchmark, name, shape):
    benchmark.group = f"sampler {shape}"
    sampler = NumpyHostSampler(name)
    _run(benchmark, sampler.sample, shape, "cpu", slow=True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PROPOSALS)
def test_rejection_sampler(benchmark, name, backend, shape):
    benchmark.group = f"sampler {shape}"
    sampler = RejectionSampler(name, seed=0, backend=backend, device=_device(backend))
    x = _run(benchmark, sampler.sample, shape, _device(backend), slow=backend == "reference")
    assert x.abs().max() <= 1 or not SMOOTHING_KERNELS[name].bounded
    # Candidates per draw over the whole run (the warm-up calls included): ~2 K(0).
    benchmark.extra_info["candidates_drawn"] = sampler.candidates_drawn


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRANSFORM_KERNELS)
def test_transform_sampler(benchmark, name, backend, shape):
    benchmark.group = f"sampler {shape}"
    sampler = RejectionSampler(
        name, seed=0, backend=backend, device=_device(backend), method="transform"
    )
    _run(benchmark, sampler.sample, shape, _device(backend), slow=backend == "reference")


def report(path):
    """Per kernel and shape: time / torch.rand time and NumPy-host time / time.

    Ratios of medians and of minima: on a shared machine the minimum is the
    run least disturbed by other processes, the median the typical one.
    """
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    stat = {b["name"]: (b["stats"]["median"], b["stats"]["min"]) for b in benches}
    for shape in SHAPES:
        sid = "x".join(map(str, shape))
        floor = stat.get(f"test_torch_rand_floor[{sid}]")
        if floor is None:
            continue
        print(
            f"\n{sid}: torch.rand median {floor[0] * 1e3:.3f} ms, min {floor[1] * 1e3:.3f} ms"
            "   (ratios: median / min)"
        )
        for name in PROPOSALS:
            numpy_t = stat.get(f"test_numpy_host_baseline[{name}-{sid}]")
            for backend in BACKENDS:
                for kind in ("rejection", "transform"):
                    t = stat.get(f"test_{kind}_sampler[{name}-{backend}-{sid}]")
                    if t is None:
                        continue
                    line = (
                        f"  {name:13s} {backend:9s} {kind:9s} {t[0] * 1e3:9.3f} ms"
                        f"  {t[0] / math.prod(shape) * 1e9:6.2f} ns/draw"
                        f"  time/rand {t[0] / floor[0]:5.2f} / {t[1] / floor[1]:5.2f}"
                    )
                    if numpy_t is not None:
                        line += f"  numpy/time {numpy_t[0] / t[0]:6.1f} / {numpy_t[1] / t[1]:6.1f}"
                    print(line)


if __name__ == "__main__":
    report(sys.argv[1])
