"""Profiles out: folded stacks, gzipped pprof and a self-contained SVG flame graph, from
the rows of the ``flamegraph`` cookbook query.

Input rows are ``(stack, samples, cpu_time_ns)``, a stack being
``comm;user root..leaf;kernel root..leaf`` with kernel frames suffixed ``_[k]``
(flamegraph.pl's convention, what deploy/clickhouse/queries/flamegraph.sql returns).

* folded: ``stack samples`` lines, root first: flamegraph.pl, speedscope and inferno read it.
* pprof: profile.proto (vendored from google/pprof), gzipped, as ``go tool pprof`` reads
  it: sample types samples/count and cpu/nanoseconds, the process name as the ``comm``
  label (``-tagroot comm`` puts it back on top), kernel functions in file ``[kernel]``.
* svg: one file, no scripts or external resources; every frame is a ``<g>`` with a
  ``<title>`` (name, samples, share), a ``<rect>`` and, when it fits, a ``<text>``.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["KERNEL_SUFFIX", "folded", "pprof", "svg"]

KERNEL_SUFFIX = "_[k]"

Row = Sequence[Any]


def _stacks(rows: Iterable[Row]) -> list[tuple[list[str], int, int]]:
    """(frames root first, samples, cpu ns) of each row with samples."""
    out = []
    for row in rows:
        stack, samples = str(row[0]), int(row[1])
        cpu = int(row[2]) if len(row) > 2 and row[2] is not None else 0
        if samples > 0:
            out.append((stack.split(";"), samples, cpu))
    return out


def folded(rows: Iterable[Row]) -> str:
    """Brendan Gregg's collapsed format: ``frame;frame;... count`` per line, root first."""
    return "".join(f"{';'.join(frames)} {n}\n" for frames, n, _ in _stacks(rows))


def pprof(rows: Iterable[Row], *, start_s: int = 0, end_s: int = 0) -> bytes:
    """A gzipped profile.proto of the rows (``go tool pprof -top FILE`` reads it)."""
    from stratoscope.pprof import profile_pb2 as pp

    prof = pp.Profile()
    strings: dict[str, int] = {}

    def s(text: str) -> int:
        if text not in strings:
            strings[text] = len(strings)
            prof.string_table.append(text)
        return strings[text]

    s("")
    prof.sample_type.add(type=s("samples"), unit=s("count"))
    prof.sample_type.add(type=s("cpu"), unit=s("nanoseconds"))
    prof.period_type.type, prof.period_type.unit = s("cpu"), s("nanoseconds")
    prof.default_sample_type = s("cpu")
    functions: dict[str, int] = {}  # frame as folded -> function id == location id
    stacks = _stacks(rows)
    total_samples = sum(n for _, n, _ in stacks)
    total_cpu = sum(c for _, _, c in stacks)
    if total_samples:
        prof.period = total_cpu // total_samples
    for frames, n, cpu in stacks:
        comm, frames = frames[0], frames[1:] or ["[no stack]"]
        ids = []
        for frame in reversed(frames):  # pprof: leaf first
            fid = functions.get(frame)
            if fid is None:
                fid = functions[frame] = len(functions) + 1
                kernel = frame.endswith(KERNEL_SUFFIX)
                name = frame[: -len(KERNEL_SUFFIX)] if kernel else frame
                prof.function.add(id=fid, name=s(name), system_name=s(name),
                                  filename=s("[kernel]" if kernel else ""))
                loc = prof.location.add(id=fid)
                loc.line.add(function_id=fid)
            ids.append(fid)
        sample = prof.sample.add(location_id=ids, value=[n, cpu])
        sample.label.add(key=s("comm"), str=s(comm))
    if end_s > start_s:
        prof.time_nanos = start_s * 1_000_000_000
        prof.duration_nanos = (end_s - start_s) * 1_000_000_000
    return gzip.compress(prof.SerializeToString(), mtime=0)


@dataclass
class _Frame:
    name: str
    value: int = 0
    children: dict[str, _Frame] = field(default_factory=dict)


def _tree(stacks: list[tuple[list[str], int, int]]) -> _Frame:
    root = _Frame("all")
    for frames, n, _ in stacks:
        root.value += n
        node = root
        for name in frames:
            node = node.children.setdefault(name, _Frame(name))
            node.value += n
    return root


def _color(name: str, depth: int) -> str:
    if depth == 1:  # the process
        return "rgb(120,150,190)"
    h = hashlib.blake2b(name.encode(), digest_size=2).digest()
    if name.endswith(KERNEL_SUFFIX):
        return f"rgb({200 + h[0] % 55},{110 + h[1] % 60},40)"
    return f"rgb({205 + h[0] % 50},{60 + h[1] % 140},{40 + h[0] % 30})"


def svg(rows: Iterable[Row], *, title: str = "Flame graph", width: int = 1200,
        frame_height: int = 17, min_width: float = 0.1) -> str:
    """A flame graph (root at the bottom) as one self-contained SVG document.

    Frames narrower than ``min_width`` pixels are left out (their samples still count
    in their parents); names are cut to what fits at ~7 px a character.
    """
    stacks = _stacks(rows)
    root = _tree(stacks)
    total = max(root.value, 1)
    pad, top = 10, 44
    inner = width - 2 * pad

    def depth_of(node: _Frame) -> int:
        return 1 + max((depth_of(c) for c in node.children.values()), default=0)

    depth = depth_of(root)
    height = top + depth * frame_height + pad + 16
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Verdana, sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="rgb(250,250,240)"/>',
        f'<text x="{width // 2}" y="24" text-anchor="middle" font-size="17">{escape(title)}</text>',
        f'<text x="{pad}" y="{height - 8}" font-size="11" fill="rgb(90,90,90)">'
        f"{root.value:,} samples; kernel frames end in {escape(KERNEL_SUFFIX)}</text>",
    ]

    def emit(node: _Frame, x: float, level: int) -> None:
        w = node.value / total * inner
        if w < min_width:
            return
        y = height - pad - 16 - (level + 1) * frame_height
        share = 100.0 * node.value / total
        label = f"{node.name} ({node.value:,} samples, {share:.2f}%)"
        parts.append(f'<g class="frame"><title>{escape(label)}</title>'
                     f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{frame_height - 1}" '
                     f'fill="{_color(node.name, level)}" rx="2" ry="2"/>')
        fits = int((w - 6) // 7)
        if fits >= 3:
            text = node.name if len(node.name) <= fits else node.name[: fits - 2] + ".."
            parts.append(f'<text x="{x + 3:.2f}" y="{y + frame_height - 5}">{escape(text)}</text>')
        parts.append("</g>")
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            emit(child, cx, level + 1)
            cx += child.value / total * inner

    emit(root, float(pad), 0)
    parts.append("</svg>\n")
    return "\n".join(parts)
