"""Remembers which (node_id, boot_id, seq) batches were accepted.

Per boot: the highest seq below which everything was seen, plus the set of
seqs seen above it (edges send in order, so the set stays tiny). Boots are
kept in LRU order and bounded; a boot evicted long after its last batch can
no longer be resent by its edge, which drops acked batches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class _Boot:
    floor: int = 0  # every seq <= floor has been seen
    above: set[int] = field(default_factory=set)


class Deduplicator:
    def __init__(self, max_boots: int = 200_000) -> None:
        self._boots: OrderedDict[tuple[str, str], _Boot] = OrderedDict()
        self.max_boots = max_boots

    def seen(self, node_id: str, boot_id: str, seq: int) -> bool:
        boot = self._boots.get((node_id, boot_id))
        return boot is not None and (seq <= boot.floor or seq in boot.above)

    def _touch(self, key: tuple[str, str]) -> _Boot:
        """The boot's record, created (evicting the least recently used past
        ``max_boots``) or moved to the newest end."""
        boot = self._boots.get(key)
        if boot is None:
            boot = self._boots[key] = _Boot()
            while len(self._boots) > self.max_boots:
                self._boots.popitem(last=False)
        else:
            self._boots.move_to_end(key)
        return boot

    def add(self, node_id: str, boot_id: str, seq: int) -> None:
        boot = self._touch((node_id, boot_id))
        if seq <= boot.floor:
            return
        boot.above.add(seq)
        while boot.floor + 1 in boot.above:
            boot.floor += 1
            boot.above.discard(boot.floor)
        if len(boot.above) > 100_000:  # a pathological gap: forget the oldest
            boot.floor = min(boot.above) - 1

    def forget(self, node_id: str, boot_id: str, seq: int) -> None:
        """Un-see one batch (it was admitted but could not be logged)."""
        boot = self._boots.get((node_id, boot_id))
        if boot is None:
            return
        if seq > boot.floor:
            boot.above.discard(seq)
            return
        boot.above |= set(range(seq + 1, boot.floor + 1))
        boot.floor = seq - 1

    def state(self) -> list[tuple[str, str, int, list[int]]]:
        """Everything remembered, oldest boot first: (node_id, boot_id, floor, seqs above
        it). Loaded back by ``load`` (the write-ahead log's checkpoints)."""
        return [(node, boot, b.floor, sorted(b.above)) for (node, boot), b in self._boots.items()]

    def load(self, state: list[tuple[str, str, int, list[int]]]) -> None:
        """Add a ``state()`` to what is remembered (in its order, as the newest)."""
        for node, boot, floor, above in state:
            b = self._touch((node, boot))
            b.floor = max(b.floor, floor)
            b.above = {s for s in b.above | set(above) if s > b.floor}
            while b.floor + 1 in b.above:
                b.floor += 1
                b.above.discard(b.floor)
