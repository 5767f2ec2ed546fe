"""The output projection fused with the relaxed arg-max loss, forward + backward, on CPU.

Run:  python benchmarks/bench_linear_loss.py [--shapes N,H,V ...] [--rounds R] [--out FILE]
      (default: the issue's (8192, 512, 32000) and a smaller (2048, 512, 32000);
      writes benchmarks/results/cpu_linear_loss.json)

Paths (fp32, logit mode, tau = 0.1, mean reduction, no bias, hidden and weight
both require grad; one step = forward + backward, gradients then dropped):
  fused    ddf.linear_relaxed_argmax_loss(hidden, weight, target, tau, backend='cpp')
  unfused  logits = F.linear(hidden, weight); ddf.relaxed_argmax_loss(logits, ..., backend='cpp')
  eager    logits = F.linear(hidden, weight); the reference loss rows in plain PyTorch, autograd

Time: the three paths run interleaved (fused, unfused, eager, fused, ...) in one
process with torch.set_num_threads(2), after one warm-up step each; the
medians over rounds are compared, as ratios of medians.

Memory: each path runs in a fresh subprocess (this file with --peak-memory)
with glibc's mmap threshold pinned to 64 KiB (MALLOC_MMAP_THRESHOLD_), so
every block >= 64 KiB is its own mapping, returned to the OS when freed and
the resident set tracks live memory. After a warm-up step, the kernel's
high-water mark VmHWM is reset (/proc/self/clear_refs) with the inputs live
and no gradients, one step runs (its gradients kept), and
peak_extra_bytes = VmHWM - VmRSS(before). It includes the gradients the step
returns (hidden.grad and weight.grad, which every path must produce);
workspace_bytes = peak_extra_bytes - those gradients' bytes is what the path
itself adds. Both are reported as multiples of the logits' size N * V * 4.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/conftest.py

import torch
import torch.nn.functional as F
from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

import ddvae_fast as ddf
from ddvae_fast.loss.linear import chunk_rows_for, linear_relaxed_argmax_loss
from ddvae_fast.loss.reference import relaxed_argmax_rows

TAU = 0.1
NUM_THREADS = 2
PATHS = ("fused", "unfused", "eager")
DEFAULT_SHAPES = ((8192, 512, 32000), (2048, 512, 32000))
RESULTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "cpu_linear_loss.json"
)


def loss_of(path, hidden, weight, target):
    if path == "fused":
        return linear_relaxed_argmax_loss(hidden, weight, target, TAU, backend="cpp")
    logits = F.linear(hidden, weight)
    if path == "unfused":
        return ddf.relaxed_argmax_loss(logits, target, TAU, backend="cpp")
    if path == "eager":
        return relaxed_argmax_rows(logits, target, TAU).mean()
    raise ValueError(path)


def make_inputs(num_rows, features, num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, features, generator=gen)
    # logits of about unit-3 scale, as in benchmarks/bench_relaxed_argmax.py
    weight = 3.0 * torch.randn(num_classes, features, generator=gen) / features**0.5
    target = torch.randint(0, num_classes, (num_rows,), generator=gen)
    return hidden.requires_grad_(True), weight.requires_grad_(True), target


def step(path, hidden, weight, target):
    loss_of(path, hidden, weight, target).backward()
    hidden.grad = None
    weight.grad = None


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(path, num_rows, features, num_classes):
    torch.set_num_threads(NUM_THREADS)
    hidden, weight, target = make_inputs(num_rows, features, num_classes)
    step(path, hidden, weight, target)  # warm-up: lazy imports, thread pool
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    loss_of(path, hidden, weight, target).backward()  # keep the gradients: part of the step
    peak = _status_kib("VmHWM")
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    return {"peak_extra_bytes": (peak - before) * 1024, "gradient_bytes": grads}


def measure_peak(path, num_rows, features, num_classes):
    """Run this file with --peak-memory in a fresh process; return its measurement."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(NUM_THREADS))
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-memory", path]
    cmd += [str(num_rows), str(features), str(num_classes)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_interleaved(num_rows, features, num_classes, rounds):
    torch.set_num_threads(NUM_THREADS)
    hidden, weight, target = make_inputs(num_rows, features, num_classes)
    for path in PATHS:
        step(path, hidden, weight, target)  # warm-up
    times = {path: [] for path in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            start = time.perf_counter()
            step(path, hidden, weight, target)
            times[path].append(time.perf_counter() - start)
            print(f"  {path}: {times[path][-1]:.2f} s", flush=True)
    return times


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="N,H,V triples")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    shapes = (
        [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        if args.shapes
        else DEFAULT_SHAPES
    )
    results = []
    for num_rows, features, num_classes in shapes:
        print(f"(N, H, V) = ({num_rows}, {features}, {num_classes})", flush=True)
        load_before = load_average()
        times = time_interleaved(num_rows, features, num_classes, args.rounds)
        medians = {path: statistics.median(t) for path, t in times.items()}
        logits_bytes = num_rows * num_classes * 4
        memory = {}
        for path in PATHS:
            m = measure_peak(path, num_rows, features, num_classes)
            memory[path] = {
                **m,
                "peak_extra_over_logits": m["peak_extra_bytes"] / logits_bytes,
                "workspace_over_logits": (m["peak_extra_bytes"] - m["gradient_bytes"])
                / logits_bytes,
            }
            print(f"  memory {path}: {memory[path]}", flush=True)
        results.append(
            {
                "N": num_rows,
                "H": features,
                "V": num_classes,
                "chunk_rows": chunk_rows_for(num_rows, num_classes, torch.float32),
                "logits_bytes": logits_bytes,
                "rounds": args.rounds,
                "times_s": times,
                "median_s": medians,
                "fused_over_unfused": medians["fused"] / medians["unfused"],
                "eager_over_fused": medians["eager"] / medians["fused"],
                "memory": memory,
                "load_average_before": load_before,
                "load_average_after": load_average(),
            }
        )
        write_record(results, args.out)
    print(json.dumps([{k: r[k] for k in ("N", "fused_over_unfused", "eager_over_fused")}
                      for r in results]))  # fmt: skip


def write_record(results, out):
    """Write the JSON after every shape, so a long run keeps what it finished."""
    record = {
        "command": " ".join([os.path.relpath(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": NUM_THREADS,
            "note": "shared box: other engineers' jobs ran concurrently (see load averages)",
        },
        "dtype": "float32",
        "tau": TAU,
        "score": "logit",
        "reduction": "mean",
        "results": results,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--peak-memory":
        _, _, path_arg, n_arg, h_arg, v_arg = sys.argv
        print(json.dumps(measure_peak_here(path_arg, int(n_arg), int(h_arg), int(v_arg))))
    else:
        main()
