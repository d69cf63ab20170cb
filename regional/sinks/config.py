"""The sink registry: each sink kind is a settings class plus the factory that builds it.

Why here and not in the sinks: a sink runs in a child process (regional/sinks/process.py).
A setting it would refuse there (a bad DSN, a missing password file) used to surface as
"sink process clickhouse exited (code 1)". These models are validated in the regional's
parent process, with the rest of its settings, before any child starts; the child gets
the validated model (it pickles) and calls ``build()``, which imports only that sink.

A kind is registered with ``@register``; ``SINKS`` maps its name to its class, in the
order the regional starts them.

Secrets (docs/SECURITY.md, "Secrets"): a password is given in the settings (a SecretStr:
its repr is masked), in a file or in an environment variable, at most one way each. A file
is read, and a variable looked up, by the sink when it connects, in its own process; the
models keep no password in a plain field (a ClickHouse DSN's user info is split off when
it is validated), and no error of theirs quotes one (``hide_input_in_errors``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from stratoscope.redact import install_log_filter, remember
from stratoscope.regional.sinks.clickhouse_retention import Retention
from stratoscope.regional.sinks.clickhouse_schema import check_cluster
from stratoscope.settings import Duration, readable_file

if TYPE_CHECKING:
    from stratoscope.regional.sinks.base import Sink

__all__ = [
    "DEFAULT_DEAD_LETTER_ROOT", "SINKS", "ClickHouseSettings", "KafkaSettings", "SinkSettings", "check_database",
    "dsn_database", "register", "split_dsn",
]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_database(database: str, where: str = "") -> str:
    """``database`` if it is a plain ClickHouse identifier (it is put into SQL unquoted)."""
    if not _IDENT.match(database or ""):
        raise ValueError(f"invalid ClickHouse database name {database!r}{where} "
                         "(letters, digits and _, not starting with a digit)")
    return database


def split_dsn(dsn: str) -> tuple[str, str | None, str | None]:
    """(the DSN without its user info, user, password) of an http(s) DSN, user and password
    percent-decoded (None when absent or empty); any other DSN unchanged, with (None, None).

    The password of ``https://user:pass@host/db`` goes into a SecretStr (ClickHouseSettings)
    or is handed to the client on its own (clickhouse.connect): from here on the DSN is
    safe to show.
    """
    parts = urlsplit(dsn)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return dsn, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=hostport)), unquote(user) or None, unquote(password) or None


#: An unset password variable. Its name is not quoted: a password put where the name
#: goes may well look like a name.
_UNSET = "the environment variable that {} names is not set (in the regional's environment)"


def env_name(name: str, what: str) -> str:
    """``name`` if it can be an environment variable's name (the variable holding a
    password, not the password: a value that is no name is refused without quoting it)."""
    if not _IDENT.match(name):
        raise ValueError(f"{what} must be the name of an environment variable (letters, digits "
                         "and _), not the password itself")
    return name


def _read_secret(value: SecretStr | None, file: Path | None, env: str | None) -> str | None:
    """A password from the one source given (settings, file, environment), read now and
    remembered by stratoscope.redact; None: none given."""
    if value is not None:
        secret = value.get_secret_value()
    elif file is not None:
        secret = file.read_text(encoding="utf-8").strip()
    elif env is not None:
        secret = os.environ[env]
    else:
        return None
    remember(secret)
    return secret


def _held_secrets(value: SecretStr | None, env: str | None) -> list[str]:
    """The password as held in memory (given in the settings or the environment)."""
    held = [value.get_secret_value()] if value is not None else []
    if env is not None and env in os.environ:
        held.append(os.environ[env])
    return held


def dsn_database(dsn: str) -> str | None:
    """The database named by an http(s) DSN's path (None for chdb DSNs or no path)."""
    parts = urlsplit(dsn)
    if parts.scheme.lower() in ("http", "https"):
        return unquote(parts.path.strip("/")) or None
    return None


#: Where dead letters go when nothing says otherwise: ``<root>/<sink kind>``.
DEFAULT_DEAD_LETTER_ROOT = Path("/var/lib/stratoscope/dead-letter")


