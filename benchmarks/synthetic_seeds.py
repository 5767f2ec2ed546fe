"""The default run (`ddvae-fast train`) for several seeds: does its result depend on luck?

    .venv/bin/python benchmarks/synthetic_seeds.py                  seeds 0 1 2, one after another
    .venv/bin/python benchmarks/synthetic_seeds.py --parallel       all seeds at once (--threads 1 each)
    .venv/bin/python benchmarks/synthetic_seeds.py --config FILE    another recipe

Each seed trains into runs/seeds/<config>-seed<N> (replacing an earlier run
there) through the command line, so the run is exactly what a user gets. The
table (reconstruction from mu, sampled reconstruction, the authors' KL and JS,
TV, wall and CPU seconds) is printed and written to
benchmarks/results/synthetic_seeds.json (or --results). Goal (issue 8): 64/64
reconstruction and JS <= 0.005 for every seed, in <= 5 minutes of wall time
(one seed after another: each run has the machine to itself, with the CLI's
default thread count, as a user runs it).

Not part of the test suite: each seed is a full default run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
GOAL_JS = 0.005
GOAL_SECONDS = 300


def _command(
    seed: int, out: Path, config: str | None, extra: list[str], parallel: bool
) -> list[str]:
    exe = [sys.executable, "-m", "ddvae_fast.seqvae.cli", "train"]
    args = ["--seed", str(seed), "--out", str(out), "--overwrite", "--no-progress"]
    if parallel:
        args += ["--threads", "1"]
    if config is not None:
        args += ["--config", config]
    return exe + args + extra


def _row(seed: int, out: Path, wall: float, cpu: float, code: int) -> dict:
    row = {"seed": seed, "exit_code": code, "wall_seconds": wall, "cpu_seconds": cpu}
    path = out / "metrics.json"
    if code != 0 or not path.is_file():
        return row
    m = json.loads(path.read_text())
    strings = m["per_string"]
    row.update(
        reconstructed=sum(r["reconstructed_from_mu"] for r in strings),
        strings=len(strings),
        sampled_reconstruction=m["sampled_reconstruction_accuracy"],
        kl=m["prior_decoding_kl"],
        js=m["prior_decoding_js"],
        tv=m["prior_decoding_tv"],
        train_seconds=m["train_seconds_this_run"],
        threads=m.get("torch_threads"),
        out=str(out),
    )
    row["meets_goal"] = (
        row["reconstructed"] == row["strings"] and row["js"] <= GOAL_JS and wall <= GOAL_SECONDS
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=None, help="TOML config [default: the default run]")
    parser.add_argument("--parallel", action="store_true", help="run the seeds concurrently")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_seeds.json"
    )
    parser.add_argument("extra", nargs="*", help="more `ddvae-fast train` flags, after --")
    args = parser.parse_args(argv)
    name = Path(args.config).stem if args.config else "default"
    runs = {s: ROOT / "runs" / "seeds" / f"{name}-seed{s}" for s in args.seeds}
    started = {}
    procs = {}
    logs = {}
    rows = []

    def finish(seed):
        proc = procs.pop(seed)
        # wait4 gives this child's own CPU time (children of other seeds excluded).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        logs[seed].close()
        wall = time.perf_counter() - started[seed]
        rows.append(_row(seed, runs[seed], wall, usage.ru_utime + usage.ru_stime, proc.returncode))
        print(f"seed {seed}: exit {proc.returncode}, {wall:.0f} s", flush=True)

    for seed in args.seeds:
        runs[seed].parent.mkdir(parents=True, exist_ok=True)
        cmd = _command(seed, runs[seed], args.config, args.extra, args.parallel)
        # Closed in finish(): the child writes to it while other seeds start.
        logs[seed] = open(runs[seed].parent / f"{name}-seed{seed}.log", "w")  # noqa: SIM115
        started[seed] = time.perf_counter()
        procs[seed] = subprocess.Popen(cmd, cwd=ROOT, stdout=logs[seed], stderr=subprocess.STDOUT)
        if not args.parallel:
            finish(seed)
    for seed in list(procs):
        finish(seed)
    rows.sort(key=lambda r: r["seed"])

    header = f"{'seed':>4} {'from mu':>8} {'sampled':>8} {'KL':>8} {'JS':>8} {'TV':>6} "
    header += f"{'wall s':>7} {'CPU s':>7}  goal"
    print(header)
    for r in rows:
        if "js" not in r:
            print(f"{r['seed']:>4} failed (exit {r['exit_code']}); see its log")
            continue
        print(
            f"{r['seed']:>4} {r['reconstructed']:>5}/{r['strings']:<2} "
            f"{r['sampled_reconstruction']:>8.4f} {r['kl']:>8.4f} {r['js']:>8.5f} {r['tv']:>6.3f} "
            f"{r['wall_seconds']:>7.0f} {r['cpu_seconds']:>7.0f}  "
            f"{'yes' if r['meets_goal'] else 'NO'}"
        )
    payload = {
        "benchmark": "synthetic_seeds",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "train_command": " ".join(
            _command(0, Path("OUT"), args.config, args.extra, args.parallel)[2:]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "parallel": args.parallel,
        "goal": {"reconstructed": "all 64", "js_at_most": GOAL_JS, "wall_s_at_most": GOAL_SECONDS},
        "note": "cpu_seconds = user + system time of the run (all its threads)",
        "rows": rows,
        "child_cpu_seconds_total": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0 if rows and all(r.get("meets_goal") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
