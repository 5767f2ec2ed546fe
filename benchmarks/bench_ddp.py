"""Training throughput (strings per second) on one process and on several (torchrun, DDP).

    .venv/bin/python benchmarks/bench_ddp.py                  CPU, gloo: 1 process, 1 process
                                                              with 2 threads, 2 processes
    .venv/bin/python benchmarks/bench_ddp.py --device cuda    GPUs, nccl: 1, 2, 4, ... processes
                                                              (one GPU each) up to all GPUs

Each variant runs the real command line (``python -m ddvae_fast.seqvae.cli
train``, under ``torchrun --standalone --nproc_per_node N`` for N > 1) on the
default synthetic model (a 2-layer GRU, hidden 128, batch 512: the global
batch, split over the processes) trained on ``--strings`` six-bit strings.
Throughput is strings / epoch seconds (metrics.csv, rank 0's clock, which
includes every wait for the other ranks), the median over the epochs after
the first (the first pays for DDP's set-up and first-iteration allocations),
then the median over ``--repeats`` runs. Variants are interleaved (A B C A B
C ...) so that a change in the machine's load hits all of them alike; the
load average is recorded before and after.

On a 2-core CPU box, 2 processes with one thread each use both cores, which
one process with 2 threads also does: that row is the fair baseline, and the
2-core limit caps any speed-up below 2. On a machine with several GPUs the
same script reports the scaling over GPUs (strong scaling: the global batch
stays 512, each GPU's part shrinks). Results go to
benchmarks/results/ddp_cpu.json (CPU) or ddp_cuda.json (--results to change).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CONFIG = """
name = "bench_ddp"
[data]
source = "{source}"
tokenizer = "char"
[model]
embedding_dim = 8
hidden_size = 128
num_layers = 2
latent_dim = 2
prior = "uniform"
proposal = "tricube"
mode = "argmax"
[train]
epochs = {epochs}
batch_size = {batch_size}
lr = 5e-3
lr_step_epochs = 2
lr_gamma = 0.5
clip_grad_value = 2.0
pretrain_epochs = 0
beta_start = 0.01
beta_end = 0.1
tau_start = 0.1
tau_end = 1e-2
finetune_epochs = 0
seed = 0
"""


def _variants(device: str) -> list[dict]:
    if device == "cpu":
        return [
            {"variant": "1 process", "processes": 1, "threads": 1},
            {"variant": "1 process, 2 threads", "processes": 1, "threads": 2},
            {"variant": "2 processes (gloo)", "processes": 2, "threads": 1},
        ]
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("--device cuda: no CUDA device on this machine")
    counts = sorted({1, gpus} | {2**k for k in range(1, gpus.bit_length()) if 2**k <= gpus})
    return [
        {"variant": f"{n} GPU{'s' if n > 1 else ''} (nccl)", "processes": n, "threads": 1}
        for n in counts
    ]


def _command(variant: dict, config: Path, out: Path, device: str) -> list[str]:
    train = ["-m", "ddvae_fast.seqvae.cli", "train", "--config", str(config), "--out", str(out)]
    train += ["--overwrite", "--no-progress", "--threads", str(variant["threads"])]
    train += ["--device", device, "--eval-samples", "10"]
    if variant["processes"] == 1:
        return [sys.executable, *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc_per_node", str(variant["processes"]), *train]


def _epoch_seconds(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--strings", type=int, default=4096, help="training strings per epoch")
    parser.add_argument(
        "--epochs", type=int, default=2, help="epochs per run (the first is warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--results", type=Path, default=None, help="output JSON")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.repeats < 1 or args.strings < args.batch_size:
        parser.error("need --epochs >= 2, --repeats >= 1 and --strings >= --batch-size")
    results = args.results or RESULTS / f"ddp_{args.device}.json"

    sys.path.insert(0, str(ROOT))
    from ddvae_fast.seqvae.synthetic import sample_bernoulli_strings

    variants = _variants(args.device)
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {v["variant"]: [] for v in variants}
    epoch_medians: dict[str, list[float]] = {v["variant"]: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        tmp = Path(tmp)
        data = tmp / "strings.txt"
        data.write_text("\n".join(sample_bernoulli_strings(args.strings, 6, 0.8, 0)) + "\n")
        config = tmp / "bench.toml"
        config.write_text(
            CONFIG.format(source=data, epochs=args.epochs, batch_size=args.batch_size)
        )
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
        for repeat in range(args.repeats):
            for variant in variants:
                out = tmp / f"run-{variant['processes']}-{variant['threads']}"
                command = _command(variant, config, out, args.device)
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    raise SystemExit(f"{variant['variant']} failed (exit {done.returncode})")
                seconds = statistics.median(_epoch_seconds(out)[1:])  # epoch 1: warm-up
                runs[variant["variant"]].append(args.strings / seconds)
                epoch_medians[variant["variant"]].append(seconds)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {variant['variant']:<22} "
                    f"{args.strings / seconds:8.0f} strings/s (epoch {seconds:.2f}s, "
                    f"run {time.perf_counter() - started:.0f}s wall)",
                    flush=True,
                )
    load_after = os.getloadavg()
    base = statistics.median(runs[variants[0]["variant"]])
    rows = []
    for variant in variants:
        name = variant["variant"]
        throughput = statistics.median(runs[name])
        rows.append(
            {
                **variant,
                "per_process_batch": args.batch_size // variant["processes"],
                "strings_per_s": round(throughput, 1),
                "epoch_s": round(statistics.median(epoch_medians[name]), 3),
                "speedup_vs_1_process": round(throughput / base, 3),
                "strings_per_s_each_run": [round(r, 1) for r in runs[name]],
            }
        )
    import torch

    machine = {"cpu": cpu_model(), "cores": os.cpu_count()}
    if args.device == "cuda":
        machine["gpus"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    machine["load_average_before"] = [round(x, 2) for x in load_before]
    machine["load_average_after"] = [round(x, 2) for x in load_after]
    machine["torch"] = torch.__version__
    payload = {
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": "python benchmarks/bench_ddp.py"
        + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "workload": {
            "strings": args.strings,
            "epochs": args.epochs,
            "global_batch": args.batch_size,
            "model": "GRU 2 x 128, embedding 8, latent 2 (the default synthetic model)",
        },
        "caveat": (
            "2 CPU cores, shared with the machine's other load: 2 processes gain at most "
            "2x; the 1-process, 2-thread row uses the same cores"
            if args.device == "cpu"
            else "strong scaling: the global batch is fixed, each GPU's part shrinks"
        ),
        "columns": [
            "variant",
            "processes",
            "threads",
            "per_process_batch",
            "strings_per_s",
            "epoch_s",
            "speedup_vs_1_process",
        ],
        "rows": rows,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