class SinkSettings(BaseModel):
    """Base of a sink kind's settings: frozen, typos refused, ``build()`` makes the sink."""

    # hide_input_in_errors: a ValidationError's text would otherwise quote the input,
    # passwords included (a traceback of a helper that builds settings, for one).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    #: The registry name (and the sink's name in metrics and logs).
    kind: ClassVar[str] = ""
    #: Where this sink writes blocks it can never store (regional/sinks/deadletter.py).
    #: None: ``dead_letter_path`` derives one (the regional passes its own, beside its log).
    dead_letter_dir: Path | None = None

    @property
    def dead_letter_path(self) -> Path:
        """``dead_letter_dir``, else ``DEFAULT_DEAD_LETTER_ROOT/<kind>`` (a per-sink
        subclass may derive it from its own storage: see ClickHouseSettings)."""
        return self.dead_letter_dir or DEFAULT_DEAD_LETTER_ROOT / self.kind

    def build(self) -> Sink:
        """The sink these settings describe (called in the process that runs it, which
        from then on masks the sink's secrets in its log lines: stratoscope.redact)."""
        raise NotImplementedError

    def held_secrets(self) -> list[str]:
        """The secrets these settings hold in memory (a password given in them, or in an
        environment variable), for stratoscope.redact; files are not read here."""
        return []


SINKS: dict[str, type[SinkSettings]] = {}


def register(cls: type[SinkSettings]) -> type[SinkSettings]:
    """Add a sink kind to ``SINKS``; its ``kind`` must be new."""
    if not cls.kind or cls.kind in SINKS:
        raise ValueError(f"sink kind {cls.kind!r} is empty or registered twice")
    SINKS[cls.kind] = cls
    return cls


