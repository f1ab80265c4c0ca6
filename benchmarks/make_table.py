"""Collect benchmarks/results/*.json into benchmarks/results/RESULTS.md (included in the docs)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and len(v) > 12:
            out[key] = f"[{len(v)} values]"
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def main() -> None:
    """Write RESULTS.md from every JSON result file."""
    lines = [
        "# Benchmark results",
        "",
        f"Generated {date.today():%Y-%m-%d} by `benchmarks/make_table.py`.",
        "",
    ]
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        lines.append("No results yet: run `make bench`.")
    for path in files:
        data = json.loads(path.read_text())
        lines += [f"## {path.stem}", ""]
        md = RESULTS / f"{path.stem}.md"
        if md.exists():  # a benchmark that writes its own table
            lines += [md.read_text().strip(), ""]
            continue
        flat = _flatten(data)
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        lines.append("")
    (RESULTS / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
