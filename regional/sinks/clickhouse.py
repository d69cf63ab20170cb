"""ClickHouse sink: merged blocks -> column-oriented inserts, idempotent per block set.

One client library for both deployments (DESIGN.md §5): ``chdb:///dir`` is the
embedded engine (one directory per *process*: chdb refuses to open a second
directory while a client on the first is alive), ``http(s)://user:pass@host:8123/db``
is a ClickHouse server. The schema lives in ``deploy/clickhouse/migrations`` and
is applied by :func:`apply_migrations`, which records each version in
``<db>.schema_migrations``.

Delivery: ``deliver(blocks)`` makes ONE insert per frame and table: the blocks of one
merged frame that the delivery holds (the delivery queue never splits a frame across
deliveries, so that is the whole frame). Idempotency has two layers:

1. Server: every insert carries ``insert_deduplication_token = <table>:<hash of the
   sorted ids of the frame's blocks it holds>``; the tables keep
   ``non_replicated_deduplication_window`` inserts' tokens and the hourly materialized
   views inherit the token. The token depends on the frame only, not on what else the
   delivery held, so a retry, a regrouped delivery, a restart and a replay of the
   regional's log that re-create the same frame write its rows once.
2. Process: the sink remembers the ids it stored (the last 200k) and skips a frame all
   of whose blocks it stored already.

Errors: ``classify_error`` maps the server's code to RetriableError, BlockedError (a
person must fix it: auth, read-only, missing table, too many parts, disk full; retried
forever), DataRejected (the rows of some block) or PermanentError. A block that cannot
be shaped into rows is found part by part before anything is inserted; rows the server
refuses are isolated by halving the frame from the refused table on. Either way the
block goes to ``dead_letter_dir`` (regional/sinks/deadletter.py) and ``deliver`` returns
its id; the frame's other blocks are stored (docs/CLICKHOUSE.md, "Delivery").

Rows are additive: a late partial window for the same series is one more row,
readers SUM (``sum(value)``, ``sumMap(bucket_index, bucket_count)``).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from stratoscope.histogram import QuantileMethod, histogram_quantile  # noqa: F401 (re-exported)
from stratoscope.redact import redact, remember
from stratoscope.regional.config import DEFAULT_DSN
from stratoscope.regional.frame import Block, Frame
from stratoscope.regional.sinks.base import BlockedError, PermanentError, RetriableError, SinkError
from stratoscope.regional.sinks.chdb_repair import EngineOpen, repair_before_open
from stratoscope.regional.sinks.clickhouse_arrow import (  # noqa: F401 (re-exported)
    BATCHES_METRIC,
    EVENTS_LOST_METRIC,
    INSERT_ORDER,
    TARGET,
    arrow_tables,
    stack_id,
)
from stratoscope.regional.sinks.clickhouse_retention import (
    Retention,
    apply_retention,
    retention_drift,
)
from stratoscope.regional.sinks.clickhouse_schema import (
    CLUSTER_MACRO,
    bootstrap_statements,
    check_cluster,
    render_cluster,
    split_statements,
)
from stratoscope.regional.sinks.config import check_database, dsn_database, split_dsn
from stratoscope.regional.sinks.deadletter import write_dead_letter
from stratoscope.resources import clickhouse_dir

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "stratoscope"
#: Where the versioned schema lives (package data; deploy/clickhouse/migrations in the tree).
MIGRATIONS_DIR = clickhouse_dir("migrations")


#: Insert settings the cluster rendering relies on. A Distributed table queues an
#: insert on the initiator's disk and answers at once unless the insert is in the
#: foreground: then it returns only when every shard's local table has its rows, so an
#: error reaches the delivery queue (which retries) and the shards' Replicated tables
#: see this insert's settings, insert_deduplication_token included (docs/CLICKHOUSE.md).
CLUSTER_INSERT_SETTINGS = {"distributed_foreground_insert": 1}

_MIGRATION_FILE = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")

# --------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: str  # "0001"
    name: str  # "metrics_histograms"
    statements: tuple[str, ...]  # with {db} still in place
    checksum: str


def render_migrations(directory: Path | str | None = None,
                      cluster: str | None = None) -> list[tuple[str, str]]:
    """(file name, rendered text) of the migration files of ``directory`` (default
    MIGRATIONS_DIR) in version order: the files themselves for one server (``cluster``
    None), their cluster rendering otherwise (clickhouse_schema.render_cluster)."""
    d = Path(directory) if directory is not None else MIGRATIONS_DIR
    files = [(f.name, f.read_text(encoding="utf-8")) for f in sorted(d.iterdir())
             if _MIGRATION_FILE.match(f.name)]
    if cluster is None:
        return files
    return list(zip([n for n, _ in files], render_cluster(files, cluster), strict=True))


def load_migrations(directory: Path | str | None = None, cluster: str | None = None) -> list[Migration]:
    """The migrations of ``directory`` (default MIGRATIONS_DIR) in version order, rendered
    for one server or for ``cluster``; the checksum is of the rendered text, so the
    single-server checksums are those of the files."""
    d = Path(directory) if directory is not None else MIGRATIONS_DIR
    found: list[Migration] = []
    for filename, text in render_migrations(d, cluster):
        m = _MIGRATION_FILE.match(filename)
        assert m is not None
        found.append(
            Migration(
                version=m.group(1),
                name=m.group(2),
                statements=tuple(split_statements(text)),
                checksum=hashlib.sha256(text.encode()).hexdigest()[:16],
            )
        )
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {d}: {versions}")
    if not found:
        raise ValueError(f"no migrations in {d}")
    return found


def _bootstrap(client: Any, database: str, cluster: str | None = None) -> None:
    for stmt in bootstrap_statements(database, cluster):
        client.command(stmt)


def applied_migrations(client: Any, database: str) -> dict[str, str]:
    """version -> checksum of the migrations recorded in ``<database>.schema_migrations``.

    Empty if the database or the table does not exist.
    """
    check_database(database)
    exists = client.query(
        "SELECT count() FROM system.tables WHERE database = {db:String}"
        " AND name = 'schema_migrations'",
        parameters={"db": database},
    ).result_rows[0][0]
    if not exists:
        return {}
    rows = client.query(
        f"SELECT version, any(checksum) FROM {database}.schema_migrations GROUP BY version"
    ).result_rows
    return {v: c for v, c in rows}


def apply_migrations(
    client: Any, database: str = DEFAULT_DATABASE, directory: Path | str | None = None,
    cluster: str | None = None,
) -> list[str]:
    """Apply the pending migrations in order; return the versions applied (``[]`` if none).

    A migration interrupted half way resumes after its last statement recorded in
    ``schema_migration_steps``; the statement running when it stopped runs again, so
    every statement must be able to run twice (``CREATE ... IF NOT EXISTS``, ``DROP
    ... IF EXISTS``, ``RENAME TABLE IF EXISTS``, ``ALTER ... MODIFY COLUMN``).
    Statements are numbered in file order: do not edit a migration that may have
    been applied in part. ``client`` is a clickhouse-connect client. With ``cluster``,
    the cluster rendering is applied (``ON CLUSTER``: every node at once).
    """
    check_database(database)
    migrations = load_migrations(directory, cluster)
    _bootstrap(client, database, cluster)
    done = applied_migrations(client, database)
    applied: list[str] = []
    for m in migrations:
        if m.version in done:
            if done[m.version] != m.checksum:
                log.warning(
                    "migration %s_%s changed since it was applied to %s (checksum %s != %s);"
                    " write a new migration instead of editing an applied one",
                    m.version, m.name, database, m.checksum, done[m.version],
                )
            continue
        steps = {int(r[0]) for r in client.query(
            f"SELECT step FROM {database}.schema_migration_steps WHERE version = {{v:String}}",
            parameters={"v": m.version}).result_rows}
        for i, stmt in enumerate(m.statements):
            if i in steps:
                continue
            client.command(stmt.replace("{db}", database))
            client.insert("schema_migration_steps", [[m.version], [i]], column_names=["version", "step"],
                          database=database, column_oriented=True)
        client.insert(
            "schema_migrations",
            [[m.version], [m.name], [m.checksum]],
            column_names=["version", "name", "checksum"],
            database=database,
            column_oriented=True,
        )
        log.info("applied ClickHouse migration %s_%s to %s", m.version, m.name, database)
        applied.append(m.version)
    return applied


def pending_migrations(
    client: Any, database: str = DEFAULT_DATABASE, directory: Path | str | None = None,
    cluster: str | None = None,
) -> list[str]:
    done = applied_migrations(client, database)
    return [m.version for m in load_migrations(directory, cluster) if m.version not in done]


# --------------------------------------------------------------------------
# Connection and errors
# --------------------------------------------------------------------------


def connect(dsn: str, user: str | None = None, password: str | None = None,
            **client_kwargs: Any) -> Any:
    """Open a clickhouse-connect client for ``dsn``.

    ``chdb:///abs/dir`` opens (and creates) the embedded store in ``dir``;
    ``http(s)://host:port/db`` a server, as ``user`` with ``password`` (else the DSN's own
    user info, if any: it is split off here and handed over on its own, so the client's
    URL, which its errors quote, holds none). The scheme is passed as the interface:
    clickhouse-connect otherwise takes TLS from the port alone (443 and 8443), and an
    ``https://`` DSN on another port would send the password in plaintext. The client is
    opened without a default database (the path of an http DSN is dropped) so migrations
    can create the database; the sink qualifies every table name.
    """
    import clickhouse_connect  # heavy import, only when a sink starts

    parts = urlsplit(dsn)
    scheme = parts.scheme.lower()
    if scheme == "chdb":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ValueError(f"chdb DSN must be chdb:///absolute/dir, got {dsn!r}")
        os.makedirs(path, exist_ok=True)
        return clickhouse_connect.get_client(dsn=dsn, **client_kwargs)
    if scheme in ("http", "https"):
        bare, dsn_user, dsn_password = split_dsn(dsn)
        remember(password, dsn_password)
        netloc = urlsplit(bare).netloc
        return clickhouse_connect.get_client(
            dsn=urlunsplit((scheme, netloc, "", parts.query, "")), interface=scheme,
            username=user if user is not None else dsn_user,
            password=(password if password is not None else dsn_password) or "",
            **client_kwargs)
    raise ValueError(f"unsupported ClickHouse DSN scheme {scheme!r} (use chdb:// or http(s)://)")


#: ClickHouse error codes worth retrying: overload, timeouts, network, replicas
#: (names checked with the engine's ``errorCodeToName``).
RETRIABLE_CODES = frozenset({
    3, 32, 159, 160, 202, 203, 209, 210, 236, 241, 285, 286, 319, 394, 425, 439, 999, 1000,
})
#: Codes a person has to fix; retried forever, with ``stratoscope_regional_sink_blocked``
#: set to the reason: AUTHENTICATION_FAILED 516, UNKNOWN_USER 192, REQUIRED_PASSWORD 194,
#: DATABASE_ACCESS_DENIED 291, ACCESS_DENIED 497; READONLY 164, TABLE_IS_READ_ONLY 242;
#: UNKNOWN_TABLE 60, UNKNOWN_DATABASE 81, NO_SUCH_COLUMN_IN_TABLE 16, THERE_IS_NO_COLUMN 8,
#: NOT_FOUND_COLUMN_IN_BLOCK 10, NUMBER_OF_COLUMNS_DOESNT_MATCH 20, UNKNOWN_IDENTIFIER 47
#: (the schema is missing or behind); TOO_MANY_PARTS 252; NOT_ENOUGH_SPACE 243.
BLOCKED_CODES: dict[int, str] = {
    516: "auth", 192: "auth", 194: "auth", 291: "auth", 497: "auth",
    164: "readonly", 242: "readonly",
    60: "missing", 81: "missing", 16: "missing", 8: "missing", 10: "missing", 20: "missing",
    47: "missing",
    252: "too_many_parts",
    243: "disk_full",
}
#: Codes that refuse the *data* of an insert (a value that does not parse or fit):
#: the sink isolates the blocks at fault and dead-letters them.
DATA_CODES = frozenset({6, 19, 26, 27, 38, 41, 53, 69, 70, 72, 117, 321, 386, 395, 691})
#: Codes that will fail the same way forever and are no block's fault (a bug in the SQL
#: or the settings the sink sends): permanent.
PERMANENT_CODES = frozenset({33, 36, 43, 44, 49, 62, 115})


class DataRejected(PermanentError):
    """The server refused an insert's data (``DATA_CODES``): some block's rows are bad."""


def classify_error(exc: BaseException, what: str) -> SinkError:
    """Map a clickhouse-connect / chdb / Python exception to a SinkError: Retriable,
    Blocked (a person must fix it), DataRejected (the rows) or Permanent."""
    if isinstance(exc, SinkError):
        return exc
    from clickhouse_connect.driver import exceptions as cce

    # the driver's text may quote a URL or a request: masked (stratoscope.redact)
    msg = redact(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, cce.Error):
        code = getattr(exc, "code", None)
        if code in BLOCKED_CODES:
            return BlockedError(msg, BLOCKED_CODES[code])
        if code in RETRIABLE_CODES:
            return RetriableError(msg)
        if code in DATA_CODES:
            return DataRejected(msg)
        if code in PERMANENT_CODES:
            return PermanentError(msg)
        if isinstance(exc, cce.OperationalError):  # HTTP transport, broken stream
            return RetriableError(msg)
        if isinstance(exc, (cce.ProgrammingError, cce.NotSupportedError)):
            return PermanentError(msg)
        if isinstance(exc, cce.DataError):
            return DataRejected(msg)
        # an unknown server error: retrying is the safe default (nothing is lost)
        return RetriableError(msg)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return BlockedError(msg, "disk_full")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BlockedError(msg, "readonly")
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return RetriableError(msg)
    # encoding failures: wrong Python type or out-of-range value for a column
    return DataRejected(msg)


def _frames_of(blocks: Sequence[Block]) -> list[tuple[Frame, list[int]]]:
    """Blocks grouped by the frame they are parts of, with their part indices (sorted)."""
    frames: dict[int, tuple[Frame, list[int]]] = {}
    for blk in blocks:
        frames.setdefault(id(blk.frame), (blk.frame, []))[1].append(blk.part)
    return [(f, sorted(parts)) for f, parts in frames.values()]


def dedup_token(table: str, block_ids: Iterable[str]) -> str:
    """insert_deduplication_token for ``table`` and the blocks of ONE insert: the blocks
    of one frame that the delivery holds (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(set(block_ids))).encode()).hexdigest()
    return f"stratoscope:{table}:{digest[:40]}"


