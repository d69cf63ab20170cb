"""The regional's read endpoint: named cookbook queries over HTTP, run by the ClickHouse sink.

An embedded store (chdb) belongs to the one process that opened it, the regional's
ClickHouse sink process, so ``stratoscope query`` reads it through here while the
regional runs. Only cookbook queries (deploy/clickhouse/queries/) with their declared,
typed parameters run: there is no way to send SQL, which keeps the endpoint read-only by
construction.

Reads share the sink with the inserts: the sink process answers one request at a time,
so a query running there holds up the deliveries behind it. Hence the bounds. Rows:
a LIMIT around the query (cookbook.bounded_call). Server time: ``max_execution_time``
(10 s by default) sent with every query, so ClickHouse itself stops it. Queries at once:
``max_concurrent`` (1 by default, setting ``query_max_concurrent``); a query holds its
slot until the sink process answers it, even after its caller was answered 504, so a
reader that gives up cannot pile more work onto the sink; others meanwhile are answered
429 with Retry-After. Connections: each socket times out after ``CONNECTION_TIMEOUT_S``
idle, and at most ``MAX_CONNECTIONS`` are served at once (more are answered 503 and
closed). Every request is counted by query and outcome. It listens on loopback unless
told otherwise (``query_listen``).

    GET /queries                   the cookbook: names, parameters, column units
    GET /query/NAME?node=n1&start=1765000000&end=1765003600
                                   {"query", "columns": [{"name", "unit"}], "rows", "truncated"}

Errors are JSON ``{"error": "...", ...}`` with 400 (bad parameter), 404 (unknown query,
with ``"queries"``: the known names), 429 (a query is running; Retry-After), 503 (the
regional is stopping, or too many connections), 504 (no answer in time), 502 (the store
failed). Timestamps travel as Unix seconds, NaN as null.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
#: Server time one query may take (max_execution_time): the sink's inserts wait meanwhile.
TIMEOUT_S = 10.0
#: How long past TIMEOUT_S a caller waits for the sink's answer before a 504 (a query
#: first waits for the delivery the sink is busy with).
ANSWER_GRACE_S = 5.0
#: Queries running at once (setting query_max_concurrent); more are answered 429.
MAX_CONCURRENT = 1
#: Seconds a 429 asks the caller to wait (Retry-After).
RETRY_AFTER_S = 2
#: Seconds a connection may sit idle in a read or write before it is closed.
CONNECTION_TIMEOUT_S = 10.0
#: Connections served at once (one thread each); more are answered 503 and closed.
MAX_CONNECTIONS = 16

SqlQuery = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], Awaitable[list[tuple[Any, ...]]]]

_TOO_MANY_CONNECTIONS = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: %d\r\nConnection: close\r\n\r\n"
    b'{"error":"too many connections to the read endpoint; retry shortly"}' % RETRY_AFTER_S)


def result_json(result: Result) -> dict[str, Any]:
    return {
        "query": result.query,
        "columns": [{"name": c.name, "unit": c.unit} for c in result.columns],
        "rows": [[plain_value(v) for v in row] for row in result.rows],
        "truncated": result.truncated,
        "params": result.params,
    }


class _HttpError(Exception):
    def __init__(self, status: int, body: dict[str, Any], outcome: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error", ""))
        self.status, self.body, self.outcome = status, body, outcome
        self.headers = headers or {}


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them: beyond that a
    connection is answered 503 and closed at once, on the accepting thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int, refused: Counter) -> None:
        self._connections = threading.BoundedSemaphore(max_connections)
        self._refused = refused
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self._refused.inc()
            try:
                request.settimeout(1.0)  # a fresh socket's buffer takes this at once
                request.sendall(_TOO_MANY_CONNECTIONS)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


class QueryApi:
    """The HTTP server (a thread of the regional process) and the queries it runs on the
    regional's event loop through ``query`` (the ClickHouse sink's)."""

    def __init__(self, listen: str, query: SqlQuery, registry: CollectorRegistry, *,
                 max_rows: int = MAX_ROWS, timeout_s: float = TIMEOUT_S,
                 max_concurrent: int = MAX_CONCURRENT, answer_grace_s: float = ANSWER_GRACE_S,
                 connection_timeout_s: float = CONNECTION_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._query = query
        self.max_rows, self.timeout_s, self.answer_grace_s = max_rows, timeout_s, answer_grace_s
        self.connection_timeout_s, self.max_connections = connection_timeout_s, max_connections
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._running_lock = threading.Lock()
        self._running = 0
        self.requests = Counter(
            "stratoscope_regional_query_requests", "Read-endpoint requests by query and outcome "
            "(ok, bad_request, unknown_query, busy, timeout, failed, stopping).", ["query", "outcome"],
            registry=registry)
        self.refused_connections = Counter(
            "stratoscope_regional_query_connections_refused", "Read-endpoint connections "
            "answered 503 and closed because max_connections were being served.",
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
            timeout = api.connection_timeout_s  # StreamRequestHandler sets it on the socket

        try:
            server = _BoundedServer((self.host, self.port), Handler, self.max_connections,
                                    self.refused_connections)
        except OSError as exc:  # the message names the setting to change
            raise OSError(exc.errno, f"read endpoint {self.host}:{self.port} (query_listen): "
                                     f"{exc.strerror}") from None
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

    @property
    def running(self) -> int:
        """Queries holding a slot: sent to the store and not yet answered by it."""
        with self._running_lock:
            return self._running

    def _take_slot(self) -> bool:
        with self._running_lock:
            if not self._slots.acquire(blocking=False):
                return False
            self._running += 1
            return True

    def _free_slot(self) -> None:
        with self._running_lock:
            self._running -= 1
            self._slots.release()

    # -- called from the HTTP threads --------------------------------------

    def answer(self, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for a GET of ``path``; counts the request."""
        url = urlsplit(path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["queries"]:
            return 200, {"queries": [q.describe() for q in cookbook().values()]}, {}
        if len(parts) != 2 or parts[0] != "query":
            return 404, {"error": f"no such path {url.path!r}; GET /queries or /query/NAME"}, {}
        name = parts[1]
        label = name if name in cookbook() else "unknown"
        try:
            body = self._run(name, url.query)
        except _HttpError as exc:
            self.requests.labels(label, exc.outcome).inc()
            return exc.status, exc.body, exc.headers
        self.requests.labels(label, "ok").inc()
        return 200, body, {}

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
        if not self._take_slot():
            raise _HttpError(429, {"error": "the store is answering another query; retry shortly"},
                             "busy", {"Retry-After": str(RETRY_AFTER_S)})
        return self._on_loop(query, values)

    def _on_loop(self, query: Query, values: dict[str, str]) -> dict[str, Any]:
        """Run on the event loop; the slot (held on entry) is released when the sink
        answers, not when this caller stops waiting."""
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("no loop")
            future = asyncio.run_coroutine_threadsafe(
                run(self._query, query, values, max_rows=self.max_rows, timeout_s=self.timeout_s),
                loop)
        except RuntimeError:
            self._free_slot()
            raise _HttpError(503, {"error": "the regional is stopping"}, "stopping") from None
        future.add_done_callback(lambda _: self._free_slot())
        try:
            result = future.result(self.timeout_s + self.answer_grace_s)
        except TimeoutError:  # the sink still runs it: the slot stays taken until it answers
            raise _HttpError(504, {"error": f"query {query.name}: no answer from the store within "
                                            f"{self.timeout_s + self.answer_grace_s:g} s"},
                             "timeout") from None
        except concurrent.futures.CancelledError:
            raise _HttpError(503, {"error": "the regional is stopping"}, "stopping") from None
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
        status, body, headers = self.owner.answer(self.path)
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)
