"""The read endpoint's bounds, on a real embedded ClickHouse (chdb) through the real
HTTP server: one query at a time (429 with Retry-After beyond), the slot held until the
store answers even after the caller got 504, only max_execution_time sent, idle
connections closed and connections beyond the bound refused.

The store's query is wrapped in a gate the test opens, so "a query still running" is a
state the test holds, not a race."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stratoscope.query.client import QueryTargetError, RegionalClient
from stratoscope.query.cookbook import lookup
from stratoscope.regional.queryapi import RETRY_AFTER_S, QueryApi
from stratoscope.regional.sinks.clickhouse import ClickHouseSink

PATH = "/query/fleet_health?start=0&end=1"


@pytest.fixture
async def sink(chdb_dir: str, anchor: Any) -> AsyncIterator[ClickHouseSink]:
    s = ClickHouseSink(f"chdb://{chdb_dir}", database=f"t_{uuid.uuid4().hex[:12]}")
    await s.start()
    yield s
    await s.stop()


class Gated:
    """The sink's query, run once the test opens the gate; remembers the settings sent."""

    def __init__(self, sink: ClickHouseSink) -> None:
        self.sink = sink
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.answered = 0
        self.settings: list[dict[str, Any] | None] = []

    async def __call__(self, sql: str, params: dict[str, Any] | None,
                       settings: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        self.settings.append(settings)
        self.entered.set()
        await self.gate.wait()
        rows = await self.sink.query(sql, params, settings)
        self.answered += 1
        return rows


def get(port: int, path: str = PATH) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


async def wait_until(what: str, check: Any, deadline_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        if loop.time() > end:
            pytest.fail(f"timed out after {deadline_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def count(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("stratoscope_regional_query_requests_total",
                                      {"query": "fleet_health", "outcome": outcome})
    return value or 0.0


async def test_one_query_at_a_time_and_the_slot_held_past_a_504(sink: ClickHouseSink) -> None:
    registry = CollectorRegistry()
    gated = Gated(sink)
    api = QueryApi("127.0.0.1:0", gated, registry, timeout_s=1, answer_grace_s=0.5)
    port = await api.start()
    try:
        first = asyncio.create_task(asyncio.to_thread(get, port))
        await asyncio.wait_for(gated.entered.wait(), 30)
        status, body, headers = await asyncio.to_thread(get, port)
        assert status == 429 and headers["Retry-After"] == str(RETRY_AFTER_S), body
        assert count(registry, "busy") == 1
        status, body, _ = await asyncio.wait_for(first, 30)  # the caller gives up ...
        assert status == 504 and "no answer from the store within 1.5 s" in body["error"]
        assert count(registry, "timeout") == 1
        status, _, _ = await asyncio.to_thread(get, port)  # ... the store has not answered
        assert status == 429 and count(registry, "busy") == 2
        assert api.running == 1
        gated.gate.set()
        await wait_until("the store's answer to free the slot", lambda: api.running == 0)
        assert gated.answered == 1
        status, body, _ = await asyncio.to_thread(get, port)
        assert status == 200 and body["rows"] == [] and body["truncated"] is False
        assert count(registry, "ok") == 1
        assert gated.settings == [{"max_execution_time": 1}] * 2
    finally:
        gated.gate.set()
        await api.stop()


async def test_connections_time_out_and_are_bounded(sink: ClickHouseSink) -> None:
    registry = CollectorRegistry()
    api = QueryApi("127.0.0.1:0", sink.query, registry, connection_timeout_s=1, max_connections=2)
    port = await api.start()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        for s in idle:
            s.sendall(b"GET /quer")  # half a request, then nothing
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            answer = third.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.0 503 ") and b"too many connections" in answer
        assert registry.get_sample_value(
            "stratoscope_regional_query_connections_refused_total") == 1
        for s in idle:  # the server closes an idle connection after its timeout
            s.settimeout(30)
            assert await asyncio.to_thread(s.recv, 1024) == b""
        status, _, _ = await asyncio.to_thread(get, port)
        assert status == 200
    finally:
        for s in idle:
            s.close()
        await api.stop()


async def test_the_command_waits_out_a_busy_endpoint(sink: ClickHouseSink) -> None:
    """``stratoscope query`` through the regional retries a 429 after its Retry-After
    for up to busy_wait_s; past that it is one message."""
    registry = CollectorRegistry()
    gated = Gated(sink)
    api = QueryApi("127.0.0.1:0", gated, registry)
    port = await api.start()
    q, values = lookup("fleet_health"), {"start": 0, "end": 1}
    try:
        first = asyncio.create_task(asyncio.to_thread(get, port))
        await asyncio.wait_for(gated.entered.wait(), 30)
        with pytest.raises(QueryTargetError, match="still busy after 0 s"):
            await asyncio.to_thread(RegionalClient(f"127.0.0.1:{port}", busy_wait_s=0).run, q, values)
        waiting = asyncio.create_task(asyncio.to_thread(
            RegionalClient(f"127.0.0.1:{port}", busy_wait_s=60).run, q, values))
        await wait_until("the waiting command to be answered 429", lambda: count(registry, "busy") >= 2)
        gated.gate.set()
        assert (await asyncio.wait_for(first, 30))[0] == 200
        result = await asyncio.wait_for(waiting, 60)
        assert result.rows == [] and not result.truncated
        assert count(registry, "ok") == 2
    finally:
        gated.gate.set()
        await api.stop()
