"""The regional's read endpoint: named cookbook queries over HTTP, run by the ClickHouse sink.

An embedded store (chdb) belongs to the one process that opened it, the regional's
ClickHouse sink process, so ``stratoscope query`` reads it through here while the
regional runs. Only cookbook queries (deploy/clickhouse/queries/) with their declared,
typed parameters run: there is no way to send SQL, which keeps the endpoint read-only by
construction. Results are bounded in rows (ClickHouse cuts them) and time (ClickHouse
stops the query; the answer is 504 if the sink does not answer in time), at most
``max_concurrent`` queries run at once (more get 503), and every request is counted by
query and outcome. It listens on loopback unless told otherwise (``query_listen``).

    GET /queries                   the cookbook: names, parameters, column units
    GET /query/NAME?node=n1&start=1765000000&end=1765003600
                                   {"query", "columns": [{"name", "unit"}], "rows", "truncated"}

Errors are JSON ``{"error": "...", ...}`` with 400 (bad parameter), 404 (unknown query,
with ``"queries"``: the known names), 503 (busy), 504 (timeout), 502 (the store failed).
Timestamps travel as Unix seconds, NaN as null.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from prometheus_client import CollectorRegistry, Counter

from stratoscope.query.cookbook import CookbookError, Query, Result, cookbook, plain_value, run

log = logging.getLogger("stratoscope.regional.query")

#: Rows one answer may hold; a flame graph of a busy fleet hour has tens of thousands.
MAX_ROWS = 100_000
#: Server time one query may take.
TIMEOUT_S = 30.0
#: Queries running at once; more are answered 503 at once (never queued unbounded).
MAX_CONCURRENT = 4

SqlQuery = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], Awaitable[list[tuple[Any, ...]]]]


def result_json(result: Result) -> dict[str, Any]:
    return {
        "query": result.query,
        "columns": [{"name": c.name, "unit": c.unit} for c in result.columns],
        "rows": [[plain_value(v) for v in row] for row in result.rows],
        "truncated": result.truncated,
        "params": result.params,
    }


class _HttpError(Exception):
    def __init__(self, status: int, body: dict[str, Any], outcome: str) -> None:
        super().__init__(body.get("error", ""))
        self.status, self.body, self.outcome = status, body, outcome


class QueryApi:
    """The HTTP server (a thread of the regional process) and the queries it runs on the
    regional's event loop through ``query`` (the ClickHouse sink's)."""

    def __init__(self, listen: str, query: SqlQuery, registry: CollectorRegistry, *,
                 max_rows: int = MAX_ROWS, timeout_s: float = TIMEOUT_S,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._query = query
        self.max_rows, self.timeout_s = max_rows, timeout_s
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.requests = Counter(
            "stratoscope_regional_query_requests", "Read-endpoint requests by query and outcome "
            "(ok, bad_request, unknown_query, busy, timeout, failed).", ["query", "outcome"],
            registry=registry)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        """Listen (OSError if the address is taken) and serve in a thread; the bound port."""
        self._loop = asyncio.get_running_loop()
        api = self

        class Handler(_Handler):
            owner = api

        try:
            server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:  # the message names the setting to change
            raise OSError(exc.errno, f"read endpoint {self.host}:{self.port} (query_listen): "
                                     f"{exc.strerror}") from None
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="query-api", daemon=True)
        self._thread.start()
        log.info("read endpoint on http://%s:%d (cookbook queries only)", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop serving; idempotent, safe without start()."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    # -- called from the HTTP threads --------------------------------------

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for a GET of ``path``; counts the request."""
        url = urlsplit(path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["queries"]:
            return 200, {"queries": [q.describe() for q in cookbook().values()]}
        if len(parts) != 2 or parts[0] != "query":
            return 404, {"error": f"no such path {url.path!r}; GET /queries or /query/NAME"}
        name = parts[1]
        label = name if name in cookbook() else "unknown"
        try:
            body = self._run(name, url.query)
        except _HttpError as exc:
            self.requests.labels(label, exc.outcome).inc()
            return exc.status, exc.body
        self.requests.labels(label, "ok").inc()
        return 200, body

    def _run(self, name: str, query_string: str) -> dict[str, Any]:
        book = cookbook()
        if name not in book:
            raise _HttpError(404, {"error": f"no query named {name!r}", "queries": list(book)},
                             "unknown_query")
        pairs = parse_qsl(query_string, keep_blank_values=True, strict_parsing=False)
        values: dict[str, str] = {}
        for k, v in pairs:
            if k in values:
                raise _HttpError(400, {"error": f"parameter {k} given twice"}, "bad_request")
            values[k] = v
        query = book[name]
        try:
            query.bind(values)
        except CookbookError as exc:
            raise _HttpError(400, {"error": str(exc)}, "bad_request") from None
        if not self._slots.acquire(blocking=False):
            raise _HttpError(503, {"error": "too many queries at once; retry shortly"}, "busy")
        try:
            return self._on_loop(query, values)
        finally:
            self._slots.release()

    def _on_loop(self, query: Query, values: dict[str, str]) -> dict[str, Any]:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise _HttpError(503, {"error": "the regional is stopping"}, "busy")

        async def go() -> Result:
            return await asyncio.wait_for(
                run(self._query, query, values, max_rows=self.max_rows, timeout_s=self.timeout_s),
                self.timeout_s + 5)

        future = asyncio.run_coroutine_threadsafe(go(), loop)
        try:
            result = future.result(self.timeout_s + 10)
        except TimeoutError:
            future.cancel()
            raise _HttpError(504, {"error": f"query {query.name} took longer than "
                                            f"{self.timeout_s:g} s"}, "timeout") from None
        except CookbookError as exc:
            raise _HttpError(400, {"error": str(exc)}, "bad_request") from None
        except Exception as exc:  # the store's error, as text: the caller can act on it
            log.warning("query %s failed: %s", query.name, exc)
            raise _HttpError(502, {"error": f"query {query.name} failed: {exc}"}, "failed") from None
        return result_json(result)


class _Handler(BaseHTTPRequestHandler):
    owner: QueryApi
    server_version = "stratoscope-query"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, body = self.owner.answer(self.path)
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)
