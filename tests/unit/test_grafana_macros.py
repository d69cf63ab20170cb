"""The expansion of tests/grafana_macros.py against the plugin's own test cases.

Cases from grafana/clickhouse-datasource: pkg/macros/macros_test.go (backend macros)
and src/data/CHDatasource.test.ts (``$__conditionalAll``); formats from Grafana's
variable syntax documentation.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.grafana_macros import (
    ALL,
    QueryContext,
    Var,
    apply_conditional_all,
    expand_macros,
    interpolate,
    replace_variables,
)

FROM = datetime(2014, 11, 12, 11, 45, 26, 371000, tzinfo=UTC)
TO = datetime(2015, 11, 12, 11, 45, 26, 371000, tzinfo=UTC)
CTX = QueryContext(FROM, TO)
# TestInterpolate and TestInterpolateNestedMacros use .123 and .456
FROM2 = datetime(2014, 11, 12, 11, 45, 26, 123000, tzinfo=UTC)
TO2 = datetime(2015, 11, 12, 11, 45, 26, 456000, tzinfo=UTC)


@pytest.mark.parametrize(("sql", "want"), [
    ("$__fromTime", "toDateTime(1415792726)"),
    ("$__toTime", "toDateTime(1447328726)"),
    ("$__fromTime_ms", "fromUnixTimestamp64Milli(1415792726371)"),
    ("$__toTime_ms", "fromUnixTimestamp64Milli(1447328726371)"),
    ("$__dateFilter(dateCol)", "dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12')"),
    ("$__dateTimeFilter(dateCol, timeCol)",
     "(dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12')) AND "
     "(timeCol >= toDateTime(1415792726) AND timeCol <= toDateTime(1447328726))"),
    ("$__timeFrom(ts)", "ts >= toDateTime(1415792726)"),
    ("$__timeTo(ts)", "ts <= toDateTime(1447328726)"),
    ("$__timeGroup(ts, 5m)", "toStartOfInterval(toDateTime(ts), INTERVAL 300 second)"),
    ("$__timeGroup(ts, 1h)", "toStartOfInterval(toDateTime(ts), INTERVAL 3600 second)"),
])
def test_single_macros(sql: str, want: str) -> None:
    assert expand_macros(sql, CTX) == want


def test_interval_macros() -> None:
    ctx = QueryContext(FROM, TO, timedelta(seconds=20))
    assert expand_macros("$__timeInterval(col)", ctx) == "toStartOfInterval(toDateTime(col), INTERVAL 20 second)"
    assert expand_macros("$__timeInterval_ms(col)", ctx) == \
        "toStartOfInterval(toDateTime64(col, 3), INTERVAL 20000 millisecond)"
    assert expand_macros("$__interval_s", ctx) == "20"
    assert expand_macros("$__interval_s", CTX) == "1"  # at least one second


@pytest.mark.parametrize(("sql", "want"), [
    ("select * from foo where $__timeFilter(cast(sth as timestamp))",
     "select * from foo where cast(sth as timestamp) >= toDateTime(1415792726) AND cast(sth as timestamp) <= toDateTime(1447328726)"),
    ("select * from foo where $__timeFilter(cast(sth as timestamp) )",
     "select * from foo where cast(sth as timestamp) >= toDateTime(1415792726) AND cast(sth as timestamp) <= toDateTime(1447328726)"),
    ("select * from foo where $__timeFilter_ms(cast(sth as timestamp))",
     "select * from foo where cast(sth as timestamp) >= fromUnixTimestamp64Milli(1415792726123) AND cast(sth as timestamp) <= fromUnixTimestamp64Milli(1447328726456)"),
    ("select * from foo where ( date >= $__fromTime and date <= $__toTime ) limit 100",
     "select * from foo where ( date >= toDateTime(1415792726) and date <= toDateTime(1447328726) ) limit 100"),
    ("select * from foo where ( date >= $__fromTime_ms ) and ( date <= $__toTime_ms ) limit 100",
     "select * from foo where ( date >= fromUnixTimestamp64Milli(1415792726123) ) and ( date <= fromUnixTimestamp64Milli(1447328726456) ) limit 100"),
    # TestInterpolateNestedMacros (interval: one minute)
    ("SELECT $__timeInterval($__fromTime) AS from_time",
     "SELECT toStartOfInterval(toDateTime(toDateTime(1415792726)), INTERVAL 60 second) AS from_time"),
    ("SELECT $__timeInterval_ms($__fromTime_ms)",
     "SELECT toStartOfInterval(toDateTime64(fromUnixTimestamp64Milli(1415792726123), 3), INTERVAL 60000 millisecond)"),
    ("select * from foo where $__timeFilter(coalesce(closed_at, $__toTime))",
     "select * from foo where coalesce(closed_at, toDateTime(1447328726)) >= toDateTime(1415792726) AND coalesce(closed_at, toDateTime(1447328726)) <= toDateTime(1447328726)"),
    # TestInterpolateBackslashEscapedStringLiterals
    ("select * from foo where msg = 'it\\'s -- fine' and $__fromTime",
     "select * from foo where msg = 'it\\'s -- fine' and toDateTime(1415792726)"),
    # unknown macros stay; macros in literals and comments stay
    ("select $__unknown, '$__fromTime' -- $__toTime", "select $__unknown, '$__fromTime' -- $__toTime"),
])
def test_interpolate_cases_of_the_plugin(sql: str, want: str) -> None:
    assert expand_macros(sql, QueryContext(FROM2, TO2, timedelta(minutes=1))) == want


def test_wrong_argument_count_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\$__timeFilter expected 1 argument"):
        expand_macros("$__timeFilter()", CTX)


@pytest.mark.parametrize(("sql", "vars_", "want"), [
    ("$__conditionalAll(foo, $fieldVal)", {"fieldVal": Var(selected=("'val1', 'val2'",))}, "foo"),
    ("$__conditionalAll(foo, $fieldVal)", {"fieldVal": Var(selected=(ALL,))}, "1=1"),
    ("select stuff from table where $__conditionalAll(fieldVal in ($fieldVal), $fieldVal);",
     {"fieldVal": Var(selected=(ALL,))}, "select stuff from table where 1=1;"),
    ("select stuff from table where $__conditionalAll(fieldVal in ($fieldVal), $fieldVal);",
     {"fieldVal": Var(selected=("'val1', 'val2'",))}, "select stuff from table where fieldVal in ($fieldVal);"),
    ("select stuff from table where $__conditionalAll(fieldVal in ($fieldVal), $fieldVal) and "
     "$__conditionalAll(fieldVal in ($fieldVal2), $fieldVal2);",
     {"fieldVal": Var(selected=("'val1', 'val2'",)), "fieldVal2": Var(selected=(ALL,))},
     "select stuff from table where fieldVal in ($fieldVal) and 1=1;"),
])
def test_conditional_all_cases_of_the_plugin(sql: str, vars_: dict[str, Var], want: str) -> None:
    assert apply_conditional_all(sql, vars_) == want


def test_variable_formats() -> None:
    v = {"node": Var(("a", "b", "o'k"), ("a", "o'k")), "one": Var(("x", "y"), ("y",), multi=False),
         "all": Var(("p", "q"))}
    assert replace_variables("${node:singlequote}", v, {}) == "'a','o\\'k'"
    assert replace_variables("$node", v, {}) == "'a','o'k'"  # the plugin's format: quoted, not escaped
    assert replace_variables("${one}|[[one]]|${one:singlequote}", v, {}) == "y|y|'y'"
    assert replace_variables("${all:singlequote}", v, {}) == "'p','q'"  # All = every option
    assert replace_variables("$__timeFilter(ts) $resolution $missing", v, {"resolution": "60"}) == \
        "$__timeFilter(ts) 60 $missing"


def test_interpolate_runs_the_steps_in_the_plugins_order() -> None:
    sql = "WHERE $__conditionalAll(node IN (${node:singlequote}), $node) AND $__timeFilter(ts)"
    ctx = QueryContext(FROM, TO)
    assert interpolate(sql, ctx, {"node": Var(("a", "b"))}) == \
        "WHERE 1=1 AND ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726)"
    assert interpolate(sql, ctx, {"node": Var(("a", "b"), ("b",))}) == \
        "WHERE node IN ('b') AND ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726)"
