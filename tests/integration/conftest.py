"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import clickhouse_connect
import pytest


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one embedded ClickHouse directory of this test process.

    chdb hosts one engine per process: a client on a second directory fails while
    any client on the first is open. So every test module shares this directory
    and isolates itself with a fresh database name.
    """
    return str(tmp_path_factory.mktemp("chdb"))


@pytest.fixture(scope="session")
def anchor(chdb_dir: str) -> Iterator[Any]:
    """A client kept open for the whole test run, for the tests' own SQL assertions."""
    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}")
    yield client
    client.close()
