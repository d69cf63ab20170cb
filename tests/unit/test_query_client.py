"""No message of ``stratoscope query`` shows a DSN's password, whatever fails."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from stratoscope.query.client import DirectClient, QueryTargetError, RegionalClient, safe_dsn, scrub
from stratoscope.query.cookbook import lookup
from stratoscope.regional.sinks.base import PermanentError
from stratoscope.regional.sinks.clickhouse import ClickHouseSink

SECRET = "s3cr3t-pw"


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_safe_dsn_drops_user_info() -> None:
    assert safe_dsn(f"https://reader:{SECRET}@ch.example:8443/stratoscope?x=1") == \
        "https://ch.example:8443/stratoscope"
    assert safe_dsn("http://ch:8123") == "http://ch:8123"
    assert safe_dsn("chdb:///var/lib/stratoscope/ch") == "chdb:///var/lib/stratoscope/ch"
    assert safe_dsn("http://[::1]:8123/db") == "http://[::1]:8123/db"
    assert safe_dsn("http://u:p@host:notaport/") == "<the DSN given>"
    dsn = "http://u:p%40ss@h:1/db"
    assert scrub(f"x {dsn} y p@ss z p%40ss", dsn) == "x http://h:1/db y *** z ***"


def _raise(exc: BaseException) -> Callable[..., Any]:
    async def start(self: ClickHouseSink) -> None:
        raise exc
    return start


@pytest.mark.parametrize("case", ["refused", "bad_database", "already", "other_error",
                                  "bad_port"])
def test_direct_errors_never_show_the_password(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = refused_port()
    dsn = f"http://reader:{SECRET}@127.0.0.1:{port}/stratoscope"
    if case == "bad_database":
        dsn = f"http://reader:{SECRET}@127.0.0.1:{port}/bad-name;DROP"
    elif case == "bad_port":
        dsn = f"http://reader:{SECRET}@127.0.0.1:99999/stratoscope"
    elif case == "already":
        monkeypatch.setattr(ClickHouseSink, "start", _raise(PermanentError(f"{dsn} already open")))
    elif case == "other_error":
        monkeypatch.setattr(ClickHouseSink, "start", _raise(RuntimeError(f"driver said {dsn}")))
    q = lookup("fleet_health")
    with pytest.raises(QueryTargetError) as err:
        DirectClient(dsn).run(q, {"start": 0, "end": 1})
    message = str(err.value)
    assert message and SECRET not in message and "reader" not in message, message
    if case == "already":
        assert f"http://127.0.0.1:{port}/stratoscope is open in another process" in message


def test_regional_errors_never_show_the_password() -> None:
    url = f"http://reader:{SECRET}@127.0.0.1:{refused_port()}"
    with pytest.raises(QueryTargetError) as err:
        RegionalClient(url, timeout_s=5).run(lookup("fleet_health"), {"start": 0, "end": 1})
    assert SECRET not in str(err.value) and "cannot read from the regional" in str(err.value)