@register
class ClickHouseSettings(SinkSettings):
    """ClickHouse over clickhouse-connect: ``chdb:///DIR`` (embedded) or ``http(s)://``."""

    kind: ClassVar[str] = "clickhouse"
    #: ``chdb:///absolute/dir`` or ``http(s)://host:8123/db``. User info in it
    #: (``https://user:pass@host/db``) still works: it is moved to ``user`` and
    #: ``password`` when the settings are validated, so ``dsn`` never holds a password.
    dsn: str
    #: The server's user (default: ClickHouse's ``default``).
    user: str | None = None
    #: The server's password: given here (never shown), or read from a file or from an
    #: environment variable when the sink connects. At most one of the three, and not
    #: with a password in the DSN.
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    #: Database of the tables; default: the http(s) DSN's path, else "stratoscope".
    database: str | None = None
    #: Apply schema migrations at start; default (None): yes for an embedded store,
    #: no for a server (Ansible applies them there).
    migrate: bool | None = None
    #: The ClickHouse cluster (``remote_servers``) the tables live on; None: one server.
    #: Set: the cluster rendering of the migrations applies (ON CLUSTER, Replicated
    #: tables, Distributed tables sharded by node) and inserts go through the
    #: Distributed tables, synchronously (docs/CLICKHOUSE.md).
    cluster: str | None = None
    #: Days kept per resolution; an unset key leaves the tables' TTL as it is (a fresh
    #: store: the schema's). Applied only by a sink that migrates.
    retention: Retention = Retention()
    #: Let ``retention`` shorten a TTL (which deletes the rows past it); otherwise such
    #: a start fails with one line naming the table.
    retention_allow_shrink: bool = False

    @model_validator(mode="before")
    @classmethod
    def _dsn_user_info(cls, data: Any) -> Any:
        """Move an http(s) DSN's user and password to ``user`` and ``password``."""
        if not isinstance(data, dict) or not isinstance(data.get("dsn"), str):
            return data
        bare, user, password = split_dsn(data["dsn"])
        if bare == data["dsn"]:
            return data
        out = {**data, "dsn": bare}
        if user is not None:
            if data.get("user") is not None:
                raise ValueError("the ClickHouse user is given twice: in clickhouse.dsn and in "
                                 "clickhouse.user; give it once")
            out["user"] = user
        if password is not None:
            given = [f"clickhouse.{n}" for n in ("password", "password_file", "password_env")
                     if data.get(n) is not None]
            if given:
                raise ValueError(f"the ClickHouse password is given twice: in clickhouse.dsn and "
                                 f"in {given[0]}; give it once (a file or an environment "
                                 "variable keeps it off the command line)")
            out["password"] = password
        return out

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, cluster: str | None) -> str | None:
        return None if cluster is None else check_cluster(cluster)

    @field_validator("password_env")
    @classmethod
    def _password_env(cls, name: str | None) -> str | None:
        return None if name is None else env_name(name, "clickhouse.password_env")

    @model_validator(mode="after")
    def _needs_server(self) -> ClickHouseSettings:
        if self.cluster is not None and self.embedded:
            raise ValueError("clickhouse.cluster needs a ClickHouse server (an http(s):// DSN); "
                             "the embedded store is one server")
        given = [f"clickhouse.{n}" for n in ("password", "password_file", "password_env")
                 if getattr(self, n) is not None]
        if self.embedded and (given or self.user is not None):
            raise ValueError(f"{(given or ['clickhouse.user'])[0]} needs a ClickHouse server (an "
                             "http(s):// DSN); the embedded store has no users")
        if len(given) > 1:
            raise ValueError(f"give one of {' and '.join(given)}, not both")
        if self.password_file is not None:
            readable_file(self.password_file, "clickhouse.password_file")
        if self.password_env is not None and self.password_env not in os.environ:
            raise ValueError(_UNSET.format("clickhouse.password_env"))
        return self

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, dsn: str) -> str:
        # A DSN with an "@" left in it is one whose user info did not parse (a password
        # with an unencoded / ? # in it): no part of it is quoted, any could be the password.
        shown = repr(dsn) if "@" not in dsn else "(not shown: it holds an '@')"
        hint = "" if "@" not in dsn else (
            "; percent-encode / ? # @ in a password in the DSN, or give it as "
            "clickhouse.password_file")
        parts = urlsplit(dsn)
        scheme = parts.scheme.lower()
        if scheme == "chdb":
            if parts.netloc or not unquote(parts.path).startswith("/"):
                raise ValueError(f"a chdb DSN is chdb:///absolute/dir, got {shown}")
        elif scheme in ("http", "https"):
            try:
                parts.port  # noqa: B018 (raises for a port that is not a number)
            except ValueError:
                raise ValueError(f"the port of ClickHouse DSN {shown} is not a number{hint}") from None
            if not parts.hostname:
                raise ValueError(f"no host in ClickHouse DSN {shown}{hint}")
            if {"password", "access_token"} & set(parse_qs(parts.query)):
                raise ValueError("a ClickHouse DSN takes no password in its query string: give it "
                                 "as clickhouse.password_file, password_env or password")
            db = dsn_database(dsn)
            if db:
                if "@" in dsn and not _IDENT.match(db):
                    raise ValueError(f"invalid ClickHouse database name in the DSN{hint}")
                check_database(db, " in the DSN")
        else:
            raise ValueError(f"unsupported ClickHouse DSN scheme {scheme!r} in {shown} "
                             "(use chdb:///DIR or http(s)://host:8123/db)")
        return dsn

    @field_validator("database")
    @classmethod
    def _database(cls, database: str | None) -> str | None:
        return None if database is None else check_database(database)

    @property
    def embedded(self) -> bool:
        return self.dsn.lower().startswith("chdb:")

    def read_password(self) -> str | None:
        """The password, from wherever it is kept, read now (in the sink's process, when
        it connects: a rotated file applies at the next connection); None: none given.
        Remembered by stratoscope.redact."""
        return _read_secret(self.password, self.password_file, self.password_env)

    def held_secrets(self) -> list[str]:
        return _held_secrets(self.password, self.password_env)

    @property
    def dead_letter_path(self) -> Path:
        """``dead_letter_dir``; else, for an embedded store ``chdb:///DIR``, the directory
        ``dead-letter/clickhouse`` beside DIR (on the disk that holds the data); else
        ``DEFAULT_DEAD_LETTER_ROOT/clickhouse``."""
        if self.dead_letter_dir is not None:
            return self.dead_letter_dir
        if self.embedded:
            return Path(unquote(urlsplit(self.dsn).path)).parent / "dead-letter" / self.kind
        return DEFAULT_DEAD_LETTER_ROOT / self.kind

    def build(self) -> Sink:
        from stratoscope.regional.sinks.clickhouse import ClickHouseSink

        install_log_filter()
        remember(*self.held_secrets())
        migrate = self.embedded if self.migrate is None else self.migrate
        return ClickHouseSink(self.dsn, self.database, migrate, cluster=self.cluster,
                              retention=self.retention,
                              retention_allow_shrink=self.retention_allow_shrink,
                              dead_letter_dir=self.dead_letter_path,
                              user=self.user, password=self.read_password)