# --------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------


class _Secret:
    """A password given as text, kept out of reprs and ``vars()`` dumps."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "_Secret('***')"


class ClickHouseSink:
    """Sink protocol implementation for ClickHouse (embedded chdb or a server)."""

    name = "clickhouse"

    #: Re-send a stack to profile_stacks, a series to series, at least this often
    #: (refreshes last_seen, so the TTL only removes what nobody sends any more).
    STACK_RESEND_S = 6 * 3600
    MAX_KNOWN_STACKS = 1_000_000
    MAX_KNOWN_SERIES = 2_000_000
    #: Block ids remembered as delivered (oldest forgotten first).
    MAX_DELIVERED_IDS = 200_000

    def __init__(
        self,
        dsn: str = DEFAULT_DSN,
        database: str | None = None,
        migrate: bool = True,
        *,
        migrations_dir: Path | str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        cluster: str | None = None,
        retention: Retention | None = None,
        retention_allow_shrink: bool = False,
        dead_letter_dir: Path | str | None = None,
        user: str | None = None,
        password: str | Callable[[], str | None] | None = None,
    ) -> None:
        """``database``: default the DSN's path for http(s) DSNs, else "stratoscope".
        ``cluster``: the cluster the tables live on (None: one server). ``retention``:
        applied with the migrations (default: nothing set, every TTL left as it is);
        a shorter TTL only with ``retention_allow_shrink``. ``dead_letter_dir``: where
        blocks whose data can never be stored go (None: such a delivery raises
        PermanentError before anything is inserted). ``user`` and ``password`` (or a
        function that reads it, called at each connection) log in to a server; a DSN's
        own user info does too, and is split off here (``dsn`` never holds a password)."""
        bare, dsn_user, dsn_password = split_dsn(dsn)
        if (user is not None and dsn_user is not None) or (password is not None and dsn_password is not None):
            raise ValueError("the ClickHouse user or password is given both in the DSN and on its own")
        self.dsn = bare
        self._user = user if user is not None else dsn_user
        secret = password if password is not None else dsn_password
        self._password: Callable[[], str | None] = (
            secret if callable(secret) else _Secret(secret).get)
        self.database = check_database(database or dsn_database(bare) or DEFAULT_DATABASE)
        self.migrate = migrate
        self.migrations_dir = migrations_dir
        self.cluster = None if cluster is None else check_cluster(cluster)
        self.retention = retention if retention is not None else Retention()
        self.retention_allow_shrink = retention_allow_shrink
        #: Tables whose TTL the last start() changed (for logs and tests).
        self.retention_changed: list[str] = []
        #: What a start without migrate found to differ from the settings, one line each
        #: (``stratoscope regional --check`` prints them, Ansible looks for them).
        self.check_notes: list[str] = []
        self._client_kwargs = dict(client_kwargs or {})
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._types: dict[str, list] = {}
        self._known_stacks: dict[int, float] = {}
        self._known_series: dict[tuple[str, int], float] = {}
        self._delivered: dict[str, None] = {}  # insertion-ordered set of block ids
        self.dead_letter_dir = None if dead_letter_dir is None else Path(dead_letter_dir)
        #: Blocks this process wrote to the dead-letter directory (reported again when
        #: a retried delivery holds them).
        self._dead: dict[str, None] = {}
        #: Versions applied by the last start() (for logs and tests).
        self.applied: list[str] = []
        #: Insert tokens an embedded store recorded without their parts, forgotten at start
        #: (``stratoscope_regional_sink_store_tokens_forgotten_total``).
        self.tokens_forgotten = 0

    def __repr__(self) -> str:
        # without the query string (client options; a password is refused there by the
        # settings, not by a sink built directly)
        where = urlunsplit(urlsplit(self.dsn)._replace(query="", fragment=""))
        return f"ClickHouseSink({where!r}, database={self.database!r})"

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            if self._client is not None:
                return
            try:
                client = await asyncio.to_thread(self._connect)
            except ValueError as exc:
                raise PermanentError(redact(f"ClickHouse DSN: {exc}")) from exc
            except Exception as exc:
                raise classify_error(exc, f"connecting to {self!r}") from exc
            self._client = client
            try:
                if self.cluster is not None:
                    await asyncio.to_thread(self._check_cluster, client)
                if self.migrate:
                    self.applied = await asyncio.to_thread(
                        apply_migrations, client, self.database, self.migrations_dir, self.cluster
                    )
                    self.retention_changed = await asyncio.to_thread(
                        apply_retention, client, self.database, self.retention, self.cluster,
                        allow_shrink=self.retention_allow_shrink)
                else:
                    await asyncio.to_thread(self._warn_retention, client)
            except Exception as exc:
                await asyncio.to_thread(self._close_client)
                raise classify_error(exc, f"migrating {self.database}") from exc

    def _connect(self) -> Any:
        """A client for the DSN, logged in with the password as it is now (a file is read
        again at each connection, so a rotated password applies at the next one)."""
        try:
            password = self._password()
        except OSError as exc:  # the file went away since the settings were checked
            raise BlockedError(f"cannot read the ClickHouse password file: {exc.strerror}",
                               "auth") from None
        self._repair_embedded()
        return connect(self.dsn, self._user, password, **self._client_kwargs)

    def _repair_embedded(self) -> None:
        """Before the first open of an embedded store in this process: forget the insert
        tokens a killed engine recorded without their parts (regional/sinks/chdb_repair.py),
        so the replay of those inserts from the write-ahead log stores their rows."""
        parts = urlsplit(self.dsn)
        if parts.scheme.lower() != "chdb":
            return
        path = unquote(parts.path)
        if path in _OPENED_HERE or not path.startswith("/"):
            return
        try:
            forgotten, odd = repair_before_open(path)
        except EngineOpen:  # another process has it: the open below says so
            return
        except OSError as exc:
            raise classify_error(exc, f"repairing the deduplication logs in {path}") from exc
        finally:
            _OPENED_HERE.add(path)
        for line in odd:
            log.warning("embedded ClickHouse at %s: left as it is: %s", path, line)
        for f in forgotten:
            log.warning("embedded ClickHouse at %s was killed during an insert: forgot the token of "
                        "part %s (never stored) in %s, so the replay of that insert stores its rows",
                        path, f.part, f.table_dir)
        self.tokens_forgotten += len(forgotten)

    def _check_cluster(self, client: Any) -> None:
        """The cluster is one the server knows, and so is the setting inserts rely on
        (clickhouse-connect drops a setting the server does not know, with a warning:
        inserts would silently go to the background)."""
        assert self.cluster is not None
        name = self.cluster
        if name == CLUSTER_MACRO:
            name = client.query("SELECT getMacro('cluster')").result_rows[0][0]
        known = client.query("SELECT count() FROM system.clusters WHERE cluster = {c:String}",
                             parameters={"c": name}).result_rows[0][0]
        if not known:
            raise PermanentError(f"ClickHouse cluster {name!r} (clickhouse.cluster) is not in the "
                                 "server's remote_servers (see system.clusters)")
        for setting in CLUSTER_INSERT_SETTINGS:
            if not client.query("SELECT count() FROM system.settings WHERE name = {s:String}",
                                parameters={"s": setting}).result_rows[0][0]:
                raise PermanentError(f"the ClickHouse server does not know the setting {setting} "
                                     "that cluster inserts rely on (upgrade it)")

    def _warn_retention(self, client: Any) -> None:
        """Without migrate the sink may not alter tables (docs/CLICKHOUSE.md: the writer
        role only inserts): say which retention differs from the settings."""
        try:
            drift = retention_drift(client, self.database, self.retention, self.cluster)
        except Exception:  # a store not migrated yet: the health check says so
            log.debug("retention of %s not checked", self.database, exc_info=True)
            return
        self.check_notes = [f"retention differs: {self.database}.{table} has TTL {current or 'none'}, "
                            f"the settings ask for {wanted}" for table, (current, wanted) in drift.items()]
        for table, (current, wanted) in drift.items():
            log.warning("retention of %s.%s is TTL %s, the settings ask for %s: start once with "
                        "--migrate (as a user with the migrator role) to apply it",
                        self.database, table, current or "none", wanted)

    async def stop(self) -> None:
        async with self._lock:
            if self._client is not None:
                await asyncio.to_thread(self._close_client)

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._types.clear()
        if client is not None:
            try:
                client.close()
            except Exception:  # closing must not fail a shutdown
                log.debug("closing the ClickHouse client failed", exc_info=True)

    async def health_check(self) -> None:
        async with self._lock:
            client = self._require_client()
            await asyncio.to_thread(self._health_sync, client)

    def _health_sync(self, client: Any) -> None:
        try:
            one = client.query("SELECT 1").result_rows
        except Exception as exc:
            raise classify_error(exc, f"{self!r} does not answer SELECT 1") from exc
        if one != [(1,)]:
            raise RetriableError(f"{self!r}: SELECT 1 returned {one!r}")
        try:
            missing = pending_migrations(client, self.database, self.migrations_dir, self.cluster)
        except Exception as exc:
            raise classify_error(exc, f"reading {self.database}.schema_migrations") from exc
        if missing:
            raise PermanentError(
                f"ClickHouse database {self.database!r} lacks schema migrations "
                f"{', '.join(missing)}; start the sink with migrate=True or apply them"
            )

    def _require_client(self) -> Any:
        if self._client is None:
            raise RetriableError(f"{self!r} is not started")
        return self._client

    # -- reads -----------------------------------------------------------

    async def query(
        self, sql: str, parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> list[tuple]:
        """Run a SELECT through this sink's client (the owner of an embedded store).

        Unqualified table names resolve in the sink's database. Parameters use
        ClickHouse server-side binding: ``{name:Type}`` in the SQL.
        """
        async with self._lock:
            client = self._require_client()
            try:
                return await asyncio.to_thread(self._query_sync, client, sql, parameters, settings)
            except Exception as exc:
                raise classify_error(exc, "query") from exc

    def _query_sync(self, client: Any, sql: str, parameters: Any, settings: Any) -> list[tuple]:
        client.database = self.database
        return list(client.query(sql, parameters=parameters, settings=settings).result_rows)

    # -- writes ----------------------------------------------------------

    async def deliver(self, blocks: list[Block]) -> list[str]:
        """Store ``blocks``; returns the ids of those written to the dead-letter directory."""
        if not blocks:
            return []
        async with self._lock:
            client = self._require_client()
            return await asyncio.to_thread(self._deliver_sync, client, blocks)

    def _deliver_sync(self, client: Any, blocks: Sequence[Block]) -> list[str]:
        """One insert per frame and table, token = the table and the ids of the frame's
        blocks in this delivery (docs/CLICKHOUSE.md, "Tokens").

        Every frame is shaped first, so a block that cannot be shaped is found (shaping
        part by part) before anything is inserted; then the frames are inserted in
        order. A frame whose blocks were all stored by this process before is skipped.
        """
        frames: list[tuple[Frame, list[int]]] = []
        for frame, parts in _frames_of(blocks):
            parts = sorted(set(parts))
            if all(frame.parts[i].block_id in self._delivered or frame.parts[i].block_id in self._dead
                   for i in parts):
                continue
            frames.append((frame, parts))
        self._known_stacks = _expire(self._known_stacks, self.STACK_RESEND_S, self.MAX_KNOWN_STACKS)
        self._known_series = _expire(self._known_series, self.STACK_RESEND_S, self.MAX_KNOWN_SERIES)
        shaped: list[tuple[Frame, list[int], dict[str, pa.Table], list[tuple[int, str]]]] = []
        marked: list[tuple[list[int], list[tuple[str, int]]]] = []  # per shaped frame
        now = time.monotonic()
        k = 0
        try:
            for frame, parts in frames:
                good, bad = self._shape_or_isolate(frame, parts)
                tables: dict[str, pa.Table] = {}
                stacks: list[int] = []
                series: list[tuple[str, int]] = []
                if good:
                    tables, stacks, series = arrow_tables(frame, good, self._known_stacks,
                                                          self._known_series)
                    # known while this delivery is shaped (a later frame does not send them
                    # again); forgotten below for the frames that are not stored
                    for sid in stacks:
                        self._known_stacks[sid] = now
                    for key in series:
                        self._known_series[key] = now
                marked.append((stacks, series))
                shaped.append((frame, good, concat_frames([tables]) if tables else {}, bad))
            for k, (frame, good, tables, bad) in enumerate(shaped):
                if good:
                    bad = bad + self._insert_isolating(client, frame, good, tables, 0)
                for part, reason in bad:
                    self._dead_letter(frame, part, reason)
                for i in good:
                    self._delivered[frame.parts[i].block_id] = None
                k += 1
        except BaseException:
            # the frames from the one that failed on were not stored: send their series
            # and stacks again next time
            for stacks, series in marked[k:]:
                for sid in stacks:
                    self._known_stacks.pop(sid, None)
                for key in series:
                    self._known_series.pop(key, None)
            raise
        if len(self._delivered) > self.MAX_DELIVERED_IDS:  # keep the newest half
            self._delivered = dict.fromkeys(list(self._delivered)[-(self.MAX_DELIVERED_IDS // 2):])
        if len(self._dead) > self.MAX_DELIVERED_IDS:
            self._dead = dict.fromkeys(list(self._dead)[-(self.MAX_DELIVERED_IDS // 2):])
        return [b.block_id for b in blocks if b.block_id in self._dead]

    def _shape_or_isolate(self, frame: Frame, parts: list[int]) -> tuple[list[int], list[tuple[int, str]]]:
        """(parts that shape, [(part, reason)] of those that cannot): the frame at once,
        part by part only when it fails."""
        try:
            arrow_tables(frame, parts)
            return parts, []
        except _SHAPING_ERRORS as exc:
            if len(parts) == 1 or self.dead_letter_dir is None:
                ids = [frame.parts[i].block_id for i in parts]
                if self.dead_letter_dir is None:
                    raise PermanentError(
                        f"blocks {ids[:3]} cannot be shaped into rows: {exc}") from exc
                return [], [(parts[0], f"cannot be shaped into rows: {type(exc).__name__}: {exc}")]
        good: list[int] = []
        bad: list[tuple[int, str]] = []
        for i in parts:
            g, b = self._shape_or_isolate(frame, [i])
            good += g
            bad += b
        return good, bad

    def _dead_letter(self, frame: Frame, part: int, reason: str) -> None:
        blk = Block(frame, part)
        if self.dead_letter_dir is None:
            raise PermanentError(f"block {blk.block_id}: {reason}")
        try:
            write_dead_letter(self.dead_letter_dir, self.name, blk, reason)
        except OSError as exc:  # nowhere to keep it: not done, retried until fixed
            raise classify_error(exc, f"writing dead letter {blk.block_id} to {self.dead_letter_dir}") from exc
        self._dead[blk.block_id] = None

    def _insert_isolating(self, client: Any, frame: Frame, parts: list[int],
                          tables: dict[str, pa.Table], start: int) -> list[tuple[int, str]]:
        """Insert ``tables`` (of ``parts``) from the ``start``-th table of INSERT_ORDER on;
        returns the parts the server refused the data of, as (part, reason).

        A refusal of the data (DataRejected) splits the parts in halves and inserts each
        half's rows from the refused table on (the tables before hold every part's rows
        under this insert's token). Each half is shaped without the known-series and
        known-stacks filters, so the same refusal always gives the same halves, rows and
        tokens: a retry or a replay stores nothing twice.
        """
        ids = [frame.parts[i].block_id for i in parts]
        names = [n for n in INSERT_ORDER if n in tables]
        for idx in range(start, len(INSERT_ORDER)):
            name = INSERT_ORDER[idx]
            if name not in names:
                continue
            try:
                self._insert_one(client, name, tables[name], ids)
            except DataRejected as exc:
                if self.dead_letter_dir is None:
                    raise
                if len(parts) == 1:
                    return [(parts[0], f"refused by ClickHouse: {exc}")]
                log.warning("ClickHouse refused the rows of %d blocks (%s); isolating the bad ones",
                            len(parts), exc)
                half = len(parts) // 2
                bad: list[tuple[int, str]] = []
                for sub in (parts[:half], parts[half:]):
                    sub_tables = concat_frames([arrow_tables(frame, sub).tables])
                    bad += self._insert_isolating(client, frame, sub, sub_tables, idx)
                return bad
        return []

    def _insert_one(self, client: Any, name: str, table: pa.Table, ids: Sequence[str]) -> None:
        settings = {
            "insert_deduplication_token": dedup_token(name, ids),
            "insert_deduplicate": 1,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
            "async_insert": 0,
            # merge-on-insert of the *_1h and series targets is useless:
            # background merges collapse those rows
            "optimize_on_insert": 0,
            **(CLUSTER_INSERT_SETTINGS if self.cluster is not None else {}),
        }
        try:
            client.insert_arrow(TARGET.get(name, name), table, database=self.database,
                                settings=settings)
        except Exception as exc:
            some = ", ".join(ids[:3]) + (" ..." if len(ids) > 3 else "")
            raise classify_error(
                exc, f"inserting {table.num_rows} rows of {len(ids)} block(s) ({some})"
                     f" into {self.database}.{name}"
            ) from exc

    def _insert_tables(self, client: Any, tables: dict[str, pa.Table], ids: Sequence[str]) -> dict[str, int]:
        """One insert per table, in INSERT_ORDER, each carrying the token of ``ids``."""
        written: dict[str, int] = {}
        for name in INSERT_ORDER:
            table = tables.get(name)
            if table is None:
                continue
            self._insert_one(client, name, table, ids)
            target = TARGET.get(name, name)
            written[target] = written.get(target, 0) + table.num_rows
        return written


#: Embedded stores this process has opened (their logs are repaired before the first).
_OPENED_HERE: set[str] = set()

_SHAPING_ERRORS = (IndexError, ValueError, TypeError, KeyError, pa.ArrowException)


def concat_frames(shaped: Sequence[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """The frames' tables joined into one record batch per ClickHouse table.

    One batch, not a chunked table: an Arrow file holds one dictionary per column (the
    frames' dictionaries differ), and ClickHouse makes a block, so a part, per batch.
    The per-node counter rows (events lost, batches) join the metric points (one part, not two).
    """
    joined: dict[str, list[pa.Table]] = {}
    for tables in shaped:
        for name, table in tables.items():
            if name == "metrics_node_counters" and "metric_points" in tables:
                table = _as_schema(table, tables["metric_points"].schema)
                name = "metric_points"
            joined.setdefault(name, []).append(table)
    return {name: parts[0] if len(parts) == 1 else pa.concat_tables(parts).unify_dictionaries().combine_chunks()
            for name, parts in joined.items()}


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns cast to ``schema`` (a missing column: zeros)."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.array(np.zeros(table.num_rows)).cast(field.type))
    return pa.Table.from_arrays(cols, schema=schema)


_K = TypeVar("_K")


def _expire(known: dict[_K, float], resend_s: float, limit: int) -> dict[_K, float]:
    """``known`` without the entries sent more than ``resend_s`` ago (so they are sent
    again), or empty past ``limit`` entries.

    Entries are only ever added with the current time, so the dict is in time order and
    the expired ones are a prefix.
    """
    if len(known) > limit:
        return {}
    horizon = time.monotonic() - resend_s
    expired = 0
    for t in known.values():
        if t >= horizon:
            break
        expired += 1
    return dict(list(known.items())[expired:]) if expired else known


# --------------------------------------------------------------------------
# Queries for readers
# --------------------------------------------------------------------------


def _ts_param(v: int | float | datetime) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime or Unix seconds")
        return int(v.timestamp())
    return int(v)


def folded_stacks_sql(
    database: str = DEFAULT_DATABASE,
    *,
    node: str | None = None,
    pid: int | None = None,
    comm: str | None = None,
    start: int | float | datetime | None = None,
    end: int | float | datetime | None = None,
    profile: str = "cpu",
    kernel_suffix: str = "_[k]",
) -> tuple[str, dict[str, Any]]:
    """ONE query returning (folded_stack, samples) rows for a flame graph, heaviest first.

    A folded stack is ``comm;user frames root->leaf;kernel frames root->leaf``
    (Brendan Gregg's collapsed format; kernel frames get ``kernel_suffix`` so
    flamegraph.pl colours them). ``start``/``end`` are Unix seconds or aware
    datetimes over the window start ``ts`` (end exclusive). Returns the SQL and
    its server-side parameters for ``ClickHouseSink.query`` / ``client.query``.
    """
    db = check_database(database)
    where = ["profile = {profile:String}"]
    params: dict[str, Any] = {"profile": profile, "ksuffix": kernel_suffix}
    if node is not None:
        where.append("node = {node:String}")
        params["node"] = node
    if pid is not None:
        where.append("pid = {pid:UInt32}")
        params["pid"] = pid
    if comm is not None:
        where.append("comm = {comm:String}")
        params["comm"] = comm
    if start is not None:
        where.append("ts >= toDateTime({start:Int64}, 'UTC')")
        params["start"] = _ts_param(start)
    if end is not None:
        where.append("ts < toDateTime({end:Int64}, 'UTC')")
        params["end"] = _ts_param(end)
    sql = f"""
SELECT
    arrayStringConcat(arrayConcat(
        [toString(s.comm)],
        arrayReverse(us.frames),
        arrayMap(f -> concat(f, {{ksuffix:String}}), arrayReverse(ks.frames))
    ), ';') AS folded,
    sum(s.n) AS samples
FROM
(
    SELECT comm, kernel_stack_id, user_stack_id, sum(samples) AS n
    FROM {db}.profile_samples
    WHERE {' AND '.join(where)}
    GROUP BY comm, kernel_stack_id, user_stack_id
) AS s
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM {db}.profile_stacks GROUP BY stack_id) AS ks
    ON s.kernel_stack_id = ks.stack_id
