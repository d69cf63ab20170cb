"""Where ``stratoscope query`` runs a cookbook query: a regional's read endpoint, or a
ClickHouse store directly (a server, or an embedded directory no regional holds open).

Both hand back the same Result, rows in plain form (cookbook.plain_value), so a query
prints the same whichever way it was read.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlencode, urlsplit

from stratoscope.query.cookbook import Column, CookbookError, Query, Result, run

__all__ = ["DEFAULT_REGIONAL", "DirectClient", "QueryTargetError", "RegionalClient", "Target",
           "safe_dsn", "scrub"]

#: The regional's read endpoint on this machine (regional setting query_listen).
DEFAULT_REGIONAL = "http://127.0.0.1:9433"
#: Rows and seconds a direct query may take (the endpoint has its own bounds).
MAX_ROWS = 100_000
TIMEOUT_S = 60.0
#: How long a read through the regional keeps retrying while the endpoint answers 429
#: (it runs one query at a time, so two people asking at once is normal).
BUSY_WAIT_S = 30.0


class QueryTargetError(Exception):
    """The place to read from cannot be reached or refused; the message says what to do."""


def safe_dsn(dsn: str) -> str:
    """``dsn`` without its user info (user and password): what a message may show."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<the DSN given>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else "<the DSN given>"


def scrub(text: str, dsn: str) -> str:
    """``text`` with ``dsn`` and its password (raw or percent-decoded) replaced, for a
    message built from errors that may quote the DSN."""
    text = text.replace(dsn, safe_dsn(dsn))
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        assert secret is not None
        text = text.replace(secret, "***")
    return text


class _Busy(Exception):
    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.message, self.after_s = message, after_s


class Target(Protocol):
    def run(self, query: Query, values: Mapping[str, Any]) -> Result: ...


class RegionalClient:
    """A regional's read endpoint (regional/queryapi.py) over HTTP."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S + 15,
                 busy_wait_s: float = BUSY_WAIT_S) -> None:
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.timeout_s, self.busy_wait_s = timeout_s, busy_wait_s

    def _get(self, path: str) -> dict[str, Any]:
        """The JSON answer; a 429 (busy) is retried after its Retry-After until
        ``busy_wait_s`` has passed."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            try:
                return self._get_once(path)
            except _Busy as busy:
                if time.monotonic() + busy.after_s > deadline:
                    raise QueryTargetError(scrub(
                        f"{self.url}: {busy.message} (still busy after {self.busy_wait_s:g} s)",
                        self.url)) from None
                time.sleep(busy.after_s)

    def _get_once(self, path: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                body = {"error": f"HTTP {exc.code} {exc.reason}"}
            if exc.code == 429:
                try:
                    after = min(max(float(exc.headers.get("Retry-After", "1")), 0.1), 10.0)
                except ValueError:
                    after = 1.0
                raise _Busy(str(body.get("error", "busy")), after) from None
            if exc.code in (400, 404) and "error" in body:
                known = body.get("queries")
                raise CookbookError(body["error"] + (f"; known: {', '.join(known)}" if known else "")) from None
            raise QueryTargetError(scrub(f"{self.url}: {body.get('error', exc.reason)}", self.url)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise QueryTargetError(scrub(
                f"cannot read from the regional at {self.url} ({reason}); is it running with "
                f"query_listen set? Or read a store directly with --clickhouse DSN", self.url)) from None

    def run(self, query: Query, values: Mapping[str, Any]) -> Result:
        params = query.bind(values)
        body = self._get(f"/query/{quote(query.name)}?{urlencode(params)}")
        columns = tuple(Column(c["name"], c["unit"]) for c in body["columns"])
        return Result(body["query"], columns, [tuple(r) for r in body["rows"]],
                      bool(body.get("truncated")), body.get("params", params))


class DirectClient:
    """A ClickHouse store read in this process through clickhouse-connect: an http(s)
    server, or chdb:///DIR when no regional holds that directory open."""

    def __init__(self, dsn: str, database: str | None = None) -> None:
        self.dsn, self.database = dsn, database

    def run(self, query: Query, values: Mapping[str, Any]) -> Result:
        """The rows; every error a QueryTargetError or CookbookError whose message holds
        no password (the DSN is shown without its user info)."""
        query.bind(values)  # a bad parameter before connecting
        try:
            return asyncio.run(self._run(query, values))
        except (QueryTargetError, CookbookError):
            raise
        except Exception as exc:  # any other failure of the store or driver, scrubbed
            raise QueryTargetError(scrub(f"reading {self.dsn}: {type(exc).__name__}: {exc}",
                                         self.dsn)) from None

    async def _run(self, query: Query, values: Mapping[str, Any]) -> Result:
        from stratoscope.regional.sinks.base import SinkError
        from stratoscope.regional.sinks.clickhouse import ClickHouseSink

        try:
            sink = ClickHouseSink(self.dsn, database=self.database, migrate=False)
        except ValueError as exc:
            raise QueryTargetError(scrub(f"--clickhouse: {exc}", self.dsn)) from None
        try:
            await sink.start()
            return await run(sink.query, query, values, max_rows=MAX_ROWS, timeout_s=TIMEOUT_S)
        except SinkError as exc:
            text = str(exc)
            if "EmbeddedServer" in text or "already" in text.lower():
                text = (f"the embedded store {safe_dsn(self.dsn)} is open in another process (a "
                        f"running regional?): read it through the regional with --regional URL")
            raise QueryTargetError(scrub(text, self.dsn)) from None
        finally:
            await sink.stop()
