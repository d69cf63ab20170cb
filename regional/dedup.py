"""Remembers which (node_id, boot_id, seq) batches were accepted.

Per boot: the highest seq below which everything was seen, plus the set of
seqs seen above it (edges send in order, so the set stays tiny). Boots are
kept in LRU order and bounded; a boot evicted long after its last batch can
no longer be resent by its edge, which drops acked batches.

Bounded per node as well as in all: a node minting boot_ids (a crash loop, or a
client doing it on purpose) evicts its own oldest boots, never another node's. A
gap in one boot's seqs grows its set only to ``max_above``: past it, the floor
jumps over the older half of the set (those gaps count as seen) and the jump is
counted (``floor_jumps``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class _Boot:
    floor: int = 0  # every seq <= floor has been seen
    above: set[int] = field(default_factory=set)


class Deduplicator:
    def __init__(self, max_boots: int = 200_000, max_boots_per_node: int = 64,
                 max_above: int = 4096) -> None:
        self._boots: OrderedDict[tuple[str, str], _Boot] = OrderedDict()
        #: each node's boots, oldest first (the same LRU order as ``_boots``)
        self._nodes: dict[str, OrderedDict[str, None]] = {}
        self.max_boots = max_boots
        self.max_boots_per_node = max_boots_per_node
        self.max_above = max_above
        #: boots a node lost to its own newer ones (past ``max_boots_per_node``)
        self.evicted_by_own_node = 0
        #: times a boot's seen-set passed ``max_above`` and its floor jumped
        self.floor_jumps = 0
        #: boots forgotten because the whole table passed ``max_boots``
        self.evicted_oldest = 0

    @property
    def boots(self) -> int:
        """Boots (node, boot_id) whose sequence numbers are remembered."""
        return len(self._boots)

    def seen(self, node_id: str, boot_id: str, seq: int) -> bool:
        boot = self._boots.get((node_id, boot_id))
        return boot is not None and (seq <= boot.floor or seq in boot.above)

    def _drop(self, node_id: str, boot_id: str) -> None:
        del self._boots[(node_id, boot_id)]
        boots = self._nodes[node_id]
        del boots[boot_id]
        if not boots:
            del self._nodes[node_id]

    def _touch(self, key: tuple[str, str]) -> _Boot:
        """The boot's record, created (evicting the node's own oldest boot past
        ``max_boots_per_node``, then the least recently used past ``max_boots``) or
        moved to the newest end."""
        node_id, boot_id = key
        boot = self._boots.get(key)
        if boot is None:
            boot = self._boots[key] = _Boot()
            boots = self._nodes.setdefault(node_id, OrderedDict())
            boots[boot_id] = None
            while len(boots) > self.max_boots_per_node:
                self._drop(node_id, next(iter(boots)))
                self.evicted_by_own_node += 1
            while len(self._boots) > self.max_boots:
                self._drop(*next(iter(self._boots)))
                self.evicted_oldest += 1
        else:
            self._boots.move_to_end(key)
            self._nodes[node_id].move_to_end(boot_id)
        return boot

    def add(self, node_id: str, boot_id: str, seq: int) -> None:
        boot = self._touch((node_id, boot_id))
        if seq <= boot.floor:
            return
        boot.above.add(seq)
        self._settle(boot)

    def _settle(self, boot: _Boot) -> None:
        while boot.floor + 1 in boot.above:
            boot.floor += 1
            boot.above.discard(boot.floor)
        if len(boot.above) > self.max_above:  # a pathological gap: forget the older half
            boot.floor = sorted(boot.above)[len(boot.above) // 2]
            boot.above = {s for s in boot.above if s > boot.floor}
            self.floor_jumps += 1
            while boot.floor + 1 in boot.above:
                boot.floor += 1
                boot.above.discard(boot.floor)

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
            self._settle(b)
