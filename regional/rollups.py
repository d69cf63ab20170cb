"""Roll-ups across nodes, as the program descriptions declare them.

A metric's description in bpf/<program>.yaml may say ``rollup: [labels]``: the
regional then also sums that metric over every node per window, keeping only
those labels (node "" in the output). Declaring it beside the metric keeps the
rule "a new signal is two files in bpf/": nothing in the regional names a metric.

The regional reads only the ``rollup`` keys here, not the whole description: the
edge validates descriptions (edge/spec.py, which also checks that roll-up labels
are labels of the key) and the two sides share no code but the wire contract.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stratoscope.resources import bpf_dir


@dataclass(frozen=True)
class Rollup:
    """Sum a metric across nodes, keeping only the `by` labels."""

    metric: str
    by: tuple[str, ...] = ()


def rollups_of(description: dict[str, Any]) -> list[Rollup]:
    """The roll-ups one parsed description declares (counters on their value
    entries, histograms on the map), in declaration order."""
    out: list[Rollup] = []
    for m in description.get("maps") or ():
        if m.get("kind") == "counters":
            out.extend(Rollup(v["metric"], tuple(v["rollup"]))
                       for v in m.get("values") or () if v.get("rollup") is not None)
        elif m.get("kind") == "histogram" and m.get("rollup") is not None:
            out.append(Rollup(m["metric"], tuple(m["rollup"])))
    return out


def declared_rollups(programs_dir: Path | None = None) -> tuple[Rollup, ...]:
    """Every roll-up the descriptions in ``programs_dir`` (default: the packaged
    bpf/) declare, sorted by program file name."""
    d = programs_dir or bpf_dir()
    return tuple(_read_all(sorted(d.glob("*.yaml"))))


def _read_all(paths: Iterable[Path]) -> Iterable[Rollup]:
    for path in paths:
        yield from rollups_of(yaml.safe_load(path.read_text()) or {})
