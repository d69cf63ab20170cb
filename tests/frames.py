"""Blocks for sink tests, built the way the regional builds them.

Every edge batch takes the production path from the wire to the sinks: serialized and
parsed again, decoded to columns (``batchcols.decode``) and checked by the ingest
validator's structural rules, packed and unpacked for the hop to the merge
(``handover``), recorded into the real ``Aggregator`` and merged when its windows
close. What comes out is the list of ``Block``s (parts of merged ``Frame``s) that the
regional hands its sinks: the sink tests build their blocks with ``merged_blocks``
and no other way. ``blank_blocks`` is for tests of what carries blocks without
reading their rows (the delivery queue), which need chosen block ids.

A batch with node_id "" stands for a roll-up part: the merge makes node "" the
roll-up across nodes, and a test can so choose the roll-up's exact rows (the ingest
validator refuses such a batch from an edge; the rest of its path is the same).
"""

from __future__ import annotations

from collections.abc import Sequence

from stratoscope.regional.batchcols import decode
from stratoscope.regional.frame import Block, Frame, Part, blocks_of
from stratoscope.regional.handover import pack, unpack
from stratoscope.regional.merge import Aggregator, MergeSettings, Rollup
from stratoscope.regional.sinks.kafka import block_batch
from stratoscope.regional.validate import Limits, check_columns
from stratoscope.v1 import batch_pb2 as pb

__all__ = ["blank_blocks", "block_batch", "merged_blocks", "merged_frame"]


def merged_blocks(
    *batches: pb.Batch,
    regional_id: str = "test-regional",
    resolution_s: int = 60,
    rollups: Sequence[Rollup] = (),
    frame_nodes: int = 250,
) -> list[Block]:
    """The blocks of every window of ``batches``, merged and closed.

    A block's id depends only on the batches in it (regional/merge.py), so ``regional_id``
    is also appended to every batch's boot id here: tests that need two distinct blocks of
    the same content give them distinct regional ids, and the same id gives the same
    block again (a redelivery).
    """
    agg = Aggregator(
        MergeSettings(resolution_s=resolution_s, lateness_s=0, rollups=tuple(rollups),
                      frame_nodes=frame_nodes),
        regional_id=regional_id,
    )
    for batch in batches:
        copy = pb.Batch.FromString(batch.SerializeToString())
        copy.boot_id = f"{copy.boot_id}@{regional_id}"
        cols = decode(copy)
        check_columns(cols, Limits())
        agg.record(unpack(pack(cols)))
    return agg.flush(0, force=True)


def merged_frame(*batches: pb.Batch, **settings: object) -> Frame:
    """The one frame ``batches`` merge into (fails if they make several)."""
    blocks = merged_blocks(*batches, **settings)  # type: ignore[arg-type]
    frames = {id(b.frame): b.frame for b in blocks}
    assert len(frames) == 1, f"{len(frames)} frames"
    return blocks[0].frame


def blank_blocks(*block_ids: str, resolution_s: int = 60) -> list[Block]:
    """Blocks of one frame with no rows, one per id (node "node-a" each), in that order."""
    frame = Frame(0, resolution_s * 1_000_000_000, resolution_s, False, ["", "node-a"],
                  [Part(1, bid) for bid in block_ids], [])
    return blocks_of(frame)
