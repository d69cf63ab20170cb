"""Liveness: a process that is alive but stops answering is noticed within a deadline.

The edge fails over when a regional leaves its batches unanswered past ``ack_timeout``
(the batches it left unanswered stay in doubt there); the regional notices a sink process
or its ingest process that stops answering within ``child_timeout`` (docs/GUARANTEES.md).
Deadlines are set short here by flags; every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import time
from pathlib import Path

from stratoscope.edge.forward import GrpcForwarder
from stratoscope.edge.spool import Spool
from tests.conftest import free_port, wait_for
from tests.integration.test_edge_spool import batch, fake_regional


def test_a_regional_that_stops_answering_is_failed_over_and_keeps_its_batches(tmp_path: Path) -> None:
    """A takes batches 1-3 and never answers (alive, connected, silent): after the deadline
    the edge counts it, new batches go to B at once, and 1-3 stay held for A (never sent to
    B) until A answers them."""
    pa, pb_ = free_port(), free_port()
    targets = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"]
    with fake_regional(pb_, answer=True) as b:
        with fake_regional(pa, answer=False) as a:
            fwd = GrpcForwarder(targets, compression="none", backoff_initial_s=0.1,
                                spool=Spool(tmp_path / "spool"), ack_timeout_s=2.0)
            for seq in (1, 2, 3):
                fwd.write(batch(seq))
            wait_for("A received 1-3", lambda: len(a.got) >= 3, 30, every_s=0.05)
            assert fwd.errors["ack_timeout"] == 0
            wait_for("the ack deadline to end the stream to A",
                     lambda: fwd.errors["ack_timeout"] >= 1, 2.0 + 30, every_s=0.05)
            fwd.write(batch(4))
            fwd.write(batch(5))
            wait_for("B acknowledged 4 and 5", lambda: fwd.stats.acked == 2, 30, every_s=0.05)
            assert b.got == [("boot-1", 4), ("boot-1", 5)]
            assert set(a.got) == {("boot-1", 1), ("boot-1", 2), ("boot-1", 3)}
            assert fwd.counts()["in_doubt"] == 3
        with fake_regional(pa, answer=True) as a2:  # A answers again
            wait_for("A answered 1-3", lambda: fwd.unacked == 0, 60, every_s=0.05)
        assert set(a2.got) == {("boot-1", 1), ("boot-1", 2), ("boot-1", 3)}
        assert b.got == [("boot-1", 4), ("boot-1", 5)]
        assert (fwd.stats.acked, fwd.stats.in_doubt_released, fwd.counts()["in_doubt"]) == (5, 0, 0)
        assert fwd.counts()["errors.ack_timeout"] >= 1
        assert fwd.close(0)


def test_a_regional_that_answers_slowly_but_steadily_is_not_failed_over(tmp_path: Path) -> None:
    """16 batches answered one every 0.25 s: the last waits 4 s, past the 2.5 s deadline,
    but answers never stop for long, so A keeps them all and B gets none."""
    pa, pb_ = free_port(), free_port()
    with fake_regional(pb_, answer=True) as b, fake_regional(pa, answer=False) as a:
        fwd = GrpcForwarder([f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"], compression="none",
                            spool=Spool(tmp_path / "spool"), ack_timeout_s=2.5)
        for seq in range(1, 17):
            fwd.write(batch(seq))
        wait_for("A received all 16", lambda: len(a.got) == 16, 30, every_s=0.05)
        started = time.monotonic()
        for seq in range(1, 17):
            next_at = started + 0.25 * seq
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the answers, not a wait
            a.release.put(("boot-1", seq))
        wait_for("A answered all 16", lambda: fwd.unacked == 0, 30, every_s=0.05)
        assert time.monotonic() - started > 2.5  # the last one waited longer than the deadline
        assert fwd.errors["ack_timeout"] == 0 and b.got == [] and fwd.stats.acked == 16
        assert fwd.close(0)
