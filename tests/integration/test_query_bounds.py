"""Cookbook queries bounded on a real embedded ClickHouse (chdb): the row bound is a LIMIT
around the query (a readonly reader may change no setting but max_execution_time), cut
at exactly max_rows with ``truncated`` set, the query's own ORDER BY and SETTINGS kept."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stratoscope.query.cookbook import cookbook, parse, run
from stratoscope.regional.sinks.clickhouse import ClickHouseSink

NUMBERS = """-- Numbers, largest first.
--
-- param: n UInt32
-- column: v count
SELECT number AS v FROM numbers({n:UInt32})
ORDER BY v DESC
SETTINGS join_use_nulls = 0
-- a trailing comment;
"""


@pytest.fixture
async def sink(chdb_dir: str, anchor: Any) -> AsyncIterator[ClickHouseSink]:
    s = ClickHouseSink(f"chdb://{chdb_dir}", database=f"t_{uuid.uuid4().hex[:12]}")
    await s.start()
    yield s
    await s.stop()


class Recording:
    """The sink's query, remembering the settings each call sent."""

    def __init__(self, sink: ClickHouseSink) -> None:
        self.sink, self.settings = sink, []  # type: ignore[var-annotated]

    async def __call__(self, sql: str, params: dict[str, Any], settings: dict[str, Any]) -> Any:
        self.settings.append(settings)
        return await self.sink.query(sql, params, settings)


@pytest.mark.parametrize(("n", "rows", "truncated"), [(7, 5, True), (6, 5, True), (5, 5, False),
                                                        (3, 3, False), (0, 0, False)])
async def test_cut_at_max_rows_in_the_query_order(sink: ClickHouseSink, n: int, rows: int,
                                                  truncated: bool) -> None:
    runner = Recording(sink)
    result = await run(runner, parse("numbers", NUMBERS), {"n": n}, max_rows=5, timeout_s=10)
    assert result.rows == [(v,) for v in range(n - 1, n - 1 - rows, -1)]
    assert result.truncated is truncated
    assert runner.settings == [{"max_execution_time": 10}]


async def test_every_packaged_query_runs_wrapped(sink: ClickHouseSink) -> None:
    """On an empty store: the wrapper parses around every file (SETTINGS clauses,
    subqueries, comments) and ClickHouse accepts the bound parameters."""
    runner = Recording(sink)
    values = {"start": 0, "end": 1, "metric": "syscall_latency", "label": "syscall"}
    for q in cookbook().values():
        mine = {k: v for k, v in values.items() if k in {p.name for p in q.params}}
        result = await run(runner, q, mine, max_rows=10, timeout_s=5)
        assert result.rows == [] and not result.truncated, q.name
    assert runner.settings == [{"max_execution_time": 5}] * len(cookbook())
