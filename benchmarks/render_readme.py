"""Generate the README's result tables from the files under benchmarks/results/.

    .venv/bin/python benchmarks/render_readme.py          # rewrite README.md in place
    .venv/bin/python benchmarks/render_readme.py --check  # exit 1 if README.md is stale

A table lives between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
in README.md and is rendered from ``benchmarks/results/NAME.json``: a JSON
object with ``machine``, ``date``, ``command`` and ``rows`` (a list of flat
objects; optional ``columns`` picks and orders them). Nothing in a table is
typed by hand, so the README says only what a results file holds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
_REGION = re.compile(
    r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S
)


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")


def _loss_in_loop(data):
    return [
        {
            "(N, V)": shape.replace("x", " x "),
            "eager after an eager step (ms)": r["eager_after_eager_step"],
            "compiled after an eager step (ms)": r["compiled_after_eager_step"],
            "cpp after an eager step (ms)": r["cpp_after_eager_step"],
            "cpp alone (ms)": r["cpp_alone"],
            "cpp vs eager": r["speedup_vs_eager"],
            "cpp vs compiled": r["speedup_vs_compiled"],
        }
        for shape, r in data["shapes"].items()
    ]


def _linear_loss(data):
    rows = []
    for r in data["results"]:
        row = {"(N, H, V)": f"({r['N']}, {r['H']}, {r['V']})", "chunk rows": r["chunk_rows"]}
        row.update({f"{k} median (s)": v for k, v in r["median_s"].items()})
        row["fused / unfused"] = r.get("fused_over_unfused")
        row["eager / fused"] = r.get("eager_over_fused")
        for path, m in r.get("memory", {}).items():
            row[f"{path} peak extra / logits"] = m["peak_extra_over_logits"]
            row[f"{path} workspace / logits"] = m["workspace_over_logits"]
        rows.append(row)
    return rows


def _sampler_rsample(data):
    rows = []
    for block in data["results"]:
        for r in block["rows"]:
            rows.append(
                {
                    "shape": " x ".join(map(str, block["shape"])),
                    "backend": r["backend"],
                    **{f"{k} (ms)": v for k, v in r["median_ms"].items()},
                    **{f"{k} / sample": v for k, v in r["ratio_to_sample"].items()},
                }
            )
    return rows


def _loss_bandwidth(data):
    rows = []
    for shape, r in data["shapes"].items():
        b = r.get("bandwidth")
        if not b:
            continue
        # Older files: "fresh" was the loss's gradient (huge pages from 32 MiB,
        # or torch.empty in files without a torch.empty column).
        old = "kernel_loss_grad_ms" not in b
        huge = old and "kernel_torch_empty_grad_ms" in b
        loss = None if old else b["kernel_loss_grad_ms"]
        fresh = b["kernel_fresh_grad_ms"] if huge else b.get("kernel_fresh_mapping_grad_ms")
        empty = b.get("kernel_torch_empty_grad_ms", b.get("kernel_fresh_grad_ms"))
        limit = b["bandwidth_limit_ms"]
        rows.append(
            {
                "(N, V)": shape.replace("x", " x "),
                "bandwidth limit (ms)": limit,
                "the loss's gradient, mapping cache (ms)": loss,
                "fresh mapping (ms)": fresh,
                "fresh torch.empty (ms)": empty,
                "reused buffer (ms)": b["kernel_reused_grad_ms"],
                "the loss's / limit": None if loss is None else round(loss / limit, 2),
                "fresh mapping / limit": None if fresh is None else round(fresh / limit, 2),
                "reused / limit": b["reused_over_limit"],
            }
        )
    return rows


def _aot(data):
    return [
        {
            "target": data["target"],
            "specializations": data["specializations"],
            "max registers": data["max_registers"],
            "max spill bytes": data["max_local_bytes"],
            "max shared bytes": data["max_shared_bytes"],
            "triton": data["triton_version"],
        }
    ]


def _synthetic_seeds(data):
    return [
        {
            "seed": r["seed"],
            "reconstruction from mu": f"{r['reconstructed']}/{r['strings']}",
            "sampled reconstruction": r["sampled_reconstruction"],
            "KL": r["kl"],
            "JS": r["js"],
            "TV": r["tv"],
            "wall s": round(r["wall_seconds"]),
            "threads": r.get("threads", 1),
            "goal met": r["meets_goal"],
        }
        for r in data["rows"]
    ]


def _moses_runs(data):
    return [
        {
            "model": family,
            "epochs": r["epochs"],
            "best reconstruction before the ramp": r["best_reconstruction_before_ramp"],
            "ramp began after epoch": (r["ramp_begin_epoch_index"] or 0) + 1,
            "train s": r["train_seconds"],
            "reconstruction checks s": r["measure_seconds"],
            "evaluations s": r["eval_seconds"],
            "total min": round(
                (r["train_seconds"] + r["measure_seconds"] + r["eval_seconds"]) / 60, 1
            ),
        }
        for family, r in data["runs"].items()
    ]


# Tables rendered from another table's results file: name -> file name.
SOURCES = {
    "cpu_loss_bandwidth": "cpu_loss_in_loop",
    "cpu_loss_bandwidth_xeon": "cpu_loss_in_loop_xeon",
    "moses_small_runs": "moses_small",
}
# Results files whose layout is not a plain list of rows: name -> rows.
VIEWS = {
    "cpu_loss_in_loop": _loss_in_loop,
    "cpu_loss_bandwidth": _loss_bandwidth,
    "cpu_loss_bandwidth_xeon": _loss_bandwidth,
    "cpu_loss_in_loop_own_pool": _loss_in_loop,
    "cpu_loss_in_loop_65536_repeat": _loss_in_loop,
    "moses_small_runs": _moses_runs,
    "cpu_linear_loss": _linear_loss,
    "cpu_sampler_rsample": _sampler_rsample,
    "aot_sm80": _aot,
    "aot_sm90a": _aot,
    "synthetic_seeds": _synthetic_seeds,
    "synthetic_seeds_z_input": _synthetic_seeds,
}


def render(name: str) -> str:
    path = RESULTS / f"{SOURCES.get(name, name)}.json"
    data = json.loads(path.read_text())
    rows = VIEWS[name](data) if name in VIEWS else data["rows"]
    columns = (
        (data.get("columns") if name not in SOURCES else None) or list(rows[0]) if rows else []
    )
    machine = data.get("machine", "unknown machine")
    if isinstance(machine, dict):
        machine = ", ".join(f"{v}" if k == "cpu" else f"{k} {v}" for k, v in machine.items())
    lines = [
        f"*{machine}, {data.get('date', 'undated')}; "
        f"`{data.get('command', '')}` (benchmarks/results/{path.name})*",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rendered_readme(text: str) -> str:
    def replace(match):
        return match.group(1) + render(match.group("name")) + match.group(4)

    return _REGION.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    text = README.read_text()
    new = rendered_readme(text)
    if args.check:
        if new != text:
            print("README.md tables are stale: run benchmarks/render_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
