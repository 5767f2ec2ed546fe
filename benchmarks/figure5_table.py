"""Figure 5 runs beside the authors' published numbers (issue 8).

    .venv/bin/python benchmarks/figure5_table.py --images              the three presets' runs
    .venv/bin/python benchmarks/figure5_table.py --name figure5_ablations \\
        --run "U_T, 100 epochs"=runs/fig5/ut "U_T + fine-tuning 10"=runs/ablate/ut_ft

Each run directory is one `ddvae-fast train` output (checkpoint.pt, metrics.json,
latent_map.png). The panel (U_U, U_T, N_N) follows from the run's own config
(prior, proposal, decoder mode), and its row carries the authors' KL and JS for
that panel: the titles of images/synthetic/*.png in insilicomedicine/DD-VAE
(../shared/paper/NOTES.md, issue 8). Writes benchmarks/results/NAME.json; with
--images, copies each latent map to docs/images/NAME_<label>.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# panel -> (prior, proposal, mode), (KL, JS) published by the authors.
PANELS = {
    "U_U": (("uniform", "uniform", "argmax"), (0.0033, 0.00082)),
    "U_T": (("uniform", "tricube", "argmax"), (0.0066, 0.0017)),
    "N_N": (("gaussian", "gaussian", "sample"), (0.0073, 0.0019)),
}
DEFAULT_RUNS = ["U_U=runs/fig5/uu", "U_T=runs/fig5/ut", "N_N=runs/fig5/nn"]


def _panel(config: dict) -> str | None:
    model = config["model"]
    key = (model["prior"], model["proposal"], model["mode"])
    return next((name for name, (k, _) in PANELS.items() if k == key), None)


def summarize(label: str, out: Path) -> dict:
    """One table row from a finished run directory."""
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    config = state["config"]
    panel = _panel(config)
    authors_kl, authors_js = PANELS[panel][1] if panel else (None, None)
    strings = metrics["per_string"]
    train = config["train"]
    row = {
        "run": label,
        "panel": panel,
        "epochs": f"{train['epochs']} + {train['finetune_epochs']} fine-tuning",
        "beta end": train["beta_end"],
        "lr halved every": train["lr_step_epochs"],
        # Checkpoints from before the setting existed had z at every step.
        "z every step": config["model"].get("z_every_step", True),
        "decoder input": config["model"].get("decoder_input", "z"),
        "KL": metrics["prior_decoding_kl"],
        "KL authors": authors_kl,
        "JS": metrics["prior_decoding_js"],
        "JS authors": authors_js,
        "reconstruction from mu": f"{sum(r['reconstructed_from_mu'] for r in strings)}"
        f"/{len(strings)}",
        "sampled reconstruction": metrics["sampled_reconstruction_accuracy"],
        "train s": round(metrics["train_seconds_all_epochs"]),
        "threads": metrics.get("torch_threads"),
        "JS at or below authors": None
        if authors_js is None
        else metrics["prior_decoding_js"] <= authors_js,
        "out": str(out),
    }
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="+", default=DEFAULT_RUNS, help="LABEL=DIR ...")
    parser.add_argument("--name", default="figure5_presets", help="results file name")
    parser.add_argument("--images", action="store_true", help="copy the latent maps to docs/")
    args = parser.parse_args(argv)
    rows = []
    for item in args.run:
        label, sep, directory = item.partition("=")
        if not sep:
            parser.error(f"--run takes LABEL=DIR, got {item!r}")
        out = Path(directory)
        if not (out / "metrics.json").is_file():
            print(f"{label}: {out} has no metrics.json (not finished?)", file=sys.stderr)
            return 2
        row = summarize(label, out)
        if args.images:
            slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            target = ROOT / "docs" / "images" / f"{args.name}_{slug}.png"
            shutil.copyfile(out / "latent_map.png", target)
            row["latent map"] = str(target.relative_to(ROOT))
        rows.append(row)
        print(
            f"{label:>28} {row['panel']}: KL {row['KL']:.4f} (authors {row['KL authors']}) "
            f"JS {row['JS']:.5f} (authors {row['JS authors']}) "
            f"mu {row['reconstruction from mu']} sampled {row['sampled reconstruction']:.4f}"
        )
    payload = {
        "benchmark": args.name,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "note": "train s is the run's own training wall time (shared box: see README)",
        },
        "columns": [
            "run",
            "panel",
            "epochs",
            "beta end",
            "lr halved every",
            "z every step",
            "decoder input",
            "KL",
            "KL authors",
            "JS",
            "JS authors",
            "reconstruction from mu",
            "sampled reconstruction",
            "train s",
            "threads",
            "JS at or below authors",
        ],
        "rows": rows,
    }
    path = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
