"""What Grafana and the ClickHouse datasource plugin do to a panel's SQL before ClickHouse sees it.

A pure-Python port, for running the dashboards' SQL without a Grafana server, of:

1. the plugin's ``applyConditionalAll`` (src/data/CHDatasource.ts): the LAST
   ``$__conditionalAll(cond, $var)`` first, its arguments split on commas at bracket
   depth 1, replaced by ``1=1`` when the variable's current value is ``$__all`` or
   empty, else by ``cond`` verbatim;
2. Grafana's template variable replacement with the plugin's format function:
   ``$var``, ``${var}``, ``${var:format}``, ``[[var]]``; "All" without a custom all
   value stands for every option; the plugin formats a list as ``'a','b'`` and a single
   value raw; ``singlequote`` quotes each value (``'`` escaped as ``\\'``) and joins
   with commas; names that are not variables are left alone (``$__timeFilter``);
3. the backend's macros (pkg/macros/macros.go on grafana/macropro): ``$__name`` and
   ``$__name(args)``, arguments trimmed, nested macros expanded innermost first,
   string literals and comments left alone, unknown macros unchanged.

Checked against the plugin's own test cases in tests/unit/test_grafana_macros.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

ALL = "$__all"


@dataclass(frozen=True)
class Var:
    """A dashboard variable: its options and what is selected (``[ALL]`` for All)."""

    options: tuple[str, ...] = ()
    selected: tuple[str, ...] = (ALL,)
    multi: bool = True

    def value(self) -> str | list[str]:
        if self.selected == (ALL,):
            return list(self.options)
        if self.multi:
            return list(self.selected)
        return self.selected[0]

    def current(self) -> str:
        """``current.value.toString()`` in the browser (an array joins with commas)."""
        return ",".join(self.selected)


# -- 1. $__conditionalAll ---------------------------------------------------------------

def _macro_args(query: str, args_index: int) -> list[str]:
    """getMacroArgs: split at commas of bracket depth 1, up to the bracket closing depth 0."""
    args: list[str] = []
    depth, last = 0, 1
    sub = query[args_index:]
    for m in re.finditer(r"[(),]", sub):
        c = m.group(0)
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "," and depth == 1:
            args.append(sub[last:m.end() - 1])
            last = m.end()
        if depth == 0:
            args.append(sub[last:m.end() - 1])
            return args
    return []


def apply_conditional_all(raw: str, variables: Mapping[str, Var]) -> str:
    macro = "$__conditionalAll("
    i = raw.rfind(macro)
    while i != -1:
        params = _macro_args(raw, i + len(macro) - 1)
        if len(params) != 2:
            return raw
        found = re.search(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+", params[1].strip())
        phrase = params[0]
        if found:
            var = variables.get(found.group(0))
            value = var.current() if var is not None else ""
            if value in ("", ALL):
                phrase = "1=1"
        raw = raw.replace(f"{macro}{params[0]},{params[1]})", phrase, 1)
        i = raw.rfind(macro)
    return raw


# -- 2. template variables ----------------------------------------------------------------

_VAR_RE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def _singlequote(v: str) -> str:
    return "'" + v.replace("'", "\\'") + "'"


def _format(value: str | list[str], fmt: str | None) -> str:
    if fmt is None:  # the plugin's format function
        return "'" + "','".join(value) + "'" if isinstance(value, list) else value
    values = value if isinstance(value, list) else [value]
    if fmt == "singlequote":
        return ",".join(_singlequote(v) for v in values)
    if fmt in ("csv", "raw"):
        return ",".join(values)
    raise ValueError(f"format {fmt!r} is not implemented here")


def replace_variables(raw: str, variables: Mapping[str, Var], constants: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name in constants:
            return constants[name]
        var = variables.get(name)
        if var is None:
            return m.group(0)
        return _format(var.value(), fmt)

    return _VAR_RE.sub(sub, raw)


# -- 3. backend macros ---------------------------------------------------------------------

@dataclass(frozen=True)
class QueryContext:
    """The time range and interval Grafana sends with a query."""

    time_from: datetime
    time_to: datetime
    interval: timedelta = timedelta(0)


def _dt(t: datetime) -> str:
    return f"toDateTime({int(t.timestamp())})"


def _dt64(t: datetime) -> str:
    ms = int(t.replace(microsecond=0).timestamp()) * 1000 + t.microsecond // 1000  # Go's UnixMilli
    return f"fromUnixTimestamp64Milli({ms})"


def _date(t: datetime) -> str:
    return f"toDate('{t.astimezone(UTC).strftime('%Y-%m-%d')}')"


def _need(name: str, args: Sequence[str], n: int) -> None:
    if len(args) != n:
        raise ValueError(f"$__{name} expected {n} argument(s), received {len(args)}")


def _secs(ctx: QueryContext) -> int:
    return int(max(ctx.interval.total_seconds(), 1))


def _time_group(ctx: QueryContext, a: Sequence[str]) -> str:
    _need("timeGroup", a, 2)
    period = a[1].strip().strip("'\"")
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", period)
    if not m:
        raise ValueError(f"$__timeGroup: invalid interval {period!r}")
    secs = round(int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)])
    if secs <= 0:
        raise ValueError(f"$__timeGroup: interval must be positive, got {period!r}")
    return f"toStartOfInterval(toDateTime({a[0].strip()}), INTERVAL {secs} second)"


def _filter(name: str, conv: Callable[[datetime], str]) -> Callable[[QueryContext, Sequence[str]], str]:
    def f(ctx: QueryContext, a: Sequence[str]) -> str:
        _need(name, a, 1)
        return f"{a[0]} >= {conv(ctx.time_from)} AND {a[0]} <= {conv(ctx.time_to)}"
    return f


def _date_time_filter(ctx: QueryContext, a: Sequence[str]) -> str:
    _need("dateTimeFilter", a, 2)
    d, t = a
    return (f"({d} >= {_date(ctx.time_from)} AND {d} <= {_date(ctx.time_to)}) AND "
            f"({t} >= {_dt(ctx.time_from)} AND {t} <= {_dt(ctx.time_to)})")


def _one(name: str, f: Callable[[QueryContext, str], str]) -> Callable[[QueryContext, Sequence[str]], str]:
    def g(ctx: QueryContext, a: Sequence[str]) -> str:
        _need(name, a, 1)
        return f(ctx, a[0])
    return g


MACROS: dict[str, Callable[[QueryContext, Sequence[str]], str]] = {
    "timeFilter": _filter("timeFilter", _dt),
    "timeFilter_ms": _filter("timeFilter_ms", _dt64),
    "dateFilter": _filter("dateFilter", _date),
    "dateTimeFilter": _date_time_filter,
    "dt": _date_time_filter,
    "timeFrom": _one("timeFrom", lambda c, col: f"{col} >= {_dt(c.time_from)}"),
    "timeTo": _one("timeTo", lambda c, col: f"{col} <= {_dt(c.time_to)}"),
    "timeGroup": _time_group,
    "fromTime": lambda c, a: _dt(c.time_from),
    "toTime": lambda c, a: _dt(c.time_to),
    "fromTime_ms": lambda c, a: _dt64(c.time_from),
    "toTime_ms": lambda c, a: _dt64(c.time_to),
    "timeInterval": _one("timeInterval", lambda c, col:
                         f"toStartOfInterval(toDateTime({col}), INTERVAL {_secs(c)} second)"),
    "timeInterval_ms": _one("timeInterval_ms", lambda c, col:
                            f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL "
                            f"{int(max(c.interval.total_seconds() * 1000, 1))} millisecond)"),
    "interval_s": lambda c, a: str(_secs(c)),
}


def _skip_quoted(s: str, i: int) -> int:
    q = s[i]
    j = i + 1
    while j < len(s):
        if s[j] == "\\" and j + 1 < len(s):
            j += 2
        elif s[j] == q:
            if j + 1 < len(s) and s[j + 1] == q:
                j += 2
                continue
            return j + 1
        else:
            j += 1
    return len(s)


def _close_paren(s: str, open_at: int) -> int:
    depth, i = 0, open_at
    while i < len(s):
        c = s[i]
        if c in "'\"`":
            i = _skip_quoted(s, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced parentheses in macro arguments")


def _split_args(raw: str) -> list[str]:
    if not raw.strip():
        return []
    args, depth, start, i = [], 0, 0, 0
    while i < len(raw):
        c = raw[i]
        if c in "'\"`":
            i = _skip_quoted(raw, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(raw[start:i].strip())
            start = i + 1
        i += 1
    return args + [raw[start:].strip()]


def expand_macros(sql: str, ctx: QueryContext) -> str:
    out: list[str] = []
    i = 0
    while i < len(sql):
        c = sql[i]
        if c in "'\"`":
            j = _skip_quoted(sql, i)
            out.append(sql[i:j])
            i = j
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            j = len(sql) if j == -1 else j
            out.append(sql[i:j])
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i)
            j = len(sql) if j == -1 else j + 2
            out.append(sql[i:j])
            i = j
        elif sql.startswith("$__", i):
            m = re.match(r"\$__(\w+)", sql[i:])
            assert m is not None
            name, end = m.group(1), i + m.end()
            handler = MACROS.get(name)
            if handler is None:
                out.append(m.group(0))
                i = end
                continue
            if end < len(sql) and sql[end] == "(":
                close = _close_paren(sql, end)
                args = _split_args(expand_macros(sql[end + 1:close], ctx))
                out.append(handler(ctx, args))
                i = close + 1
            else:
                out.append(handler(ctx, []))
                i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def interpolate(sql: str, ctx: QueryContext, variables: Mapping[str, Var],
                constants: Mapping[str, str] | None = None) -> str:
    """The SQL ClickHouse receives for a panel: browser steps, then the backend's macros."""
    sql = apply_conditional_all(sql, variables)
    sql = replace_variables(sql, variables, constants or {})
    return expand_macros(sql, ctx)


def grafana_interval(time_from: datetime, time_to: datetime, max_data_points: int = 1000) -> timedelta:
    """Roughly Grafana's $__interval: the range over the panel's points, at least 1 s."""
    secs = (time_to - time_from).total_seconds() / max_data_points
    return timedelta(seconds=max(1, math.ceil(secs)))
