"""What the descriptions declare is what everything reads: decoders, defaults, roll-ups."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

import pytest

from stratoscope.edge.config import EdgeConfig
from stratoscope.edge.decode import DecodeContext, decode_labels
from stratoscope.edge.decoders.cgroups import CgroupResolver
from stratoscope.edge.decoders.registry import decoder, decoder_names, get_decoder
from stratoscope.edge.errors import SpecError
from stratoscope.edge.spec import FieldSpec, discover, label_keys, load_spec, unbounded_labels
from stratoscope.regional.rollups import Rollup, declared_rollups

ROOT = Path(__file__).resolve().parents[2]


class _Cgroups(CgroupResolver):
    def __init__(self, paths: dict[int, str]) -> None:
        self.paths = paths

    def path(self, cgroup_id: int) -> str:  # type: ignore[override]
        return self.paths[cgroup_id]


def _ctx() -> DecodeContext:
    return DecodeContext(cgroups=_Cgroups({7: "/system.slice/docker-" + "ab" * 32 + ".scope"}))


def test_the_registry_holds_every_decoder_a_description_may_name() -> None:
    assert decoder_names() == {
        "uint", "int", "hex", "port", "string", "syscall", "errno", "enum", "inet_addr",
        "majorminor", "cgroup", "bucket", "ksym_stack", "usym_stack",
    }
    with pytest.raises(KeyError, match=r"unknown decoder 'nope' \(known: bucket, cgroup"):
        get_decoder("nope")


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="decoder 'uint' registered twice"):
        decoder("uint")(lambda v, f, c: (str(v),))


def test_extra_labels_come_from_the_decoder_declaration() -> None:
    fields = [
        FieldSpec(name="syscall", type="u32", decoder="syscall"),
        FieldSpec(name="slot", type="u32", decoder="bucket"),
        FieldSpec(name="pad", type="u32", padding=True),
        FieldSpec(name="cgroup", type="u64", decoder="cgroup", unbounded=True),
        FieldSpec(name="comm", type="char[16]", decoder="string", unbounded=True),
    ]
    assert get_decoder("cgroup").extra_labels == ("container",)
    assert label_keys(fields) == ["syscall", "cgroup", "container", "comm"]
    assert unbounded_labels(fields) == {"cgroup", "container", "comm"}

    class Key(ct.Structure):
        _fields_ = [("syscall", ct.c_uint32), ("slot", ct.c_uint32), ("pad", ct.c_uint32),
                    ("cgroup", ct.c_uint64), ("comm", ct.c_char * 16)]

    ctx = _ctx()
    labels = decode_labels(Key(257, 3, 0, 7, b"nginx"), fields, ctx)
    assert labels == ("openat", "/system.slice/docker-" + "ab" * 32 + ".scope", "ab" * 32, "nginx")
    # A value the decoder cannot read: "[error]" for its own label, "" for the extra ones.
    labels = decode_labels(Key(257, 3, 0, 99, b"nginx"), fields, ctx)
    assert labels == ("openat", "[error]", "", "nginx")
    assert ctx.errors == 1


def _write(tmp: Path, text: str, name: str = "x") -> Path:
    (tmp / f"{name}.c").write_text("")
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


_COUNTER = """program: {name}
help: h
source: {name}.c
{extra}maps:
  - name: m
    kind: counters
    key: [{{name: op, type: u32}}, {{name: cgroup, type: u64, decoder: cgroup}}]
    values: [{{metric: {name}_total, help: h, rollup: {rollup}}}]
"""


def test_rollup_labels_must_be_labels_of_the_key(tmp_path: Path) -> None:
    p = _write(tmp_path, _COUNTER.format(name="x", extra="", rollup="[op, container]"))
    assert load_spec(p).rollups() == {"x_total": ["op", "container"]}
    p = _write(tmp_path, _COUNTER.format(name="x", extra="", rollup="[op, pid]"))
    with pytest.raises(SpecError, match=r"metric 'x_total': roll-up label 'pid' is not a label "
                                         r"of the key \(op, cgroup, container\)"):
        load_spec(p)


def test_the_default_set_is_what_the_descriptions_say(tmp_path: Path) -> None:
    _write(tmp_path, _COUNTER.format(name="a", extra="", rollup="[]"), "a")
    _write(tmp_path, _COUNTER.format(name="b", extra="default: false\n", rollup="[]"), "b")
    cfg = EdgeConfig(bpf_dir=tmp_path)
    assert cfg.programs == ["a"]
    # Named explicitly, a program that is off by default runs.
    assert EdgeConfig(bpf_dir=tmp_path, programs=["b"]).programs == ["b"]


def test_the_regional_reads_the_rollups_the_edge_validates() -> None:
    edge: list[Rollup] = []
    for path in discover(ROOT / "bpf").values():
        edge.extend(Rollup(m, tuple(by)) for m, by in load_spec(path).rollups().items())
    regional = declared_rollups(ROOT / "bpf")
    assert sorted(regional, key=lambda r: r.metric) == sorted(edge, key=lambda r: r.metric)
    assert {r.metric: r.by for r in regional} == {
        "syscalls_total": ("syscall",),
        "syscall_errors_total": ("syscall", "errno"),
        "syscall_latency": ("syscall",),
        "sched_runqueue_latency": (),
        "block_latency": ("op",),
        "block_bytes_total": ("op",),
        "tcp_opens_total": ("direction",),
        "tcp_retransmits_total": (),
        "process_events_total": ("event",),
    }


def test_a_new_program_brings_its_rollups(tmp_path: Path) -> None:
    _write(tmp_path, _COUNTER.format(name="x", extra="", rollup="[op]"))
    assert declared_rollups(tmp_path) == (Rollup("x_total", ("op",)),)




def test_a_regional_takes_the_rollups_of_its_programs_dir(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from stratoscope.regional.app import merge_settings
    from stratoscope.regional.config import RegionalConfig

    _write(tmp_path, _COUNTER.format(name="x", extra="", rollup="[op]"))
    assert merge_settings(RegionalConfig(programs_dir=tmp_path)).rollups == (Rollup("x_total", ("op",)),)
    assert merge_settings(RegionalConfig()).rollups == declared_rollups(ROOT / "bpf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match="no program descriptions"):
        RegionalConfig(programs_dir=empty)
