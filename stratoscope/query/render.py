"""A cookbook Result printed: a readable table (units from the query's declarations),
CSV or JSON (raw numbers in the declared unit, timestamps in ISO 8601)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stratoscope.query.cookbook import Result
from stratoscope.units import format_value

__all__ = ["to_csv", "to_json", "to_table"]

_RIGHT = {"count", "number", "ns", "us", "ms", "s", "bytes", "percent"}


def _unit(result: Result, row: tuple[Any, ...], i: int) -> str:
    """The unit of column i in ``row``: declared, or read from the column it names
    (``@unit``); a unit the formatter does not know (calls, requests) prints as a count."""
    unit = result.columns[i].unit
    if unit.startswith("@"):
        names = [c.name for c in result.columns]
        unit = str(row[names.index(unit[1:])])
    if unit in ("text", "timestamp", "percent", "bytes", "count", "number", "ns", "us", "ms", "s"):
        return unit
    return "count"


def to_table(result: Result, console: Console, title: str | None = None) -> None:
    table = Table(title=title, title_justify="left")
    for c in result.columns:
        right = c.unit in _RIGHT or c.unit.startswith("@")
        table.add_column(c.name, justify="right" if right else "left")
    for row in result.rows:
        table.add_row(*[escape(format_value(v, _unit(result, row, i))) for i, v in enumerate(row)])
    console.print(table)
    if not result.rows:
        console.print("(no rows)")
    if result.truncated:
        console.print(f"[yellow]only the first {len(result.rows):,} rows")


def _plain(result: Result, row: tuple[Any, ...]) -> list[Any]:
    out = []
    for i, v in enumerate(row):
        if result.columns[i].unit == "timestamp" and isinstance(v, (int, float)):
            v = datetime.fromtimestamp(v, UTC).isoformat().replace("+00:00", "Z")
        out.append(v)
    return out


def to_csv(result: Result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.name for c in result.columns])
    for row in result.rows:
        w.writerow(["" if v is None else v for v in _plain(result, row)])
    return buf.getvalue()


def to_json(result: Result) -> str:
    names = [c.name for c in result.columns]
    doc = {
        "query": result.query,
        "params": result.params,
        "columns": [{"name": c.name, "unit": c.unit} for c in result.columns],
        "rows": [dict(zip(names, _plain(result, row), strict=True)) for row in result.rows],
        "truncated": result.truncated,
    }
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"
