"""The ingest process's first code: its stderr tap, and gRPC's verbosity set before gRPC is
imported.

Why a module of its own: gRPC reads GRPC_VERBOSITY once, when it is imported, and at ERROR
(the CLI's default: stratoscope/cli.py) or NONE it writes no INFO line, among them its line
about each TLS handshake it refuses, which regional/handshakes.py counts. This module
imports nothing of gRPC; the spawned process starts here, puts the tap on its stderr,
unsets GRPC_VERBOSITY (abseil's default: every line), and only then imports
regional/ingest.py, and gRPC with it, and loads the arguments meant for it (a pickle of
objects whose modules import gRPC). The tap shows gRPC's lines as the verbosity asked for
would have (handshakes.lowest_shown); the ones about refused handshakes are counted in any
case. Without TLS (no tap) nothing is changed.
"""

from __future__ import annotations

import os
import pickle
import queue
from multiprocessing.connection import Connection
from typing import Any

from stratoscope.regional import handshakes
from stratoscope.regional.pipes import InheritedFd


def main(conn: Connection, tap: tuple[InheritedFd, InheritedFd] | None, verbosity: str | None,
         args: bytes) -> None:
    """``tap``: the pipe (read end, write end) to make this process's stderr; ``verbosity``:
    the GRPC_VERBOSITY the regional had; ``args``: regional/ingest.py's IngestArgs,
    pickled."""
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stderr_tap = None
    if tap is not None:
        stderr_tap = handshakes.Tap(
            lambda refused, held, dropped: out.put(handshakes.Handshakes(refused, held, dropped)),
            read_fd=tap[0].fd, write_fd=tap[1].fd, show=handshakes.lowest_shown(verbosity))
        stderr_tap.start()  # first: every line gRPC writes passes the tap
        if (verbosity or "").strip().upper() != "DEBUG":  # DEBUG: every line, and more
            os.environ.pop("GRPC_VERBOSITY", None)
    from stratoscope.regional.ingest import _ingest_main

    _ingest_main(conn, pickle.loads(args), out, stderr_tap)
