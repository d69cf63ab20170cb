"""Secrets out of what a process prints: the secret values it has read, and a log filter
that masks them.

Why a second line: every message that could carry a secret is built without it (a DSN is
shown without its user info, a password file's contents are never quoted); but a library's
own exception text or log line is not ours to write (clickhouse-connect quotes URLs,
urllib3 logs the requests it retries). So whatever reads a secret -- the ClickHouse sink
when it connects, the Kafka settings when they build the producer, the regional's
settings for the passwords they hold -- calls ``remember()``, and ``redact()`` (applied to
sink errors, to what ``stratoscope regional --check`` prints, and by ``RedactingFilter`` to
every log record of the process) replaces each remembered value with ``***``.

The set is per process: a sink's child process masks what it read itself. Values shorter
than ``MIN_CHARS`` are not remembered (masking every "ab" would garble the logs and hide
nothing: such a password is guessed, not read off a log).
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "MIN_CHARS", "RedactingFilter", "install_log_filter", "redact", "remember"]

MASK = "***"
#: Shortest value remembered.
MIN_CHARS = 4


class _Secrets:
    """The values to mask, longest first (a value that contains another is masked whole)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        # as written, and as it appears inside a URL (percent-encoded, + for space)
        forms = {value, quote(value, safe=""), quote(value), quote_plus(value)}
        with self._lock:
            merged = set(self._values) | {f for f in forms if len(f) >= MIN_CHARS}
            self._values = tuple(sorted(merged, key=len, reverse=True))

    def mask(self, text: str) -> str:
        for value in self._values:  # a tuple swapped whole by add(): no lock needed here
            if value in text:
                text = text.replace(value, MASK)
        return text


_SECRETS = _Secrets()


def remember(*values: str | None) -> None:
    """Mask these values (and their URL-encoded forms) from now on in this process;
    None and values shorter than MIN_CHARS are skipped."""
    for value in values:
        if value is not None and len(value) >= MIN_CHARS:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` with every remembered secret replaced by ``***``."""
    return _SECRETS.mask(text)


class RedactingFilter(logging.Filter):
    """A handler filter that masks remembered secrets in a record's message, exception
    text and stack: the record is formatted here, once, and its arguments dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: logging reports those itself
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_filter() -> None:
    """Put the filter on every handler of the root logger (and on logging's last-resort
    handler), once each: what any logger of this process writes goes through one of them.
    Call it after logging is configured; calling it again is harmless."""
    handlers = list(logging.getLogger().handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
