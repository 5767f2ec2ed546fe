"""Sanity anchor for the MOSES metrics: a random sample of the MOSES training split,
measured against the test sets, beside the "Train" row the MOSES authors publish
(README of github.com/molecularsets/moses, commit ffbc4db).

    .venv/bin/python benchmarks/moses_anchor.py [--n 10000] [--seed 0]

Writes benchmarks/results/moses_anchor.json. FCD is biased upwards for small
samples (the covariance estimate of 512 features), so a 10k sample reads
higher than MOSES's; the other metrics are means and barely depend on n.
"""

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

from ddvae_fast.seqvae.moses_data import load_split
from ddvae_fast.seqvae.moses_metrics import moses_metrics

# The MOSES authors' "Train" row (Novelty omitted: it is 0 by definition for a train sample).
PUBLISHED_TRAIN = {
    "valid": 1.0,
    "unique@1000": 1.0,
    "unique@10000": 1.0,
    "FCD/Test": 0.008,
    "FCD/TestSF": 0.4755,
    "SNN/Test": 0.6419,
    "SNN/TestSF": 0.5859,
    "Frag/Test": 1.0,
    "Frag/TestSF": 0.9986,
    "Scaf/Test": 0.9907,
    "Scaf/TestSF": 0.0,
    "IntDiv": 0.8567,
    "IntDiv2": 0.8508,
    "Filters": 1.0,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    train = load_split("train")
    sample = random.Random(args.seed).sample(train, args.n)
    start = time.perf_counter()
    ours = moses_metrics(sample, train=train, n_jobs=args.jobs)
    seconds = time.perf_counter() - start
    rows = [
        {"metric": k, "ours": ours[k], "moses_train_row": PUBLISHED_TRAIN.get(k)}
        for k in ours
        if k != "Novelty"
    ]
    for r in rows:
        print(f"{r['metric']:<12} {r['ours']:>8.4f} {r['moses_train_row']}")
    out = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "n": args.n,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    path = Path(__file__).parent / "results" / "moses_anchor.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
