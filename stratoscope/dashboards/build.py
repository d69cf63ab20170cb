"""Render the dashboards to JSON files, or check that the files on disk are current.

The JSON in deploy/grafana/dashboards/ is generated, never edited: review the Python,
rebuild, commit both. ``--check`` exits 1 naming the stale files (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stratoscope.dashboards.boards import dashboards

#: deploy/grafana/dashboards/ of this tree (stratoscope/deploy is a link to deploy/).
DEFAULT_OUT = (Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards").resolve()


def render(board: dict[str, Any]) -> str:
    """The text of one dashboard file: stable key order, two-space indent, final newline."""
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """File name -> text of every dashboard."""
    out = {}
    for d in dashboards():
        board = d.to_json()
        out[f"{board['uid'].removeprefix('stratoscope-')}.json"] = render(board)
    return out


def stale(out_dir: Path) -> list[str]:
    """Files that differ from the generator's output, are missing, or are not generated."""
    want = rendered()
    have = {p.name for p in out_dir.glob("*.json")} if out_dir.is_dir() else set()
    bad = [n for n, text in want.items() if n not in have or (out_dir / n).read_text() != text]
    return sorted(bad + sorted(have - set(want)))


def write(out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    want = rendered()
    for p in out_dir.glob("*.json"):
        if p.name not in want:
            p.unlink()
    for name, text in want.items():
        (out_dir / name).write_text(text)
    return sorted(want)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stratoscope.dashboards", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the dashboard files")
    ap.add_argument("--check", action="store_true", help="exit 1 if the files are not the generator's output")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        if bad:
            print(f"stratoscope: dashboards out of date in {args.out}: {', '.join(bad)} "
                  "(run: python -m stratoscope.dashboards)", file=sys.stderr)
            return 1
        return 0
    for name in write(args.out):
        print(args.out / name)
    return 0
