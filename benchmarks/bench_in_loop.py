"""The CPU relaxed arg-max loss inside a training loop, against the bandwidth limit.

Run:  python benchmarks/bench_in_loop.py [--rounds R] [--shapes 65536x64,2048x32000]
      (writes benchmarks/results/cpu_loss_in_loop.json; --out to change)

In a training loop the loss runs right after other PyTorch work, whose thread
pool and caches it shares. Each timed call here follows a realistic torch step
(an eager GRU forward + backward of a small model), and the backends are
interleaved round by round, so a loaded machine slows all of them alike:
  eager     reference relaxed_argmax_rows(...).mean() in plain PyTorch, autograd backward
  compiled  torch.compile(dynamic=False) of that same function
  cpp       ddf.relaxed_argmax_loss(..., backend='cpp'), forward + backward
The cpp loss is also timed alone (back to back) and after a torch.compile'd
GRU step, to show how much the preceding torch work costs it.

Bandwidth: logits read once + gradient written once (2 N V 4 bytes) at the
measured copy bandwidth of this machine (torch copy_ between two preallocated
buffers of the logits' size, same thread count, which moves the same bytes).
For the large shapes the cpp kernel alone (no autograd) is timed writing its
gradient where the loss puts it (``empty_cpu``: a mapping from the cache of
ddvae_fast/_memory.py, already touched by an earlier call), into a fresh
mapping (the cache emptied first: huge-page backed from 32 MiB), into a fresh
``torch.empty`` and into a reused buffer: the differences are the cost of
first-touching fresh pages.

All figures are medians over the rounds; the machine is shared with other
engineers' jobs (see load_average in the JSON), so compare ratios, not times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

import ddvae_fast as ddf
from ddvae_fast._memory import empty_cpu_cache
from ddvae_fast.backends import cpp_module
from ddvae_fast.loss.cpp import _DTYPE_CODES
from ddvae_fast.loss.cpp import forward as cpp_forward
from ddvae_fast.loss.reference import relaxed_argmax_rows

TAU = 0.1
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu_loss_in_loop.json")


class TorchStep:
    """An eager GRU forward + backward of a small model: the work before each timed call."""

    def __init__(self, compiled: bool = False):
        gen = torch.Generator().manual_seed(0)
        self.gru = torch.nn.GRU(64, 256, batch_first=True)
        self.head = torch.nn.Linear(256, 64)
        self.x = torch.randn(32, 40, 64, generator=gen)
        self.fn = torch.compile(self._loss, dynamic=False) if compiled else self._loss

    def _loss(self, x):
        out, _ = self.gru(x)
        return self.head(out).pow(2).mean()

    def __call__(self):
        self.fn(self.x).backward()
        for p in list(self.gru.parameters()) + list(self.head.parameters()):
            p.grad = None


def reference_loss(logits, target):
    return relaxed_argmax_rows(logits, target, TAU).float().mean()


def make_losses():
    compiled = torch.compile(reference_loss, dynamic=False)
    return {
        "eager": reference_loss,
        "compiled": compiled,
        "cpp": lambda x, t: ddf.relaxed_argmax_loss(x, t, TAU, backend="cpp"),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loss_step(loss_fn, logits, target):
    loss_fn(logits, target).backward()
    logits.grad = None


def kernel_call(logits, target, grad=None):
    """The cpp kernel alone: into a gradient allocated as the loss does (grad None)
    or into `grad`."""
    if grad is None:
        return cpp_forward(
            logits, target, TAU, False, -100, 1.0, 0.0, torch.tensor(1.0), True, False
        )
    num_rows, num_classes = logits.shape
    rows = torch.empty(num_rows)
    nll = torch.empty(num_rows)
    correct = torch.empty(num_rows, dtype=torch.bool)
    scale = torch.tensor(1.0)
    cpp_module("relaxed_argmax").forward(
        logits.data_ptr(), target.data_ptr(), scale.data_ptr(), rows.data_ptr(),
        nll.data_ptr(), correct.data_ptr(), grad.data_ptr(), num_rows, num_classes,
        logits.stride(0), _DTYPE_CODES[logits.dtype], TAU, False, -100, 1.0, 0.0, True, False,
        torch.get_num_threads(), "auto",
    )  # fmt: skip
    return rows, nll, correct, grad


def median_ms(samples):
    return round(statistics.median(samples) * 1e3, 3)


def bench_shape(num_rows, num_classes, rounds, losses, torch_step, compiled_step):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(num_rows, num_classes, generator=gen) * 3.0).requires_grad_(True)
    target = torch.randint(0, num_classes, (num_rows,), generator=gen)
    for fn in losses.values():  # compile / warm up outside the timed rounds
        loss_step(fn, logits, target)
    samples = {f"{name}_after_eager_step": [] for name in losses}
    samples.update(cpp_alone=[], cpp_after_compiled_step=[])
    names = list(losses)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch_step()
            samples[f"{name}_after_eager_step"].append(
                timed(lambda fn=losses[name]: loss_step(fn, logits, target))
            )
        samples["cpp_alone"].append(timed(lambda: loss_step(losses["cpp"], logits, target)))
        compiled_step()
        samples["cpp_after_compiled_step"].append(
            timed(lambda: loss_step(losses["cpp"], logits, target))
        )
    result = {key: median_ms(v) for key, v in samples.items()}
    cpp = result["cpp_after_eager_step"]
    result["speedup_vs_eager"] = round(result["eager_after_eager_step"] / cpp, 2)
    result["speedup_vs_compiled"] = round(result["compiled_after_eager_step"] / cpp, 2)
    return result, logits.detach(), target


def bench_bandwidth(logits, target, rounds):
    """Copy bandwidth and the first-touch cost of the cpp kernel's fresh gradient."""
    src = logits.clone()
    dst = torch.empty_like(src)
    reused = torch.empty_like(src)
    kernel_call(logits, target, reused)  # touch the reused buffer once
    samples = {
        "copy": [],
        "kernel_loss_grad": [],
        "kernel_fresh_mapping_grad": [],
        "kernel_torch_empty_grad": [],
        "kernel_reused_grad": [],
    }

    def fresh_mapping():
        empty_cpu_cache()
        return kernel_call(logits, target)

    for _ in range(rounds):
        samples["copy"].append(timed(lambda: dst.copy_(src)))
        samples["kernel_loss_grad"].append(timed(lambda: kernel_call(logits, target)))
        samples["kernel_fresh_mapping_grad"].append(timed(fresh_mapping))
        samples["kernel_torch_empty_grad"].append(
            timed(lambda: kernel_call(logits, target, torch.empty_like(logits)))
        )
        samples["kernel_reused_grad"].append(timed(lambda: kernel_call(logits, target, reused)))
    nbytes = 2 * logits.numel() * logits.element_size()
    copy_s = statistics.median(samples["copy"])
    out = {key + "_ms": median_ms(v) for key, v in samples.items()}
    out["bytes_moved"] = nbytes
    out["copy_GBps"] = round(nbytes / copy_s / 1e9, 2)
    out["bandwidth_limit_ms"] = round(copy_s * 1e3, 3)  # the same bytes at the copy bandwidth
    for key in ("loss", "fresh_mapping", "torch_empty", "reused"):
        out[f"{key}_over_limit"] = round(
            out[f"kernel_{key}_grad_ms"] / out["bandwidth_limit_ms"], 2
        )
    return out


def machine_info():
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "isas": list(cpp_module("relaxed_argmax").supported_isas()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="65536x64,16384x1024,2048x32000")
    parser.add_argument("--rounds", type=int, default=0, help="0: by size (15 to 40)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch_step, compiled_step = TorchStep(), TorchStep(compiled=True)
    for _ in range(3):
        torch_step()
        compiled_step()
    losses = make_losses()
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": args.threads,
        "dtype": "float32",
        "tau": TAU,
        "load_average_start": os.getloadavg(),
        "shapes": {},
    }
    for spec in args.shapes.split(","):
        num_rows, num_classes = (int(x) for x in spec.split("x"))
        rounds = args.rounds or max(15, min(40, int(4e8 // (num_rows * num_classes))))
        result, logits, target = bench_shape(
            num_rows, num_classes, rounds, losses, torch_step, compiled_step
        )
        result["rounds"] = rounds
        if num_classes >= 1024:
            result["bandwidth"] = bench_bandwidth(logits, target, rounds)
        record["shapes"][spec] = result
        print(spec, json.dumps(result), flush=True)
    record["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