@register
class KafkaSettings(SinkSettings):
    """Kafka over aiokafka (idempotent producer, acks=all); security as aiokafka names it."""

    kind: ClassVar[str] = "kafka"
    #: host:port[,host:port...]
    bootstrap: str = Field(min_length=1)
    topic_prefix: str = Field(default="stratoscope", min_length=1)
    #: auto (zstd when available, else gzip), none, gzip, zstd, lz4 or snappy.
    compression: Literal["auto", "none", "gzip", "zstd", "lz4", "snappy"] = "auto"
    request_timeout: Duration = 30.0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: CA bundle that signed the brokers' certificates (SSL, SASL_SSL).
    ssl_cafile: Path | None = None
    #: This regional's client certificate and key, for brokers that require them.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    #: The SASL password: given here (never logged), or read from a file or from an
    #: environment variable when the sink starts. At most one of the three.
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    sasl_password_env: str | None = None

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, bootstrap: str) -> str:
        for hp in bootstrap.split(","):
            host, sep, port = hp.strip().rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"expected host:port[,host:port...], got {bootstrap!r}")
        return bootstrap

    @field_validator("sasl_password_env")
    @classmethod
    def _password_env(cls, name: str | None) -> str | None:
        return None if name is None else env_name(name, "sasl_password_env")

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL")
        ssl = self.security_protocol.endswith("SSL")
        given = [n for n in ("sasl_password", "sasl_password_file", "sasl_password_env")
                 if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {' and '.join(given)}, not both")
        if sasl and (self.sasl_username is None or not given):
            raise ValueError(f"security_protocol {self.security_protocol} needs "
                             "sasl_username and a password (sasl_password, sasl_password_file "
                             "or sasl_password_env)")
        if not sasl and (self.sasl_username is not None or given):
            raise ValueError("SASL credentials need security_protocol SASL_PLAINTEXT "
                             "or SASL_SSL")
        if not ssl and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError("ssl_cafile/ssl_certfile/ssl_keyfile need security_protocol "
                             "SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
            path = getattr(self, name)
            if path is not None:
                readable_file(path, name)
        if self.sasl_password_env is not None and self.sasl_password_env not in os.environ:
            raise ValueError(_UNSET.format("sasl_password_env"))
        if self.compression in ("zstd", "lz4", "snappy"):
            from aiokafka.codec import has_lz4, has_snappy, has_zstd

            if not {"zstd": has_zstd, "lz4": has_lz4, "snappy": has_snappy}[self.compression]():
                raise ValueError(f"compression {self.compression} needs the 'cramjam' "
                                 "package, which is not installed (use auto or gzip)")
        return self

    def password(self) -> str | None:
        """The SASL password, from wherever it is kept (read now, not stored);
        remembered by stratoscope.redact."""
        return _read_secret(self.sasl_password, self.sasl_password_file, self.sasl_password_env)

    def held_secrets(self) -> list[str]:
        return _held_secrets(self.sasl_password, self.sasl_password_env)

    def security(self) -> dict[str, Any]:
        """aiokafka's security arguments (the SSL context is built here, in the process
        that runs the producer: an SSLContext does not pickle)."""
        ctx = None
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            ctx = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return {"security_protocol": self.security_protocol, "ssl_context": ctx,
                "sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.password()}

    def build(self) -> Sink:
        from stratoscope.regional.sinks.kafka import KafkaSink

        install_log_filter()
        sec = self.security()
        return KafkaSink(self.bootstrap, self.topic_prefix, request_timeout_s=self.request_timeout,
                         compression=self.compression, dead_letter_dir=self.dead_letter_path, **sec)
