"""Folded, pprof and SVG from flame-graph rows (pure logic; go tool pprof and Chromium
read them in tests/integration/test_query_cli.py)."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

from stratoscope.pprof import profile_pb2
from stratoscope.query.profiles import folded, pprof, svg

ROWS = [
    ("app;_start;main;hot", 90, 900),
    ("app;_start;main;cold", 9, 90),
    ("app;entry_SYSCALL_64_[k];do_syscall_64_[k]", 1, 10),
    ("other", 0, 0),  # no samples: left out
]


def test_folded_lines_root_first() -> None:
    assert folded(ROWS) == ("app;_start;main;hot 90\napp;_start;main;cold 9\n"
                            "app;entry_SYSCALL_64_[k];do_syscall_64_[k] 1\n")


def test_pprof_decodes_with_leaf_first_locations_and_comm_labels() -> None:
    prof = profile_pb2.Profile()
    prof.ParseFromString(gzip.decompress(pprof(ROWS, start_s=100, end_s=160)))
    st = list(prof.string_table)
    assert st[0] == ""
    assert [(st[t.type], st[t.unit]) for t in prof.sample_type] == [("samples", "count"),
                                                                    ("cpu", "nanoseconds")]
    fn = {f.id: (st[f.name], st[f.filename]) for f in prof.function}
    stacks = [([fn[i][0] for i in s.location_id], list(s.value),
               {st[lab.key]: st[lab.str] for lab in s.label}) for s in prof.sample]
    assert stacks == [
        (["hot", "main", "_start"], [90, 900], {"comm": "app"}),
        (["cold", "main", "_start"], [9, 90], {"comm": "app"}),
        (["do_syscall_64", "entry_SYSCALL_64"], [1, 10], {"comm": "app"}),
    ]
    assert {n: f for n, f in fn.values()}["do_syscall_64"] == "[kernel]"
    assert (prof.time_nanos, prof.duration_nanos, prof.period) == (100 * 10**9, 60 * 10**9, 10)


def test_svg_is_one_document_with_a_titled_frame_per_node() -> None:
    doc = svg(ROWS, title="t & <x>")
    root = ET.fromstring(doc.split("\n", 1)[1])
    ns = "{http://www.w3.org/2000/svg}"
    frames = root.findall(f"{ns}g")
    titles = [g.find(f"{ns}title").text for g in frames]  # type: ignore[union-attr]
    assert titles[0] == "all (100 samples, 100.00%)"
    assert "hot (90 samples, 90.00%)" in titles and "do_syscall_64_[k] (1 samples, 1.00%)" in titles
    assert len(frames) == 1 + 1 + 2 + 2 + 2  # all, app, _start/main, hot/cold, kernel pair
    assert all(g.find(f"{ns}rect") is not None for g in frames)
    assert "href" not in doc and "<script" not in doc  # nothing to fetch, nothing to run
    assert root.find(f"{ns}title").text == "t & <x>"  # type: ignore[union-attr]


def test_svg_leaves_out_frames_narrower_than_a_tenth_of_a_pixel() -> None:
    rows = [("a;wide", 100_000, 0), ("a;thin", 1, 0)]
    doc = svg(rows, width=1000)
    assert "wide (" in doc and "thin (" not in doc
