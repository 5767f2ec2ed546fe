"""Command line: ``ddvae-fast train`` (by default the synthetic experiment of Section 4.1).

    ddvae-fast train                        compressed recipe, < 5 min on 2 CPU cores
    ddvae-fast train --preset paper         Figure 5's U_T run as published (100 epochs)
    ddvae-fast train --preset paper --proposal uniform                 the U_U run
    ddvae-fast train --preset paper --prior gaussian --proposal gaussian --mode sample
                                            the VAE of Figure 5 (N_N)
    ddvae-fast train --data mols.smi        the same machinery on SMILES strings
    ddvae-fast train --resume --out DIR     continue an interrupted run exactly
    torchrun --nproc_per_node N -m ddvae_fast.seqvae.cli train ...
                                            the same on N processes (DDP; README)

Writes to --out (default: runs/<config>-<prior>-<proposal>-<mode>-seed<seed>):
checkpoint.pt, metrics.csv (per epoch), metrics.json and, for the 2-D
synthetic models, latent_map.png (Figure 5). An --out that already holds a run
is refused unless --resume or --overwrite is given. Every input error is one
line "error: ..." and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    "default": "synthetic",
    "paper": "synthetic_paper",
    "vae": "figure5_nn",
    "smiles": "smiles",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddvae-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a DD-VAE (default: the synthetic bit strings of Section 4.1)"
    )
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="built-in config: default (compressed synthetic), paper (Appendix B.1), "
        "vae (the VAE baseline), smiles (used with --data)",
    )
    train.add_argument(
        "--config", type=Path, default=None, help="TOML config file (overrides --preset)"
    )
    train.add_argument(
        "--epochs", type=int, default=None, help="main training epochs (fine-tuning comes after)"
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory [default: runs/<config name or data file stem>-<prior>-"
        "<proposal>-<mode>-seed<seed>]",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its checkpoint, metrics and map are deleted)",
    )
    train.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda [default: cpu]"
    )
    train.add_argument("--prior", choices=["gaussian", "uniform"], default=None)
    train.add_argument(
        "--proposal", default=None, help="proposal kernel (uniform, tricube, gaussian, ...)"
    )
    train.add_argument(
        "--mode",
        choices=["argmax", "sample"],
        default=None,
        help="argmax: DD-VAE; sample: VAE with a cross-entropy decoder",
    )
    train.add_argument(
        "--data",
        type=Path,
        default=None,
        help="train on the strings of this file (.smi/.txt/.csv[.gz]) instead of synthetic data",
    )
    train.add_argument("--column", default=None, help="CSV column holding the strings")
    train.add_argument("--seed", type=int, default=None, help="training seed")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint.pt [default --out: the default run's]",
    )
    train.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="prior samples for the evaluation [synthetic: 100000 (or a 400x400 grid "
        "for a 2-D uniform prior); other data: 1000]",
    )
    train.add_argument(
        "--divergence-samples",
        type=int,
        default=1_000_000,
        help="seeded prior draws decoded for prior_decoding_kl/js, the authors' Figure 5 "
        "scores [default: 1000000, as they used]",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch [default: the cores this process may use, at most 2, "
        "shared out among the processes under torchrun]. On a machine busy with other "
        "jobs use 1: OpenMP threads that wait for each other there made training up to "
        "10x slower",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help="under torchrun: seconds a process waits for the others in a collective "
        "before it fails (a stalled or dead rank ends the job instead of hanging it) "
        "[default: 1800]",
    )
    metrics = sub.add_parser(
        "metrics", help="the MOSES metrics of generated SMILES against the MOSES test sets"
    )
    metrics.add_argument("--gen", required=True, help="generated SMILES, one per line")
    metrics.add_argument("--json", default=None, help="also write the metrics here (MOSES keys)")
    metrics.add_argument("--jobs", type=int, default=2, help="processes for per-molecule work")
    _add_moses_parsers(sub)
    return parser


def metrics_command(args) -> int:
    """Print the MOSES table of ``--gen`` (and write it as JSON under MOSES's key names)."""
    from .moses_metrics import moses_metrics

    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    path = Path(args.gen)
    if not path.is_file():
        raise UsageError(f"--gen {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--gen {path} is not UTF-8 text: {exc}") from None
    generated = [line.strip() for line in lines if line.strip()]
    if not generated:
        raise UsageError(f"--gen {path} holds no SMILES")
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a directory")
    result = moses_metrics(generated, n_jobs=args.jobs)
    for key, value in result.items():
        print(f"{key:<14} {value:.4f}")
    if args.json is not None:
        _write_json(Path(args.json), result)
    return 0


class UsageError(ValueError):
    """An input error of the command line: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------
# ddvae-fast moses / moses-figure: the MOSES experiment (moses_experiment.py)


def _add_moses_parsers(sub) -> None:
    moses = sub.add_parser(
        "moses",
        help="MOSES distribution learning (Table 3, Figure 7) for one model",
        description="Pretrain at a small fixed beta until the held-out reconstruction is "
        "about 95%%, then raise beta; score 10k prior samples with the MOSES metrics "
        "whenever the reconstruction first falls below 90%%, 80%% and 70%%. Writes "
        "moses_curve.csv (one row per evaluation), reconstruction.csv (per epoch), "
        "samples_epoch*.smi, figure7.png, checkpoint.pt and moses_state.json to --out.",
    )
    moses.add_argument("--model", choices=["ddvae", "vae"], required=True)
    moses.add_argument(
        "--scale",
        choices=["small", "paper"],
        default="small",
        help="small: a reduction for a 2-core CPU (see configs/moses_*_small.toml); "
        "paper: the authors' configuration, for a GPU [default: small]",
    )
    # A config file in place of the built-in one (tests and calibration runs).
    moses.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)
    moses.add_argument(
        "--out", type=Path, default=None, help="run directory [default: runs/moses-MODEL-SCALE]"
    )
    moses.add_argument("--resume", action="store_true", help="continue the run in --out")
    moses.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    moses.add_argument("--device", default="cpu", help="torch device [default: cpu]")
    moses.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, and processes for the metrics' per-molecule work [default: 1]",
    )
    moses.add_argument("--no-progress", action="store_true", help="no progress bars")
    figure = sub.add_parser(
        "moses-figure", help="Figure 7 from the curves of finished `moses` runs"
    )
    figure.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        required=True,
        help="run directories (or their moses_curve.csv), e.g. one DD-VAE and one VAE run",
    )
    figure.add_argument("--out", type=Path, required=True, help="the PNG to write")


def _moses_files(out: Path) -> list[str]:
    from .moses_experiment import RUN_FILES, SAMPLES_GLOB

    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    return found + sorted(p.name for p in out.glob(SAMPLES_GLOB))


def moses_command(args) -> int:
    """Run (or continue) the MOSES protocol for one model; see moses_experiment.py."""
    from . import moses_experiment as mx

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume continues the run in --out and --overwrite replaces it: pick one"
        )
    if args.resume and args.config is not None:
        raise UsageError("--resume continues with the run's own config; drop --config")
    device = _check_device(args.device)
    out = args.out or Path("runs") / f"moses-{args.model}-{args.scale}"
    _check_out(out, resume=args.resume, overwrite=args.overwrite)
    existing = []
    if args.resume:
        if not (out / mx.STATE_NAME).is_file():
            raise UsageError(f"--resume: {str(out)!r} holds no MOSES run ({mx.STATE_NAME})")
        config = mx.MosesConfig.from_dict(mx.load_state(out)["config"])
        source = f"the run in {str(out)!r}"
    else:
        existing = _moses_files(out)
        if existing and not args.overwrite:
            raise UsageError(
                f"--out {str(out)!r} already holds a run ({', '.join(existing[:4])}); "
                "pass --resume to continue it, --overwrite to replace it, or another --out"
            )
        path = args.config or mx.builtin_moses_config(args.model, args.scale)
        config = mx.load_moses_config(path)
        source = f"config {str(path)!r}"
    if config.model_name != args.model:
        raise UsageError(
            f"--model {args.model}, but {source} trains a {config.model_name} "
            f"(mode {config.experiment.model.mode!r})"
        )
    torch.set_num_threads(args.threads)
    # Reads the data (and a resumed run's files): bad input fails here, before any write.
    run = mx.MosesRun(config, out, device=device, resume=args.resume, progress=not args.no_progress)
    if not run.finished:
        _prepare_out(out, overwrite=args.overwrite)
        if args.overwrite:
            for name in existing:
                (out / name).unlink(missing_ok=True)
    state = run.run(n_jobs=args.threads)
    print(f"{'event':<18} {'epoch':>5} {'recon':>7} {'FCD/Test':>9} {'SNN/Test':>9} {'valid':>6}")
    for row in state["evaluations"]:
        print(
            f"{row['event']:<18} {row['epoch']:>5} {row['reconstruction']:>7.4f} "
            f"{row['FCD/Test']:>9.4f} {row['SNN/Test']:>9.4f} {row['valid']:>6.3f}"
        )
    print(f"wrote {out}/{mx.CURVE_CSV_NAME}, {mx.RECONSTRUCTION_CSV_NAME}, {mx.FIGURE_NAME}")
    return 0


def moses_figure_command(args) -> int:
    """Figure 7 (FCD/Test and SNN/Test against reconstruction) from several runs."""
    from .moses_experiment import plot_figure7, read_curve

    if args.out.is_dir():
        raise UsageError(f"--out {str(args.out)!r} is a directory, expected a .png file")
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {str(args.out)!r} must end in .png")
    curves = [read_curve(path) for path in args.runs]
    plot_figure7(curves, args.out)
    print(f"wrote {args.out} ({', '.join(label for label, _ in curves)})")
    return 0


def _config_from_args(args):
    from .trainer import builtin_config, load_config

    if args.config is not None:
        path = args.config
    elif args.preset is not None:
        path = builtin_config(PRESETS[args.preset])
    else:
        path = builtin_config("smiles" if args.data is not None else "synthetic")
    config = load_config(path)
    data = {}
    if args.data is not None:
        data = {"source": str(args.data), "column": args.column}
    elif args.column is not None:
        raise UsageError("--column needs --data")
    config = config.with_overrides(
        data=data,
        model={"prior": args.prior, "proposal": args.proposal, "mode": args.mode},
    ).resolve()
    return config.with_overrides(train={"epochs": args.epochs, "seed": args.seed})


def _default_out(config) -> Path:
    """One directory per configuration, so that runs of different settings never
    share (and overwrite) one directory."""
    m = config.model
    stem = config.name if config.data.is_synthetic else Path(config.data.source).name
    stem = stem.split(".")[0] or "run"
    return Path("runs") / f"{stem}-{m.prior}-{m.proposal}-{m.mode}-seed{config.train.seed}"


def _check_device(name: str):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu, cuda[:N] or mps, got {name!r}")
    return device


def default_threads(processes: int = 1) -> int:
    """Threads per process when --threads is not given: the usable cores shared
    out among ``processes``, at most 2 (the synthetic model's matrices are small)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores // max(processes, 1)))


def _check_args(args) -> None:
    """Checks of the flags alone, before anything is read or written."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.dist_timeout is not None and not 0 < args.dist_timeout < float("inf"):
        raise UsageError(f"--dist-timeout must be a positive number, got {args.dist_timeout}")
    if args.eval_samples is not None and args.eval_samples < 1:
        raise UsageError(f"--eval-samples must be a positive int, got {args.eval_samples}")
    if args.divergence_samples < 1:
        raise UsageError(
            f"--divergence-samples must be a positive int, got {args.divergence_samples}"
        )
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be a positive int, got {args.epochs}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume continues the run in --out and --overwrite replaces it: pick one"
        )
    for flag in ("config", "data"):
        path = getattr(args, flag)
        if path is not None and path.is_dir():
            raise UsageError(f"--{flag} {str(path)!r} is a directory, expected a file")
    _check_device(args.device)


def _holds_a_run(out: Path) -> list[str]:
    from .trainer import RUN_FILES

    return [name for name in RUN_FILES if (out / name).exists()]


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that cannot take this run; changes nothing on disk."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, expected a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file")
            break
    if resume:
        return
    existing = _holds_a_run(out) if out.is_dir() else []
    if existing and not overwrite:
        raise UsageError(
            f"--out {str(out)!r} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --overwrite to replace it, or another --out"
        )


def _prepare_out(out: Path, *, overwrite: bool) -> None:
    """Create --out, prove it writable, remove what a killed write left behind
    and, for --overwrite, the previous run's files."""
    from .io import remove_stale_temporaries
    from .trainer import RUN_FILES

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r} is not writable ({exc.strerror or exc})") from None
    remove_stale_temporaries(out)
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def evaluate(
    trainer, out: Path, eval_samples: int | None, divergence_samples: int = 1_000_000
) -> dict:
    """Measurements of the trained model, written to out/metrics.json by the caller."""
    from . import synthetic

    model = trainer.model
    config = trainer.config
    model.eval()
    if config.data.is_synthetic:
        distribution = synthetic.bernoulli_distribution(config.data.length, config.data.p_one)
        grid = 400
        # With a uniform prior in 2-D the TV integrates the prior on the same
        # grid the map shows: decode it once for both.
        shared = model.config.prior == "uniform" and model.config.latent_dim == 2
        grid_decoded = synthetic.decode_latent_grid(model, grid) if shared else None
        metrics = synthetic.evaluate_synthetic(
            model,
            distribution,
            n_prior_samples=eval_samples or 100_000,
            n_divergence_samples=divergence_samples,
            grid=grid,
            seed=config.train.seed,
            grid_decoded=grid_decoded,
        )
        if model.config.latent_dim == 2:
            synthetic.plot_latent_map(
                model,
                distribution,
                out / "latent_map.png",
                resolution=grid if shared else 300,
                per_string=metrics["per_string"],
                grid_decoded=grid_decoded,
                divergences=(metrics["prior_decoding_kl"], metrics["prior_decoding_js"]),
            )
        print(synthetic.format_probability_table(metrics))
        return metrics

    n = eval_samples or 1000
    strings = trainer.strings
    subset = strings[: min(len(strings), 1000)]
    with torch.no_grad():
        mu, _ = model.encode(subset)
    decoded = model.decode(mu)
    metrics = {
        "reconstruction_accuracy": sum(d == s for d, s in zip(decoded, subset)) / len(subset),
        "reconstruction_strings": len(subset),
    }
    samples = model.sample(n, seed=config.train.seed)
    metrics["prior_samples_decoded"] = sum(s is not None for s in samples) / n
    if config.data.tokenizer == "smiles":
        from . import chem

        metrics.update(chem.sample_metrics(samples, training=strings))
    metrics["examples"] = [s for s in samples[:20]]
    return metrics


def train_command(args) -> int:
    from . import distributed

    started = time.perf_counter()
    _check_args(args)
    world = distributed.world_from_env()
    if world is None:
        if args.dist_timeout is not None:
            raise UsageError("--dist-timeout applies under torchrun only")
        return _train(args, started, device=args.device, world=None)
    # Under torchrun: one process per rank, joined in a process group.
    device = distributed.rank_device(world, _check_device(args.device))
    timeout = distributed.DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    distributed.init_process_group(world, device, timeout)
    try:
        code = _train(args, started, device=device, world=world)
        # The ranks tear the process group down together: the other ranks return
        # right after training while rank 0 evaluates and writes, and a rank that
        # left early now and then aborted at exit ("terminate called without an
        # active exception", tests/test_distributed.py).
        torch.distributed.barrier()
        return code
    except (ValueError, OSError, ImportError) as exc:
        # Reported by main() as one line per process: say which process.
        raise UsageError(f"rank {world.rank}/{world.world_size}: {exc}") from None
    finally:
        distributed.destroy_process_group()


def _train(args, started: float, *, device, world) -> int:
    """The train command in one process; under torchrun in each (rank 0 alone
    prints, prepares --out and writes the run's files)."""
    from torch import distributed as dist

    from .trainer import Trainer, load_checkpoint

    main_process = world is None or world.is_main
    if args.threads is None:
        args.threads = default_threads(1 if world is None else world.world_size)
    torch.set_num_threads(args.threads)
    if args.resume:
        conflicting = [
            name
            for name in ("preset", "config", "epochs", "prior", "proposal", "mode", "data", "seed")
            if getattr(args, name) is not None
        ]
        if conflicting:
            raise UsageError(
                "--resume continues the run stored in --out/checkpoint.pt with its own "
                f"config; drop {', '.join('--' + c for c in conflicting)}"
            )
        out = args.out or _default_out(_config_from_args(args))
        _check_out(out, resume=True, overwrite=False)
        load_checkpoint(out / "checkpoint.pt")  # a corrupt file fails here, before any write
        trainer = Trainer.resume(out, device=device, progress=not args.no_progress, log_epochs=True)
        if main_process:
            _prepare_out(out, overwrite=False)
            print(f"resuming {out} after epoch {trainer.epoch}/{trainer.config.train.total_epochs}")
    else:
        config = _config_from_args(args)
        out = args.out or _default_out(config)
        _check_out(out, resume=False, overwrite=args.overwrite)
        trainer = Trainer(  # loads the data: unreadable data fails here, before any write
            config, out, device=device, progress=not args.no_progress, log_epochs=True
        )
        if main_process:
            _prepare_out(out, overwrite=args.overwrite)
    if world is not None:
        dist.barrier()  # --out is ready (and the old run's files gone) before any rank trains
    c = trainer.config
    if main_process:
        processes = "" if world is None else f" on {world.world_size} processes"
        print(
            f"{c.name}: {len(trainer.strings)} strings, prior {c.model.prior}, proposal "
            f"{c.model.proposal}, mode {c.model.mode}, {c.train.epochs} epochs + "
            f"{c.train.finetune_epochs} fine-tuning{processes} -> {out}"
        )
    trained_from = trainer.epoch
    fit_start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - fit_start
    if not main_process:
        return 0  # rank 0 evaluates the model (the same on every rank) and writes the files
    metrics = evaluate(trainer, out, args.eval_samples, args.divergence_samples)
    train_seconds_total = sum(row.get("seconds", 0.0) for row in trainer.history)
    wall = time.perf_counter() - started
    last = trainer.history[-1] if trainer.history else {}
    summary = {
        "config": c.to_dict(),
        "epochs_completed": trainer.epoch,
        "epochs_this_run": trainer.epoch - trained_from,
        "train_seconds_this_run": train_seconds,
        "train_seconds_all_epochs": train_seconds_total,
        "wall_seconds_this_run": wall,
        "device": str(trainer.device),
        "processes": 1 if world is None else world.world_size,
        "torch_threads": torch.get_num_threads(),
        "final_epoch": last,
        **metrics,
    }
    _write_json(Path(out) / "metrics.json", summary)
    headline = {
        k: metrics[k]
        for k in (
            "reconstruction_accuracy",
            "sampled_reconstruction_accuracy",
            "prior_decoding_kl",
            "prior_decoding_js",
            "prior_decoding_tv",
            "validity",
            "uniqueness",
        )
        if k in metrics
    }
    print(" ".join(f"{k} {v:.4f}" for k, v in headline.items()))
    print(
        f"wall time {wall:.1f}s; wrote {out}/checkpoint.pt, metrics.json"
        + (
            ", latent_map.png"
            if (Path(out) / "latent_map.png").exists() and c.data.is_synthetic
            else ""
        )
    )
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = {
        "train": train_command,
        "metrics": metrics_command,
        "moses": moses_command,
        "moses-figure": moses_figure_command,
    }.get(args.command)
    if command is not None:
        try:
            return command(args)
        except (ValueError, OSError, ImportError) as exc:
            # Input errors (bad flags, configs, data, checkpoints, directories):
            # one line, no traceback. Messages are made one line here.
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
