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


def render(name: str) -> str:
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text())
    rows = data["rows"]
    columns = data.get("columns") or list(rows[0]) if rows else []
    lines = [
        f"*{data.get('machine', 'unknown machine')}, {data.get('date', 'undated')}; "
        f"`{data.get('command', '')}` (benchmarks/results/{name}.json)*",
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
