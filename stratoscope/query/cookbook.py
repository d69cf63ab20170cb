"""The cookbook: one SQL file per question (deploy/clickhouse/queries/*.sql), each with a
header declaring its parameters and the unit of each output column.

The header is SQL comments, so every file still runs as it is in any ClickHouse client::

    -- param: node String = ''    one node; '' = every node
    -- param: start Int64         windows starting at or after (Unix seconds)
    -- column: p99 ns
    -- column: p99 @unit          (the unit is in the row's column "unit")

Parameters are bound server-side (``{node:String}``), never spliced into the SQL, and
only the declared ones are accepted, each converted to its declared type first: that is
what lets a regional run cookbook queries for anyone who can reach it without running
arbitrary SQL. Units drive the formatting (stratoscope/units.py), never a guess from the
column name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from stratoscope.resources import clickhouse_dir
from stratoscope.units import UNITS

__all__ = [
    "Column",
    "CookbookError",
    "Param",
    "Query",
    "Result",
    "bounded_call",
    "cookbook",
    "plain_value",
    "run",
]

#: Parameter types a cookbook file may declare, with their bounds.
_INT_RANGES = {
    "Int64": (-(1 << 63), (1 << 63) - 1),
    "UInt32": (0, (1 << 32) - 1),
    "UInt64": (0, (1 << 64) - 1),
}
TYPES = ("String", *_INT_RANGES)
#: Longest string parameter accepted (a node, a comm, a metric name).
MAX_STRING = 256

_PARAM = re.compile(r"^--\s*param:\s*(\w+)\s+(\w+)(?:\s*=\s*('[^']*'|-?\d+))?\s*(.*)$")
_COLUMN = re.compile(r"^--\s*column:\s*(\w+)\s+(@?\w+)\s*(.*)$")
_PLACEHOLDER = re.compile(r"\{(\w+):(\w+)\}")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class CookbookError(ValueError):
    """A query name or parameter a person can fix (unknown name, bad value)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | int | None  # None: required
    help: str = ""

    def convert(self, value: Any) -> str | int:
        """``value`` (text from a command line or URL, or a number) as this type, or
        CookbookError naming the parameter."""
        if self.type == "String":
            text = str(value)
            if len(text) > MAX_STRING or "\x00" in text:
                raise CookbookError(f"parameter {self.name}: at most {MAX_STRING} characters, no NUL")
            return text
        lo, hi = _INT_RANGES[self.type]
        try:
            number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
        except ValueError:
            raise CookbookError(f"parameter {self.name}: expected an integer ({self.type}), "
                                f"got {value!r}") from None
        if not lo <= number <= hi:
            raise CookbookError(f"parameter {self.name}: {number} is outside {self.type}")
        return number


@dataclass(frozen=True)
class Column:
    name: str
    #: One of stratoscope.units.UNITS, or "@col": the unit named in the row's column col.
    unit: str


