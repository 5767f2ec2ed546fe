"""Two levers of the default run's CPU time, each against what it replaced.

    .venv/bin/python benchmarks/bench_synthetic_step.py [--threads 2] [--repeats 15] [--checkpoint PATH]

- the GRU's tanh: ATen's tanh against 2 sigmoid(2t) - 1
  (``seqvae.gru.tanh_in_place``), alone on a (4096, 128) float32 block (one
  greedy-decoding chunk's n gate), in greedy decoding (``decode_counts``) of
  65,536 seeded uniform-prior draws (1/15 of the run's evaluation), and in
  one training step (batch 512 of the run's six-bit strings: loss, backward,
  clamp, Adam);
- the distinct rows of a batch (``encode_batch``): ``torch.unique(dim=0)``
  against ``seqvae.model.unique_rows`` on the same 512 x 7 tokens.

The tanh-alone case times a clone of the block with either form (the same
cost in both, so its ratio understates the op's). The model is a trained
default run's (``--checkpoint``, by default what
``./run.sh train`` writes): with random weights nearly every draw decodes to
a different string and counting them, not the GRU, would be measured. The
two variants of each case alternate within every round; the first round is
not timed; medians are reported. Writes benchmarks/results/synthetic_step.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

from ddvae_fast.sampling import RejectionSampler
from ddvae_fast.seqvae import gru
from ddvae_fast.seqvae import model as model_module
from ddvae_fast.seqvae.data import encode_strings
from ddvae_fast.seqvae.model import SequenceDDVAE, unique_rows
from ddvae_fast.seqvae.synthetic import sample_bernoulli_strings
from ddvae_fast.seqvae.trainer import builtin_config, load_checkpoint, load_config

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_TANH = gru.tanh_in_place


def _aten_tanh(t: torch.Tensor) -> torch.Tensor:
    return t.tanh_()


def _use_tanh(form) -> None:
    # Both modules call the name they imported: point both at the form measured.
    gru.tanh_in_place = form
    model_module.tanh_in_place = form


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=ROOT / "runs" / "synthetic-uniform-uniform-argmax-seed0" / "checkpoint.pt",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_step.json"
    )
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}: run ./run.sh train first, or pass one")
    torch.set_num_threads(args.threads)
    config = load_config(builtin_config("synthetic"))
    strings = sample_bernoulli_strings(512, config.data.length, config.data.p_one, seed=0)
    model = SequenceDDVAE.from_state(load_checkpoint(args.checkpoint)["model"])
    batch = encode_strings(strings, model.vocabulary)
    sampler = RejectionSampler(config.model.proposal, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    z = model.sample_prior(65536, torch.Generator().manual_seed(0))
    block = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0))

    def decode():
        model.eval()
        model.decode_counts(z)

    def train_step():
        model.train()
        terms = model.loss_terms(batch, sampler, tau=0.01, beta=0.5, nll_weight=0.0)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), config.train.clip_grad_value)
        optimizer.step()

    def with_tanh(form, fn):
        def run():
            _use_tanh(form)
            fn()

        return run

    # case -> (variant name -> callable): the replaced variant first, then the library's.
    cases = {
        "tanh alone (4096 x 128)": {
            "aten tanh": lambda: _aten_tanh(block.clone()),
            "2 sigmoid(2t) - 1": lambda: LIBRARY_TANH(block.clone()),
        },
        "decode 65536 draws": {
            "aten tanh": with_tanh(_aten_tanh, decode),
            "2 sigmoid(2t) - 1": with_tanh(LIBRARY_TANH, decode),
        },
        "train step (batch 512)": {
            "aten tanh": with_tanh(_aten_tanh, train_step),
            "2 sigmoid(2t) - 1": with_tanh(LIBRARY_TANH, train_step),
        },
        "distinct rows (512 x 7 tokens)": {
            "torch.unique(dim=0)": lambda: torch.unique(
                batch.tokens, dim=0, return_inverse=True, return_counts=True
            ),
            "unique_rows": lambda: unique_rows(batch.tokens, len(model.vocabulary)),
        },
    }
    times = {(case, name): [] for case, variants in cases.items() for name in variants}
    for repeat in range(args.repeats + 1):
        for case, variants in cases.items():
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if repeat:
                    times[case, name].append(time.perf_counter() - start)
    _use_tanh(LIBRARY_TANH)
    rows = []
    for case, variants in cases.items():
        (old, new) = variants
        old_ms, new_ms = (1000 * statistics.median(times[case, n]) for n in (old, new))
        rows.append(
            {
                "case": case,
                "replaced": old,
                "replaced ms": old_ms,
                "library": new,
                "library ms": new_ms,
                "speed-up": old_ms / new_ms,
            }
        )
    result = {
        "benchmark": "synthetic_step",
        "command": "python benchmarks/bench_synthetic_step.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "checkpoint": str(args.checkpoint),
        "note": "medians of interleaved repeats (the two variants alternate in every round)",
        "rows": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['case']:<32} {row['replaced']:>20} {row['replaced ms']:9.3f} ms  "
            f"{row['library']:>18} {row['library ms']:9.3f} ms  x{row['speed-up']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
