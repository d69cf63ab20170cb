"""Embedded ClickHouse: forget insert tokens whose parts a killed process never stored.

A MergeTree table with ``non_replicated_deduplication_window`` keeps the tokens of its
recent inserts in ``deduplication_logs/deduplication_log_<n>.txt``, one line per event:
``<op>\\t<part name>\\t<block id>`` (op 1 = the part was added, 2 = dropped). ClickHouse
writes the line *before* it renames the new part from its ``tmp_insert_*`` directory
into place. A process killed between the two (embedded ClickHouse dies with the
regional) leaves a token whose rows were never stored: the next start deletes the
temporary directory and keeps the token, so the replay of that very insert from the
regional's write-ahead log is discarded as a duplicate and its rows are lost
(docs/GUARANTEES.md, "ClickHouse").

:func:`repair_deduplication_logs` runs before the engine opens the directory. A token is
forgotten when the part it names is newer than every part its partition holds on disk
and no part covers it: the one way that state arises is an insert that never
finished. Anything it does not recognise (another log format, a part name it cannot
read) is left as it is and said in the result; it never deletes data, only log lines.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EngineOpen", "Forgotten", "repair_before_open", "repair_deduplication_logs"]

_LOG_NAME = re.compile(r"^deduplication_log_(\d+)\.txt$")
#: partition ids never hold "_" (ClickHouse parses part names the same way)
_PART_NAME = re.compile(r"^([^_]+)_(\d+)_(\d+)_(\d+)(?:_(\d+))?$")
_ADD, _DROP = "1", "2"


@dataclass(frozen=True)
class Forgotten:
    """A token forgotten: the table directory, the part it named, the block id."""

    table_dir: str
    part: str
    block_id: str


def _part_range(name: str) -> tuple[str, int, int] | None:
    m = _PART_NAME.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def _parts_on_disk(table_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """(min block, max block) of every committed part directory, by partition."""
    parts: dict[str, list[tuple[int, int]]] = {}
    for entry in os.scandir(table_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        rng = _part_range(entry.name)  # tmp_*, detached, deduplication_logs do not parse
        if rng is not None:
            parts.setdefault(rng[0], []).append((rng[1], rng[2]))
    return parts


def _log_files(logs_dir: Path) -> list[Path]:
    found = []
    for entry in os.scandir(logs_dir):
        m = _LOG_NAME.match(entry.name)
        if m is not None and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    return [p for _, p in sorted(found)]


def _stale(part: str, on_disk: dict[str, list[tuple[int, int]]]) -> bool | None:
    """True when ``part`` was never stored (no part covers it and it is newer than every
    part of its partition); None when its name cannot be read."""
    rng = _part_range(part)
    if rng is None:
        return None
    partition, lo, hi = rng
    ranges = on_disk.get(partition, [])
    if any(a <= lo and hi <= b for a, b in ranges):
        return False
    return all(b < lo for _, b in ranges)


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(prefix=".repair-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def repair_table(table_dir: Path, dry_run: bool = False) -> tuple[list[Forgotten], list[str]]:
    """Forget the never-stored tokens of one table; returns (forgotten, what was not
    understood)."""
    logs_dir = table_dir / "deduplication_logs"
    if not logs_dir.is_dir():
        return [], []
    on_disk = _parts_on_disk(table_dir)
    forgotten: list[Forgotten] = []
    odd: list[str] = []
    for log in _log_files(logs_dir):
        with open(log, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.readlines()
        keep: list[str] = []
        changed = False
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3 or fields[0] not in (_ADD, _DROP) or not line.endswith("\n"):
                if line.strip():
                    odd.append(f"{log}: unrecognised line {line[:80]!r}")
                keep.append(line)
                continue
            op, part, block_id = fields
            if op == _ADD:
                stale = _stale(part, on_disk)
                if stale is None:
                    odd.append(f"{log}: unreadable part name {part[:80]!r}")
                elif stale:
                    forgotten.append(Forgotten(str(table_dir), part, block_id))
                    changed = True
                    continue
            keep.append(line)
        if changed and not dry_run:
            _rewrite(log, keep)
    return forgotten, odd


def repair_deduplication_logs(path: str | Path, dry_run: bool = False) -> tuple[list[Forgotten], list[str]]:
    """Repair every table of the embedded ClickHouse at ``path`` (a directory no engine
    has open). Returns (tokens forgotten, lines or names not understood)."""
    root = Path(path)
    forgotten: list[Forgotten] = []
    odd: list[str] = []
    seen: set[str] = set()
    for logs_dir in sorted(root.glob("store/*/*/deduplication_logs")) + sorted(root.glob("data/*/*/deduplication_logs")):
        table_dir = logs_dir.parent.resolve()
        if str(table_dir) in seen:
            continue
        seen.add(str(table_dir))
        f, o = repair_table(table_dir, dry_run)
        forgotten += f
        odd += o
    return forgotten, odd


class EngineOpen(RuntimeError):
    """Another engine holds the directory (its ``status`` file is locked)."""


def repair_before_open(path: str | Path) -> tuple[list[Forgotten], list[str]]:
    """:func:`repair_deduplication_logs` under the engine's own lock: ClickHouse holds an
    exclusive ``flock`` on ``<path>/status`` while it has the directory open, in this
    process or another, and a log is rewritten only while nobody does. Raises
    :class:`EngineOpen` when the lock is taken. A clean close deletes ``status``: without
    it the last engine stopped cleanly (or none ever opened the directory), and there is
    nothing to repair. The file left unlocked is the mark of an engine that was killed."""
    import fcntl

    status = Path(path) / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except FileNotFoundError:
        return [], []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EngineOpen(f"{path} is open in another ClickHouse engine") from None
        return repair_deduplication_logs(path)
    finally:
        os.close(fd)  # releases the lock