@dataclass(frozen=True)
class Query:
    name: str
    title: str
    description: str
    sql: str
    params: tuple[Param, ...]
    columns: tuple[Column, ...]

    def bind(self, values: Mapping[str, Any]) -> dict[str, str | int]:
        """Every declared parameter, converted: ``values`` laid over the defaults. An
        undeclared or missing one is a CookbookError."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CookbookError(f"query {self.name} has no parameter {', '.join(unknown)} "
                                f"(it takes: {', '.join(known)})")
        out: dict[str, str | int] = {}
        for p in self.params:
            if p.name in values and values[p.name] is not None:
                out[p.name] = p.convert(values[p.name])
            elif p.default is not None:
                out[p.name] = p.default
            else:
                raise CookbookError(f"query {self.name} needs parameter {p.name} ({p.type})")
        return out

    def describe(self) -> dict[str, Any]:
        """What a client needs to know of the query (the read endpoint's /queries)."""
        return {
            "name": self.name, "title": self.title,
            "params": [{"name": p.name, "type": p.type, "default": p.default, "help": p.help}
                       for p in self.params],
            "columns": [{"name": c.name, "unit": c.unit} for c in self.columns],
        }


@dataclass
class Result:
    """Rows of a cookbook query and the columns they have, in order."""

    query: str
    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]
    #: True when the rows were cut at the row limit.
    truncated: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def plain_value(value: Any) -> Any:
    """A ClickHouse value as plain JSON data: datetimes as Unix seconds, NaN as None,
    tuples as lists. Both ways of reading (the regional's endpoint and a server read
    directly) hand rows over in this form, so they print the same."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    return value


def parse(name: str, text: str) -> Query:
    """The Query a cookbook file holds; ValueError naming the file and line on a bad header."""
    where = f"{name}.sql"
    if not _NAME.match(name):
        raise ValueError(f"{where}: query names are lower_snake_case")
    comments: list[str] = []
    params: list[Param] = []
    columns: list[Column] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.startswith("--"):
            break
        if m := _PARAM.match(line):
            pname, ptype, default, help_ = m.groups()
            if ptype not in TYPES:
                raise ValueError(f"{where}:{lineno}: parameter type {ptype!r} (known: {', '.join(TYPES)})")
            value: str | int | None = None
            if default is not None:
                value = default[1:-1] if default.startswith("'") else int(default)
            params.append(Param(pname, ptype, value, help_.strip()))
        elif m := _COLUMN.match(line):
            cname, unit, _ = m.groups()
            if not unit.startswith("@") and unit not in UNITS:
                raise ValueError(f"{where}:{lineno}: unit {unit!r} (known: {', '.join(UNITS)}, @column)")
            columns.append(Column(cname, unit))
        elif re.match(r"^--\s*(param|column)\b", line):
            raise ValueError(f"{where}:{lineno}: cannot read {line!r}")
        else:
            comments.append(line[2:].strip())
    if not columns:
        raise ValueError(f"{where}: no '-- column:' lines")
    names = [c.name for c in columns]
    for c in columns:
        if c.unit.startswith("@") and c.unit[1:] not in names:
            raise ValueError(f"{where}: column {c.name}'s unit {c.unit} names no column")
    used: dict[str, str] = {}
    for pname, ptype in _PLACEHOLDER.findall(text):
        if used.setdefault(pname, ptype) != ptype:
            raise ValueError(f"{where}: {{{pname}}} is used with two types")
    declared = {p.name: p.type for p in params}
    if used != declared:
        raise ValueError(f"{where}: parameters used {used} differ from those declared {declared}")
    title, _, rest = "\n".join(comments).strip().partition("\n\n")
    return Query(name, " ".join(title.split()), rest.strip(), text, tuple(params), tuple(columns))


def load(directory: Path) -> dict[str, Query]:
    """Every cookbook file of ``directory``, by name."""
    return {p.stem: parse(p.stem, p.read_text()) for p in sorted(directory.glob("*.sql"))}


@cache
def cookbook() -> dict[str, Query]:
    """The packaged cookbook (deploy/clickhouse/queries/)."""
    return load(clickhouse_dir("queries"))


def lookup(name: str) -> Query:
    """The query called ``name``, or CookbookError listing the known ones."""
    book = cookbook()
    if name not in book:
        raise CookbookError(f"no query named {name!r}; known: {', '.join(book)}")
    return book[name]


#: Run SQL with server-side parameters and ClickHouse settings; rows back.
SqlRunner = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[list[tuple[Any, ...]]]]


def bounded_call(query: Query, values: Mapping[str, Any], *, max_rows: int,
                 timeout_s: float) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The SQL, bound parameters and ClickHouse settings that run ``query`` bounded to
    ``max_rows`` + 1 rows and ``timeout_s`` of server time.

    The row bound is a ``LIMIT`` around the query, not ``max_result_rows``: a reader
    with ``readonly = 1`` (deploy/clickhouse/access/grants.sql) may change no setting but
    ``max_execution_time`` (CHANGEABLE_IN_READONLY), so that is the only one sent. One
    row past ``max_rows`` says the result was cut. ClickHouse stops reading once the
    limit is reached, so the rows are cut on the server, not buffered here.
    """
    params = query.bind(values)
    body = query.sql.rstrip().rstrip(";").rstrip()
    # The newline before ")" ends a trailing "-- comment" of the query's last line.
    sql = f"SELECT * FROM (\n{body}\n) LIMIT {int(max_rows) + 1}"
    return sql, params, {"max_execution_time": max(1, int(timeout_s))}


async def run(runner: SqlRunner, query: Query, values: Mapping[str, Any], *, max_rows: int,
              timeout_s: float) -> Result:
    """Run ``query`` bound to ``values`` through ``runner``, at most ``max_rows`` rows and
    ``timeout_s`` of server time (ClickHouse enforces both: the rows are cut, not
    buffered, and a long query is stopped rather than abandoned; see bounded_call)."""
    sql, params, settings = bounded_call(query, values, max_rows=max_rows, timeout_s=timeout_s)
    rows = await runner(sql, params, settings)
    truncated = len(rows) > max_rows
    return Result(query.name, query.columns, [tuple(plain_value(v) for v in r) for r in rows[:max_rows]],
                  truncated, params)
