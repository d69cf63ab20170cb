"""The cookbook's header format: every packaged file parses, parameters bind typed."""

from __future__ import annotations

import pytest

from stratoscope.query.cookbook import CookbookError, bounded_call, cookbook, parse, plain_value
from stratoscope.units import UNITS

GOOD = """-- Title of it.
--
-- More words.
--
-- param: node String = ''    one node
-- param: pid UInt32 = 0
-- param: start Int64
-- column: name text
-- column: p99 ns
-- column: v @unit
-- column: unit text
SELECT 'x' AS name, 1 AS p99, 2 AS v, 'ns' AS unit
WHERE {node:String} = '' AND {pid:UInt32} = 0 AND {start:Int64} > 0
"""


def test_every_packaged_query_parses_with_units_and_a_title() -> None:
    book = cookbook()
    assert {"top_syscalls", "runqueue_by_container", "tcp_retransmits", "slowest_disks",
            "what_ran", "process_events", "flamegraph", "fleet_health"} <= set(book)
    for q in book.values():
        assert q.title and q.title.endswith(".")
        assert all(c.unit in UNITS or c.unit.startswith("@") for c in q.columns)
        assert {"start", "end"} <= {p.name for p in q.params}, q.name


def test_header_is_read() -> None:
    q = parse("good", GOOD)
    assert q.title == "Title of it." and q.description == "More words."
    assert [(p.name, p.type, p.default) for p in q.params] == [
        ("node", "String", ""), ("pid", "UInt32", 0), ("start", "Int64", None)]
    assert [(c.name, c.unit) for c in q.columns] == [
        ("name", "text"), ("p99", "ns"), ("v", "@unit"), ("unit", "text")]


def test_bind_converts_and_refuses() -> None:
    q = parse("good", GOOD)
    assert q.bind({"start": "17"}) == {"node": "", "pid": 0, "start": 17}
    assert q.bind({"start": 5, "pid": "42", "node": "n1"}) == {"node": "n1", "pid": 42, "start": 5}
    for values, message in [
        ({}, "needs parameter start"),
        ({"start": "x"}, "parameter start: expected an integer"),
        ({"start": 1, "pid": -1}, "parameter pid: -1 is outside UInt32"),
        ({"start": 1, "pid": str(1 << 32)}, "outside UInt32"),
        ({"start": 1, "sql": "DROP TABLE x"}, "has no parameter sql"),
        ({"start": 1, "node": "n" * 300}, "at most 256 characters"),
    ]:
        with pytest.raises(CookbookError, match=message):
            q.bind(values)


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("-- column: p99 ns", "-- column: p99 furlongs"), "unit 'furlongs'"),
    (GOOD.replace("param: pid UInt32", "param: pid Float64"), "parameter type 'Float64'"),
    (GOOD.replace("-- param: start Int64\n", ""), "differ from those declared"),
    (GOOD.replace("-- column: unit text\n", ""), "names no column"),
    (GOOD.replace("-- column:", "-- col:"), "no '-- column:' lines"),
    (GOOD.replace("-- param: start Int64", "-- param:start"), "cannot read"),
])
def test_bad_headers_are_refused_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse("bad", text)
    assert str(err.value).startswith("bad.sql")


def test_plain_values() -> None:
    from datetime import datetime

    assert plain_value(float("nan")) is None
    assert plain_value(datetime(1970, 1, 1, 0, 1)) == 60.0
    assert plain_value((1, [2.0, b"x"])) == [1, [2.0, "x"]]


def test_bounded_call_sends_only_max_execution_time() -> None:
    """A reader with readonly = 1 may change max_execution_time only (grants.sql):
    the row bound travels in the SQL as LIMIT max_rows + 1."""
    q = parse("good", GOOD + "-- trailing comment\n;\n")
    sql, params, settings = bounded_call(q, {"start": "5"}, max_rows=100, timeout_s=10.7)
    assert settings == {"max_execution_time": 10}
    assert params == {"node": "", "pid": 0, "start": 5}
    body = GOOD + "-- trailing comment"
    assert sql == f"SELECT * FROM (\n{body}\n) LIMIT 101"
    for q in cookbook().values():
        values = {p.name: 1 if p.type != "String" else "x" for p in q.params}
        _, _, settings = bounded_call(q, values, max_rows=5, timeout_s=0.2)
        assert settings == {"max_execution_time": 1}, q.name
