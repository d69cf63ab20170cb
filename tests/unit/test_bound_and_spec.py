"""Cardinality bound, program descriptions and configuration validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.bound import OTHER, bound_series
from stratoscope.edge.config import load_config, parse_duration
from stratoscope.edge.errors import ConfigError, SpecError
from stratoscope.edge.spec import discover, load_spec

ROOT = Path(__file__).resolve().parents[2]


@given(
    st.dictionaries(st.tuples(st.sampled_from("abc"), st.text(max_size=4)), st.integers(1, 1000)),
    st.integers(1, 20),
)
def test_bound_preserves_totals_and_limits_series(series: dict, limit: int) -> None:
    out, folded = bound_series(series, ["bounded", "free"], {"free"}, limit, int, int.__add__)
    assert sum(out.values()) == sum(series.values())
    if len(series) > limit:
        kept = [k for k in out if k[1] != OTHER]
        assert len(kept) <= limit - 1
        assert len(out) <= limit - 1 + 3  # at most one "other" per bounded value
        assert folded == len(series) - len(kept)  # generated labels are never "other"
    else:
        assert out == series and folded == 0


def test_bound_keeps_the_largest_series() -> None:
    series = {("read", "a"): 100, ("read", "b"): 1, ("read", "c"): 2, ("write", "d"): 50}
    out, folded = bound_series(series, ["syscall", "comm"], {"comm"}, 3, int, int.__add__)
    assert out == {("read", "a"): 100, ("write", "d"): 50, ("read", OTHER): 3}
    assert folded == 2


def test_every_shipped_description_is_valid() -> None:
    specs = discover(ROOT / "bpf")
    assert set(specs) == {"syscalls", "sched", "tcp", "block", "process", "profile"}
    for path in specs.values():
        load_spec(path)


def _write(tmp: Path, text: str, name: str = "x.yaml") -> Path:
    (tmp / "x.c").write_text("")
    p = tmp / name
    p.write_text(text)
    return p


def test_spec_errors_name_the_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, "program: x\nhelp: h\nsource: x.c\nmaps: []\nextra: 1\n")
    with pytest.raises(SpecError, match=r"x.yaml: extra: Extra inputs are not permitted"):
        load_spec(p)
    p = _write(tmp_path, """program: x
help: h
source: x.c
maps:
  - name: m
    kind: counters
    key: [{name: f, type: u32, decoder: nope}]
    values: [{metric: m_total, help: h}]
""")
    with pytest.raises(SpecError, match="unknown decoder 'nope'"):
        load_spec(p)
    p = _write(tmp_path, """program: x
help: h
source: x.c
maps:
  - name: m
    kind: histogram
    metric: lat
    help: h
    key: [{name: f, type: u32}]
""")
    with pytest.raises(SpecError, match="exactly one 'bucket' field"):
        load_spec(p)


def test_plus_samples_of_names_a_histogram_with_the_same_labels(tmp_path: Path) -> None:
    head = """program: x
help: h
source: x.c
maps:
  - name: c
    kind: counters
    key: [{name: f, type: u32}]
    values: [{metric: c_total, help: h, plus_samples_of: %s}]
  - name: lat
    kind: histogram
    metric: lat
    help: h
    key: [{name: slot, type: u32, decoder: bucket}, %s]
"""
    ok = _write(tmp_path, head % ("lat", "{name: f, type: u32}"))
    counters = load_spec(ok).maps[0]
    assert counters.kind == "counters" and counters.values[0].plus_samples_of == "lat"
    with pytest.raises(SpecError, match="plus_samples_of 'c' is not a histogram map"):
        load_spec(_write(tmp_path, head % ("c", "{name: f, type: u32}")))
    with pytest.raises(SpecError, match=r"histogram 'lat' has labels \(g\), the counter \(f\)"):
        load_spec(_write(tmp_path, head % ("lat", "{name: g, type: u32}")))


def test_spec_program_must_match_file_name(tmp_path: Path) -> None:
    p = _write(tmp_path, "program: y\nhelp: h\nsource: x.c\nmaps: []\n")
    with pytest.raises(SpecError, match="must match the file name"):
        load_spec(p)


def test_config_typo_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("intervl: 5s\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'intervl' in .*edge.yaml"):
        load_config(cfg, {})


def test_config_overrides_and_durations(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("interval: 5s\nlabels: {region: eu-1}\nlimits: {series_per_metric: 7}\n")
    c = load_config(cfg, {"interval": "500ms", "node_id": "n1"})
    assert c.interval == 0.5 and c.node_id == "n1" and c.labels == {"region": "eu-1"}
    assert c.limits.series_per_metric == 7 and not c.programs_explicit
    assert parse_duration("2m") == 120.0
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="unknown program 'bogus'"):
        load_config(None, {"programs": ["syscalls", "bogus"]})


def test_kernel_overflow_series_join_the_folded_other() -> None:
    from stratoscope.edge.collector import _merge_other

    keys = ["syscall", "cgroup", "container", "comm"]
    unb = {"cgroup", "container", "comm"}
    decoded = {("read", "/a", "", "x"): 3, ("read", OTHER, OTHER, OTHER): 2}
    # As decoded from <map>_other: comm "other", cgroup 0 -> "cgroup:0".
    kernel_other = {("read", "cgroup:0", "", OTHER): 5, ("write", "cgroup:0", "", OTHER): 7}
    _merge_other(decoded, kernel_other, keys, unb, int.__add__)
    assert decoded == {
        ("read", "/a", "", "x"): 3,
        ("read", OTHER, OTHER, OTHER): 7,
        ("write", OTHER, OTHER, OTHER): 7,
    }


def test_overflow_is_declared_by_every_aggregate_map_with_unbounded_fields() -> None:
    from stratoscope.edge.spec import CountersMap, HistogramMap

    for path in discover().values():
        spec = load_spec(path)
        for m in spec.maps:
            if isinstance(m, CountersMap | HistogramMap) and any(f.unbounded for f in m.key):
                assert m.overflow, f"{spec.program}.{m.name} does not declare overflow"
