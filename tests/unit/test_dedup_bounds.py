"""The de-duplication state is bounded per node and per boot (issue 20, scope 2): one
client minting boot_ids or skipping seqs cannot evict other nodes' state or grow a set
without bound."""

from __future__ import annotations

from stratoscope.regional.dedup import Deduplicator


def test_a_node_minting_boot_ids_evicts_only_its_own_oldest() -> None:
    d = Deduplicator(max_boots=1000, max_boots_per_node=4)
    d.add("honest", "b0", 1)
    for i in range(10_000):
        d.add("minter", f"boot-{i}", 1)
    assert d.seen("honest", "b0", 1)
    assert [b for n, b, _, _ in d.state() if n == "minter"] == [f"boot-{i}" for i in range(9996, 10_000)]
    assert d.evicted_by_own_node == 9996
    assert len(d.state()) == 5


def test_the_global_bound_still_holds_and_keeps_the_node_index_consistent() -> None:
    d = Deduplicator(max_boots=3, max_boots_per_node=2)
    for node in "abcd":
        d.add(node, "b", 1)
    assert [n for n, _, _, _ in d.state()] == ["b", "c", "d"]
    d.add("a", "b", 1)  # "a" forgotten globally, then seen anew
    d.add("a", "c", 1)
    d.add("a", "d", 1)  # its own oldest ("b") goes, not another node's
    assert [(n, b) for n, b, _, _ in d.state()] == [("d", "b"), ("a", "c"), ("a", "d")]
    assert d.evicted_by_own_node == 1


def test_a_gap_grows_a_boots_set_only_to_max_above() -> None:
    d = Deduplicator(max_above=4096)
    for seq in range(2, 2 * 10_000, 2):  # seq 1 never comes, nor any odd one
        d.add("n", "b", seq)
        assert len(d.state()[0][3]) <= 4096
    assert d.floor_jumps > 0
    [(_, _, floor, above)] = d.state()
    assert above[-1] == 2 * 10_000 - 2 and min(above) > floor
    assert d.seen("n", "b", 1)  # the gap jumped over counts as seen
    assert not d.seen("n", "b", above[-1] + 1)


def test_a_touched_boot_is_the_newest_of_its_node() -> None:
    d = Deduplicator(max_boots_per_node=2)
    d.add("n", "old", 1)
    d.add("n", "new", 1)
    d.add("n", "old", 2)  # "old" is used again: "new" is now the oldest
    d.add("n", "third", 1)
    assert [b for _, b, _, _ in d.state()] == ["old", "third"]
