"""Users, roles and grants for a ClickHouse server: who may write, migrate and read.

Why rendered and not kept by hand: the tables a regional inserts into are the sink's
``INSERT_ORDER``, and on a cluster each has a ``_local`` table behind it; rendering
from those keeps the grants in step with the sink. Three roles:

* ``stratoscope_writer`` (the regional): INSERT into the tables it writes, SELECT on
  the tables that record applied migrations (its health check reads them). Nothing
  else: it cannot read metrics, alter or drop anything.
* ``stratoscope_migrator`` (Ansible, or a regional started with ``--migrate``): what the
  migrations and the retention settings need on the database (CREATE, DROP, ALTER,
  INSERT and SELECT), plus ``CLUSTER`` for ``ON CLUSTER`` statements, plus the writer role.
* ``stratoscope_reader`` (Grafana, people with SQL): SELECT on the database, through a
  settings profile that keeps it read-only (``readonly = 1``: no writes, no DDL, no
  settings changed) except for ``max_execution_time``, which Grafana's datasource sets
  on every query to enforce its timeout: changeable, up to the cap, not above it.

Users are optional: a password is read from a file or an environment variable when the
SQL is rendered and only a salted SHA-256 of it is written (``IDENTIFIED WITH
sha256_hash BY 'hex' SALT 'salt'``, the server checks SHA-256(password + salt)), so the
SQL holds no password, two users with one password get different hashes, and the
reviewed file (deploy/clickhouse/access) holds no user. The salt is random per user and
per rendering, so rendering twice gives two different, equally valid files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stratoscope.regional.sinks.clickhouse_arrow import INSERT_ORDER, TARGET
from stratoscope.regional.sinks.clickhouse_schema import check_cluster
from stratoscope.regional.sinks.config import check_database

__all__ = ["ROLES", "AccessUser", "access_statements", "insert_tables"]

WRITER, MIGRATOR, READER = "stratoscope_writer", "stratoscope_migrator", "stratoscope_reader"
#: The kinds a user can be given, and the role each gets.
ROLES = {"writer": WRITER, "migrator": MIGRATOR, "reader": READER}


def insert_tables() -> list[str]:
    """The tables the ClickHouse sink inserts into, in its insert order."""
    return list(dict.fromkeys(TARGET.get(n, n) for n in INSERT_ORDER))


@dataclass(frozen=True)
class AccessUser:
    """A user to create: ``kind`` (a key of ROLES), its name, where its password is."""

    kind: str
    name: str
    password_file: Path | None = None
    password_env: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROLES:
            raise ValueError(f"unknown user kind {self.kind!r} (use {', '.join(ROLES)})")
        check_database(self.name, " (user name)")
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError(f"user {self.name}: give its password as a file or an environment "
                             "variable (one of the two)")

    def password_sha256(self, salt: str) -> str:
        """SHA-256 (hex) of the password, read now, followed by ``salt``: what the server
        compares for ``sha256_hash ... SALT``; the password itself is not kept."""
        if self.password_file is not None:
            try:
                secret = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"user {self.name}: cannot read {self.password_file}: "
                                 f"{exc.strerror}") from None
        else:
            assert self.password_env is not None
            if self.password_env not in os.environ:
                raise ValueError(f"user {self.name}: environment variable {self.password_env!r} "
                                 "is not set")
            secret = os.environ[self.password_env]
        if not secret:
            raise ValueError(f"user {self.name}: the password is empty")
        return hashlib.sha256(secret.encode() + salt.encode()).hexdigest()


def access_statements(
    database: str,
    cluster: str | None = None,
    max_execution_time: int = 60,
    users: Sequence[AccessUser] = (),
) -> list[str]:
    """The SQL creating the roles, the reader's settings profile, their grants and
    ``users``; every statement can run again (roles and profile are created or
    replaced, grants add up)."""
    db = check_database(database)
    on = f" ON CLUSTER '{check_cluster(cluster)}'" if cluster is not None else ""
    if max_execution_time < 1:
        raise ValueError(f"max_execution_time must be at least 1 s, got {max_execution_time}")
    tables = insert_tables()
    if cluster is not None:  # a Distributed insert writes the shards' local tables
        tables += [f"{t}_local" for t in tables]
    out = [f"CREATE ROLE IF NOT EXISTS {r}{on}" for r in (WRITER, MIGRATOR, READER)]
    out += [f"GRANT{on} INSERT ON {db}.{t} TO {WRITER}" for t in tables]
    out += [f"GRANT{on} SELECT ON {db}.{t} TO {WRITER}"
            for t in ("schema_migrations", "schema_migration_steps")]
    out += [
        f"GRANT{on} CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP TABLE, DROP VIEW,"
        f" ALTER TABLE, ALTER VIEW, INSERT, SELECT ON {db}.* TO {MIGRATOR}",
        f"GRANT{on} {WRITER} TO {MIGRATOR}",
    ]
    if cluster is not None:
        out.append(f"GRANT{on} CLUSTER ON *.* TO {MIGRATOR}")
    out += [
        f"GRANT{on} SELECT ON {db}.* TO {READER}",
        f"CREATE SETTINGS PROFILE OR REPLACE {READER}{on} SETTINGS readonly = 1,"
        f" max_execution_time = {max_execution_time} MAX {max_execution_time}"
        # join_use_nulls: the cookbook and the dashboards pin it to its default (0) in
        # SETTINGS, which a readonly profile allows only for settings marked changeable.
        f" CHANGEABLE_IN_READONLY, join_use_nulls = 0 CHANGEABLE_IN_READONLY TO {READER}",
    ]
    for u in users:
        salt = secrets.token_hex(16)
        out += [
            f"CREATE USER OR REPLACE {u.name}{on} IDENTIFIED WITH sha256_hash BY"
            f" '{u.password_sha256(salt)}' SALT '{salt}' DEFAULT DATABASE {db}",
            f"GRANT{on} {ROLES[u.kind]} TO {u.name}",
            f"ALTER USER {u.name}{on} DEFAULT ROLE {ROLES[u.kind]}",
        ]
    return out
