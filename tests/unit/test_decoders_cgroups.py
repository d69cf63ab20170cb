"""Tests for edge.decoders.cgroups: a fixture tree plus the real cgroup2 mount (needs root)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decoders import cgroups
from stratoscope.edge.decoders.cgroups import CgroupResolver, find_cgroup2_mount

HYBRID_MOUNTINFO = """\
24 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2_MOUNTINFO = """\
24 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 26 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
ESCAPED_MOUNTINFO = "50 24 0:40 / /mnt/my\\040cgroup\\134v2 rw shared:3 - cgroup2 none rw\n"
V1_ONLY_MOUNTINFO = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"

ID64 = "4f9f5c5e7c3f6b1e8a2d0c9b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170605f4e"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scan_counter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every tree walk the resolver performs."""
    calls: list[Path] = []
    real_walk = cgroups._walk

    def counting_walk(root: Path) -> dict[int, str]:
        calls.append(root)
        return real_walk(root)

    monkeypatch.setattr(cgroups, "_walk", counting_walk)
    return calls


def ino(path: Path) -> int:
    return os.stat(path).st_ino


# -- mount discovery -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HYBRID_MOUNTINFO, Path("/sys/fs/cgroup/unified")),
        (PURE_V2_MOUNTINFO, Path("/sys/fs/cgroup")),
        (ESCAPED_MOUNTINFO, Path("/mnt/my cgroup\\v2")),
        (V1_ONLY_MOUNTINFO, None),
        ("", None),
        ("garbage line\n", None),
    ],
)
def test_find_cgroup2_mount(tmp_path: Path, text: str, expected: Path | None) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    assert find_cgroup2_mount(mountinfo) == expected


def test_find_cgroup2_mount_missing_file(tmp_path: Path) -> None:
    assert find_cgroup2_mount(tmp_path / "nope") is None


def test_auto_root_uses_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(PURE_V2_MOUNTINFO)
    assert CgroupResolver(mountinfo=mountinfo).root == Path("/sys/fs/cgroup")


def test_no_cgroup2_mount_degrades_to_raw_ids(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_ONLY_MOUNTINFO)
    resolver = CgroupResolver(mountinfo=mountinfo)
    assert resolver.root is None
    assert resolver.path(1) == "cgroup:1"


# -- fixture tree ----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cg"
    for rel in (
        "system.slice/nginx.service",
        f"system.slice/docker-{ID64}.scope",
        "user.slice/user-1000.slice/session-3.scope",
        "with space",
    ):
        (root / rel).mkdir(parents=True)
    (root / "cgroup.procs").write_text("1\n")  # files are not cgroups
    (root / "link").symlink_to(root / "system.slice")  # symlinks are not followed
    return root


def test_resolves_fixture_tree(tree: Path) -> None:
    resolver = CgroupResolver(tree)
    assert resolver.root == tree
    assert resolver.path(ino(tree)) == "/"
    assert resolver.path(ino(tree / "system.slice")) == "/system.slice"
    assert resolver.path(ino(tree / "system.slice/nginx.service")) == "/system.slice/nginx.service"
    assert (
        resolver.path(ino(tree / f"system.slice/docker-{ID64}.scope"))
        == f"/system.slice/docker-{ID64}.scope"
    )
    assert (
        resolver.path(ino(tree / "user.slice/user-1000.slice/session-3.scope"))
        == "/user.slice/user-1000.slice/session-3.scope"
    )
    assert resolver.path(ino(tree / "with space")) == "/with space"
    assert resolver.path(ino(tree / "cgroup.procs")) == f"cgroup:{ino(tree / 'cgroup.procs')}"


def test_accepts_str_root(tree: Path) -> None:
    assert CgroupResolver(str(tree)).path(ino(tree / "with space")) == "/with space"


def test_unknown_id(tree: Path) -> None:
    assert CgroupResolver(tree).path(2**62 + 7) == f"cgroup:{2**62 + 7}"


def test_lazy_then_cached(tree: Path, scan_counter: list[Path]) -> None:
    clock = FakeClock()
    resolver = CgroupResolver(tree, clock=clock)
    assert scan_counter == []  # nothing read at construction
    assert resolver.path(ino(tree)) == "/"
    assert scan_counter == [tree]
    clock.now += 60
    for _ in range(5):  # hits never rescan, however much time has passed
        assert resolver.path(ino(tree / "system.slice")) == "/system.slice"
    assert scan_counter == [tree]


def test_misses_rescan_at_most_once_per_second(tree: Path, scan_counter: list[Path]) -> None:
    clock = FakeClock()
    resolver = CgroupResolver(tree, clock=clock)
    assert resolver.path(ino(tree)) == "/"
    new = tree / "system.slice" / "late.service"
    new.mkdir()
    new_id = ino(new)

    for _ in range(100):  # a flood of misses within the same second: no rescans
        assert resolver.path(new_id) == f"cgroup:{new_id}"
    clock.now += 0.999
    assert resolver.path(new_id) == f"cgroup:{new_id}"
    assert len(scan_counter) == 1

    clock.now += 0.001  # one full second since the last scan
    assert resolver.path(new_id) == "/system.slice/late.service"
    assert len(scan_counter) == 2

    assert resolver.path(2**62) == "cgroup:4611686018427387904"  # miss, but rate limited
    assert len(scan_counter) == 2