LEFT JOIN (SELECT stack_id, any(frames) AS frames FROM {db}.profile_stacks GROUP BY stack_id) AS us
    ON s.user_stack_id = us.stack_id
GROUP BY folded
ORDER BY samples DESC, folded
SETTINGS join_use_nulls = 0
"""
    return sql, params


# -- histogram quantiles (OTel exponential, scale 0) --------------------------



def histogram_quantile_sql(
    q: float,
    buckets: str = "sumMap(bucket_index, bucket_count)",
    zero_count: str = "sum(zero_count)",
    method: QuantileMethod = "upper",
) -> str:
    """A SQL expression computing :func:`histogram_quantile` from merged buckets.

    ``buckets`` is an expression of type Tuple(Array(Int), Array(UInt)) with
    keys ascending (what ``sumMap`` returns: ``sumMap(bucket_index, bucket_count)``
    on ``histograms``, ``sumMap(buckets)`` on ``histograms_1h``); ``zero_count``
    the merged zero bucket. Both are repeated in the text; ClickHouse computes
    identical subexpressions once. Returns Float64 (nan when empty).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    b, z = f"({buckets})", f"({zero_count})"
    total = f"({z} + arraySum({b}.2))"
    rank = f"({q!r} * {total})"
    k = f"greatest(1, ceil({rank}))"
    pos = f"arrayFirstIndex(c -> {z} + c >= {k}, arrayCumSum({b}.2))"
    idx = f"{b}.1[{pos}]"
    if method == "upper":
        inside = f"pow(2, {idx} + 1)"
    elif method == "loglinear":
        cnt = f"{b}.2[{pos}]"
        below = f"({z} + arrayCumSum({b}.2)[{pos}] - {cnt})"
        inside = f"pow(2, {idx} + least(1, greatest(0, ({rank} - {below}) / {cnt})))"
    else:
        raise ValueError(f"unknown method {method!r}")
    return f"if({total} = 0, nan, if({z} >= {k}, 0, {inside}))"


__all__ = [
    "CLUSTER_INSERT_SETTINGS", "render_migrations",
    "BATCHES_METRIC", "DEFAULT_DATABASE", "DEFAULT_DSN", "EVENTS_LOST_METRIC", "MIGRATIONS_DIR", "ClickHouseSink",
    "Migration", "applied_migrations", "apply_migrations", "classify_error", "connect",
    "dedup_token", "dsn_database", "folded_stacks_sql", "histogram_quantile", "histogram_quantile_sql",
    "load_migrations", "pending_migrations", "split_statements", "stack_id",
]

