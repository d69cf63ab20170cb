"""The dead-letter directory: blocks a sink can never store, kept on disk for a person.

A block goes here only when the data itself is refused -- it cannot be shaped into the
sink's rows, or the backend rejects that block's rows and no other's -- never for an
error a person can fix (credentials, a read-only or full store, a missing table: those
are retried, see regional/sinks/base.py). Once written here the block counts as done
for the regional's log (``DeliveryQueue.on_done``), so this directory is the only copy.

Per block, two files named ``<UTC time>-<block id>``:

- ``.frame.pickle``: the block's slice of its merged frame (``Frame.subset``: the one
  part, its rows, the frame's string table), a pickled ``stratoscope.regional.frame.Frame``.
  ``load_dead_letter(path)`` gives the block back, to inspect its columns or to replay
  it into a sink (``await sink.deliver(load_dead_letter(path))``) once the cause is fixed.
- ``.json``: sink, block_id, reason, time, node, window, resolution and row counts.

Files are written to a temporary name, fsynced and renamed, so a crash leaves no half
file under a final name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

from stratoscope.regional.frame import Block, Frame, blocks_of

__all__ = ["load_dead_letter", "write_dead_letter"]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dead_letter(directory: Path, sink: str, block: Block, reason: str) -> Path:
    """Write ``block`` and its sidecar to ``directory`` (created if missing); returns the
    sidecar's path. Logs one error line naming the block, the reason and the file."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    base = f"{stamp}-{_UNSAFE.sub('_', block.block_id)[:150]}"
    frame = block.frame.subset([block.part])
    data_name = base + ".frame.pickle"
    _write(directory / data_name, pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))
    part = block.frame.parts[block.part]
    try:
        node = block.node
    except IndexError:  # a part whose node id is not in the string table
        node = f"<string {part.node}>"
    meta: dict[str, Any] = {
        "sink": sink,
        "block_id": block.block_id,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "unix_time": now,
        "node": node,
        "resolution_s": block.resolution_s,
        "window_start_ns": block.frame.start_ns,
        "window_end_ns": block.frame.end_ns,
        "late": block.frame.late,
        "rows": {"metrics": len(frame.metrics), "histograms": len(frame.histograms),
                 "profiles": len(frame.profiles), "events": len(frame.events)},
        "data": data_name,
        "format": "pickle of stratoscope.regional.frame.Frame holding this one block; "
                  "stratoscope.regional.sinks.deadletter.load_dead_letter() reads it",
    }
    sidecar = directory / (base + ".json")
    _write(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    log.error("sink %s: block %s can never be stored (%s); written to the dead-letter file %s",
              sink, block.block_id, reason, sidecar)
    return sidecar


def load_dead_letter(path: Path | str) -> list[Block]:
    """The block of a dead-letter file (its ``.json`` sidecar or its ``.frame.pickle``)."""
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_name(json.loads(p.read_text())["data"])
    with open(p, "rb") as f:
        frame = pickle.load(f)  # noqa: S301 (our own files)
    if not isinstance(frame, Frame):
        raise ValueError(f"{p} does not hold a Frame")
    return blocks_of(frame)