def test_custom_rescan_interval(tree: Path, scan_counter: list[Path]) -> None:
    clock = FakeClock()
    resolver = CgroupResolver(tree, clock=clock, min_rescan_interval=10.0)
    resolver.path(2**62)
    clock.now += 9.5
    resolver.path(2**62)
    assert len(scan_counter) == 1
    clock.now += 0.5
    resolver.path(2**62)
    assert len(scan_counter) == 2


def test_deleted_cgroup_survives_one_rescan(tree: Path) -> None:
    clock = FakeClock()
    resolver = CgroupResolver(tree, clock=clock)
    gone = tree / "system.slice/nginx.service"
    gone_id = ino(gone)
    assert resolver.path(gone_id) == "/system.slice/nginx.service"
    gone.rmdir()

    clock.now += 1
    assert resolver.path(2**62) == "cgroup:4611686018427387904"  # triggers rescan 2
    # In-flight events from the just-removed cgroup still get its real path...
    assert resolver.path(gone_id) == "/system.slice/nginx.service"

    clock.now += 1
    resolver.path(2**62)  # rescan 3: the entry is now two generations old and dropped
    assert resolver.path(gone_id) == f"cgroup:{gone_id}"


def test_root_that_does_not_exist(tmp_path: Path) -> None:
    resolver = CgroupResolver(tmp_path / "missing")
    assert resolver.path(1) == "cgroup:1"


# -- container ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/system.slice/docker-{ID64}.scope", ID64),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8a9b_0c1d2e3f4a5b.slice/"
            f"cri-containerd-{ID64}.scope",
            ID64,
        ),
        (
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/"
            f"crio-{ID64}.scope",
            ID64,
        ),
        (f"/machine.slice/libpod-{ID64}.scope", ID64),
        (f"/machine.slice/libpod-{ID64}.scope/container", ID64),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID64}.scope", ID64),
        (f"/docker/{ID64}", ID64),
        (f"/docker/{ID64[:12]}", ID64[:12]),
        (f"/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b/{ID64}", ID64),
        (f"/kubepods/pod0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b/{ID64}", ID64),
        (f"/system.slice/docker-{ID64.upper()}.scope", ID64),
        (f"/docker/{'a' * 64}/docker/{ID64}", ID64),  # docker-in-docker: innermost wins
        (f"/system.slice/docker-{'a' * 64}.scope/docker/{ID64}", ID64),
        ("/", ""),
        ("", ""),
        ("/system.slice/nginx.service", ""),
        ("/user.slice/user-1000.slice/session-3.scope", ""),
        ("/system.slice/docker.service", ""),
        ("/docker", ""),
        ("/docker/abc123", ""),  # too short to be an id
        ("/docker/not-hex-at-all-but-long-enough", ""),
        (f"/system.slice/{ID64}", ""),  # bare hex outside docker/kubepods
        (f"/system.slice/crio-conmon-{ID64}.scope", ""),  # conmon, not the container
        (f"/system.slice/docker-{ID64}.service", ""),
        ("/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", ""),
        ("/kubepods.slice/kubepods-burstable.slice", ""),
    ],
)
def test_container_id(path: str, expected: str) -> None:
    assert CgroupResolver.container_id(path) == expected


hex_ids = st.text(alphabet="0123456789abcdef", min_size=12, max_size=64)


@given(
    hex_ids,
    st.sampled_from(
        [
            "/system.slice/docker-{}.scope",
            "/kubepods.slice/kubepods-pod1.slice/cri-containerd-{}.scope",
            "/kubepods.slice/crio-{}.scope",
            "/machine.slice/libpod-{}.scope",
            "/docker/{}",
            "/kubepods/besteffort/pod1/{}",
        ]
    ),
)
def test_container_id_extracts_any_hex_id(cid: str, template: str) -> None:
    assert CgroupResolver.container_id(template.format(cid)) == cid


# -- the real cgroup2 hierarchy (root) -------------------------------------------------------


def test_real_auto_root_is_the_cgroup2_mount() -> None:
    resolver = CgroupResolver()
    assert resolver.root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
    assert resolver.root is not None
    # cgroup.controllers only exists at the top of a cgroup2 (not v1) hierarchy.
    assert (resolver.root / "cgroup.controllers").is_file()
    assert resolver.path(ino(resolver.root)) == "/"


def test_real_own_cgroup_resolves() -> None:
    resolver = CgroupResolver()
    assert resolver.root is not None
    v2_lines = [
        line for line in Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::"
    ]
    assert len(v2_lines) == 1
    own = v2_lines[0][3:]
    assert resolver.path(ino(resolver.root / own.lstrip("/"))) == own


def test_real_new_cgroup_resolves_to_its_path() -> None:
    clock = FakeClock()
    resolver = CgroupResolver(clock=clock)
    root = resolver.root
    assert root is not None
    assert resolver.path(ino(root)) == "/"  # initial scan happens before the cgroups exist

    name = f"stratoscope-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent = root / name
    child = parent / f"docker-{ID64}.scope"
    os.mkdir(parent)
    try:
        os.mkdir(child)
        try:
            clock.now += 1
            assert resolver.path(ino(parent)) == f"/{name}"
            assert resolver.path(ino(child)) == f"/{name}/docker-{ID64}.scope"
            assert CgroupResolver.container_id(resolver.path(ino(child))) == ID64
        finally:
            os.rmdir(child)
    finally:
        os.rmdir(parent)
    assert not parent.exists()
