"""Throughput of RejectionSampler.sample: samples per second, per kernel, backend and size.

    pytest benchmarks/bench_sampler.py --benchmark-json=bench_sampler.json
    python benchmarks/bench_sampler.py bench_sampler.json     # ratios per kernel
    python benchmarks/bench_sampler.py rsample --out benchmarks/results/cpu_sampler_rsample.json

The ``rsample`` mode times rsample(mu, sigma) against sample() of the same
size, interleaved in one run (one round times every case once, in turn; the
medians over rounds are compared), for every backend that runs here: rsample
with mu and sigma requiring gradients (the graph is built, eps is kept), and
rsample plus its backward. ``unfused`` is the rsample before the fused draw
(commit 2883c95), rebuilt here from sample(): sigma checked in its own pass,
eps drawn, then addcmul (issue 13's target: rsample <= 1.3x sample).

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

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import pytest
import torch

from ddvae_fast.distributions.smoothing import PROPOSALS, SMOOTHING_KERNELS
from ddvae_fast.sampling.sampler import TRANSFORM_KERNELS, RejectionSampler, _positive_finite

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


def _unfused_rsample(sampler, mu, sigma):
    """rsample before the fused draw (commit 2883c95): sigma checked in its own
    pass, eps drawn and stored, then z = addcmul(mu, sigma, eps) with
    addcmul's own backward."""
    if not _positive_finite(sigma.detach()):
        raise ValueError("sigma must be finite and > 0 everywhere")
    eps = sampler.sample(torch.broadcast_shapes(mu.shape, sigma.shape))
    return torch.addcmul(mu, sigma, eps.to(mu.dtype))


def _rsample_cases(backend, shape, proposal):
    """(cases, sync) for one backend: name -> a call to time."""
    device = _device(backend)
    sampler = RejectionSampler(proposal, seed=0, backend=backend, device=device)
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=gen).to(device).requires_grad_()
    sigma = (torch.rand(shape, generator=gen) + 0.1).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)

    def rsample_backward():
        sampler.rsample(mu, sigma).backward(grad)

    def unfused_backward():
        _unfused_rsample(sampler, mu, sigma).backward(grad)

    cases = {
        "sample": lambda: sampler.sample(shape),
        "rsample": lambda: sampler.rsample(mu, sigma),
        "rsample+backward": rsample_backward,
        "unfused rsample": lambda: _unfused_rsample(sampler, mu, sigma),
        "unfused rsample+backward": unfused_backward,
    }
    return cases, torch.cuda.synchronize if device == "cuda" else (lambda: None)


def bench_rsample(shape, backends, proposal, rounds, threads):
    """Interleaved medians (ms) of sample, rsample, rsample + backward and ``unfused``."""
    torch.set_num_threads(threads)
    rows = []
    for backend in backends:
        cases, sync = _rsample_cases(backend, shape, proposal)
        times = {k: [] for k in cases}
        for fn in cases.values():  # warm-up: buffer growth, allocations, compilation
            fn()
            fn()
        sync()
        for _ in range(rounds):
            for name, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = {"backend": backend, "device": _device(backend), "median_ms": med}
        row["ratio_to_sample"] = {k: v / med["sample"] for k, v in med.items() if k != "sample"}
        rows.append(row)
        print(
            f"{backend:9s} {shape}: "
            + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items())
            + "  |  "
            + "  ".join(f"{k}/sample {v:.2f}" for k, v in row["ratio_to_sample"].items())
        )
    return rows


def main(argv):
    if len(argv) == 1 and argv[0].endswith(".json"):
        return report(argv[0])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rep = sub.add_parser("report", help="ratio table of a pytest-benchmark JSON file")
    rep.add_argument("path")
    rs = sub.add_parser("rsample", help="rsample vs sample, interleaved medians")
    rs.add_argument("--shapes", default="65536x64,4096x64")
    rs.add_argument("--proposal", default="triweight")
    rs.add_argument("--rounds", type=int, default=31)
    rs.add_argument("--threads", type=int, default=2)
    rs.add_argument("--backends", default=",".join(BACKENDS))
    rs.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.mode == "report":
        return report(args.path)
    results = []
    for text in args.shapes.split(","):
        shape = tuple(int(d) for d in text.split("x"))
        rows = bench_rsample(
            shape, args.backends.split(","), args.proposal, args.rounds, args.threads
        )
        results.append({"shape": list(shape), "rows": rows})
    if args.out:
        record = {
            "command": "python benchmarks/bench_sampler.py " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "load_average_1_5_15": list(os.getloadavg()),
                "torch": torch.__version__,
                "torch_threads": args.threads,
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            },
            "note": (
                "interleaved medians of one run; the 2-core machine is shared with other "
                "engineers' jobs, so absolute times vary between runs, ratios less"
            ),
            "proposal": args.proposal,
            "rounds": args.rounds,
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
