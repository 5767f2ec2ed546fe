"""Table 3 of the paper beside the small-scale MOSES runs: benchmarks/results/moses_small.json.

Run after the two documented commands have finished:

    .venv/bin/ddvae-fast moses --model ddvae --scale small
    .venv/bin/ddvae-fast moses --model vae --scale small
    .venv/bin/python benchmarks/moses_table.py [--ddvae DIR] [--vae DIR]

Each run's moses_curve.csv holds one row per evaluation (the first epoch at
which the held-out reconstruction fell below 90%, 80%, 70%; one row can stand
for several levels when one epoch crossed them together). The table pairs each
level with the paper's Table 3 value for the same model family: DD-VAE with
the triweight proposal (T), VAE with the Gaussian proposal (G). It also writes
both curves, every MOSES metric included, to one CSV
(benchmarks/results/moses_small_curves.csv) and draws them into one Figure 7
(docs/images/figure7_small.png).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from ddvae_fast.seqvae.moses_experiment import CURVE_COLUMNS, plot_figure7, read_curve

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "moses_small.json"
CURVES = ROOT / "benchmarks" / "results" / "moses_small_curves.csv"
FIGURE = ROOT / "docs" / "images" / "figure7_small.png"

# Table 3 of the paper (mean over runs), keyed by reconstruction level.
PAPER = {
    "DD-VAE": {  # DD-VAE (T)
        "FCD/Test": {0.7: 0.194, 0.8: 0.311, 0.9: 0.690},
        "SNN/Test": {0.7: 0.555, 0.8: 0.532, 0.9: 0.495},
    },
    "VAE": {  # VAE (G)
        "FCD/Test": {0.7: 0.205, 0.8: 0.344, 0.9: 0.772},
        "SNN/Test": {0.7: 0.550, 0.8: 0.525, 0.9: 0.488},
    },
}


def level_rows(label: str, rows: list[dict]) -> dict[float, dict]:
    """level -> the evaluation made for it."""
    out = {}
    for row in rows:
        event = row["event"]
        if not event.startswith("below "):
            continue
        for part in event[len("below ") :].split(", "):
            out[round(float(part.rstrip("%")) / 100, 2)] = row
    return out


def table(curves: dict[str, tuple[str, list[dict]]]) -> list[dict]:
    by_level = {family: level_rows(*curve) for family, curve in curves.items()}
    rows = []
    for level in (0.9, 0.8, 0.7):
        for family in ("DD-VAE", "VAE"):
            label, _ = curves[family]
            ev = by_level[family].get(level)
            row = {"level": f"{level:.0%}", "model": label}
            if ev is None:
                row.update({"epoch": None, "reconstruction at evaluation": None})
            else:
                row.update(
                    {
                        "epoch": int(ev["epoch"]),
                        "reconstruction at evaluation": float(ev["reconstruction"]),
                        "valid": float(ev["valid"]),
                        "unique@10000": float(ev["unique@10000"]),
                        "Novelty": float(ev["Novelty"]),
                    }
                )
            for key in ("FCD/Test", "SNN/Test"):
                row[key] = None if ev is None else float(ev[key])
                row[f"{key} paper"] = PAPER[family][key][level]
            rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per level: does DD-VAE beat the VAE on FCD (lower) and SNN (higher)?"""
    out = []
    for level in ("90%", "80%", "70%"):
        pair = {r["model"].split(" ")[0]: r for r in rows if r["level"] == level}
        d, v = pair.get("DD-VAE"), pair.get("VAE")
        if d is None or v is None or d["FCD/Test"] is None or v["FCD/Test"] is None:
            out.append({"level": level, "DD-VAE better FCD": None, "DD-VAE better SNN": None})
            continue
        out.append(
            {
                "level": level,
                "DD-VAE better FCD": d["FCD/Test"] < v["FCD/Test"],
                "DD-VAE better SNN": d["SNN/Test"] > v["SNN/Test"],
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddvae", type=Path, default=ROOT / "runs" / "moses-ddvae-small")
    parser.add_argument("--vae", type=Path, default=ROOT / "runs" / "moses-vae-small")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--curves", type=Path, default=CURVES)
    args = parser.parse_args(argv)
    curves = {"DD-VAE": read_curve(args.ddvae), "VAE": read_curve(args.vae)}
    for family, (label, _) in curves.items():
        if not label.startswith(family + " "):
            raise SystemExit(f"--{family.lower().replace('-', '')} holds a {label} run")
    rows = table(curves)
    states = {}
    for family, path in (("DD-VAE", args.ddvae), ("VAE", args.vae)):
        state = json.loads((path / "moses_state.json").read_text())
        epochs = state["epochs"]
        states[family] = {
            "epochs": len(epochs),
            "ramp_begin_epoch_index": state.get("ramp_begin"),
            "best_reconstruction_before_ramp": max(
                (e["reconstruction"] for e in epochs if e.get("phase") == "fixed beta"),
                default=None,
            ),
            "train_seconds": round(sum(e["train_seconds"] for e in epochs)),
            "measure_seconds": round(sum(e["measure_seconds"] for e in epochs)),
            "eval_seconds": round(sum(e["eval_seconds"] for e in state["evaluations"])),
            "stopped": state.get("stopped"),
        }
    record = {
        "benchmark": "moses_small",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "runs": states,
        "verdicts": verdicts(rows),
        "columns": [
            "level",
            "model",
            "epoch",
            "reconstruction at evaluation",
            "FCD/Test",
            "FCD/Test paper",
            "SNN/Test",
            "SNN/Test paper",
            "valid",
            "unique@10000",
            "Novelty",
        ],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    with args.curves.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for _, curve_rows in curves.values():
            writer.writerows(curve_rows)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_figure7(list(curves.values()), args.figure)
    print(json.dumps(record["verdicts"]), "\nwrote", args.out, args.curves, "and", args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
