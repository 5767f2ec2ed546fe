"""Ablation: a finished synthetic run continued with decoder fine-tuning (Section 2.3).

    .venv/bin/python benchmarks/figure5_finetune.py runs/fig5/ut runs/ablate/ut_ft10 --epochs 10

The published Figure 5 runs had no fine-tuning (their trainer reads a misspelt
key; docs/synthetic_results.md). This copies the finished run SRC into DST
(SRC is not touched), sets the config's ``finetune_epochs`` to N, continues
training from the stored state (model, optimizers, sampler, RNG: the epochs
before stay the same), and evaluates as ``ddvae-fast train`` does, so DST has
the same checkpoint.pt, metrics.json and latent_map.png as a run trained with
fine-tuning from the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

from ddvae_fast.seqvae.cli import _write_json, evaluate
from ddvae_fast.seqvae.trainer import CHECKPOINT_NAME, Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dst.exists():
        parser.error(f"{args.dst} exists; choose a new directory")
    if args.epochs < 1:
        parser.error("--epochs must be positive")
    torch.set_num_threads(args.threads)
    trainer = Trainer.resume(args.src, progress=False, log_epochs=True)
    train = trainer.config.train
    if trainer.epoch != train.total_epochs:
        parser.error(f"{args.src} is not finished ({trainer.epoch}/{train.total_epochs} epochs)")
    args.dst.mkdir(parents=True)
    shutil.copyfile(args.src / CHECKPOINT_NAME, args.dst / CHECKPOINT_NAME)
    trainer.config = dataclasses.replace(
        trainer.config,
        train=dataclasses.replace(train, finetune_epochs=train.finetune_epochs + args.epochs),
    )
    trainer.out_dir = args.dst
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    metrics = evaluate(trainer, args.dst, None)
    _write_json(
        args.dst / "metrics.json",
        {
            "config": trainer.config.to_dict(),
            "continued_from": str(args.src),
            "epochs_completed": trainer.epoch,
            "train_seconds_this_run": seconds,
            "train_seconds_all_epochs": sum(r.get("seconds", 0.0) for r in trainer.history),
            **metrics,
        },
    )
    print(
        f"{args.dst}: KL {metrics['prior_decoding_kl']:.4f} JS {metrics['prior_decoding_js']:.5f} "
        f"reconstruction {metrics['reconstruction_accuracy']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
