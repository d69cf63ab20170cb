"""The built wheel runs without a checkout: edge on the real kernel, regional on a fresh store.

The wheel is installed into a fresh venv of the system interpreter (which sees Debian's
``bcc``); its third-party dependencies come from the test venv through a ``.pth`` line,
so nothing is downloaded. Everything runs from a directory with no source tree in it:
programs and migrations must come from the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel file, the venv's bin/) with the wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ in the source tree, and a stale build/
    # would carry files the tree no longer has into the next wheel.
    src = work / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(src)], check=True, cwd=work, timeout=300)
    (whl,) = (work / "dist").glob("stratoscope-*.whl")
    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    # The test venv's dependencies (grpcio, chdb, ...), after the wheel's own site-packages.
    # Only .pth files of site directories run, so the test venv's editable hook does not.
    (purelib / "zz_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(whl)], check=True, cwd=work, timeout=300)
    return whl, venv / "bin"


def test_wheel_holds_one_package_with_programs_and_schema(wheel_venv: tuple[Path, Path]) -> None:
    whl, _ = wheel_venv
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("stratoscope-")}
    assert top == {"stratoscope"}, top
    for program in ("syscalls", "sched", "tcp", "block", "process", "profile"):
        assert f"stratoscope/bpf/{program}.c" in names and f"stratoscope/bpf/{program}.yaml" in names
    assert "stratoscope/bpf/stratoscope.h" in names
    for folder in ("migrations", "cluster", "access", "queries"):
        assert any(n.startswith(f"stratoscope/deploy/clickhouse/{folder}/") and n.endswith(".sql")
                   for n in names), folder
    assert "stratoscope/edge/collector.py" in names and "stratoscope/regional/app.py" in names
    assert "stratoscope/pprof/profile_pb2.py" in names  # flamegraph --format pprof


def test_installed_query_reads_its_cookbook(wheel_venv: tuple[Path, Path]) -> None:
    _, bin_dir = wheel_venv
    out = subprocess.run([str(bin_dir / "stratoscope"), "query", "--list"], capture_output=True,
                         text=True, timeout=120, check=True, env={**os.environ, "COLUMNS": "200"})
    for name in ("top_syscalls", "flamegraph", "fleet_health", "what_ran"):
        assert name in out.stdout


def test_installed_edge_drains_the_real_kernel(wheel_venv: tuple[Path, Path], tmp_path: Path) -> None:
    _, bin_dir = wheel_venv
    out = tmp_path / "batches.jsonl"
    r = subprocess.run([str(bin_dir / "stratoscope"), "edge", "--programs", "syscalls", "--interval", "1s",
                        "--once", "--output", f"jsonl:{out}", "--metrics-port", "0"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import stratoscope.resources as r; print(r.bpf_dir())"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(ROOT)), where
    batches = [json.loads(line) for line in out.read_text().splitlines()]
    calls = sum(s["value"] for b in batches for m in b["metrics"] if m["name"] == "syscalls_total"
                for s in m["series"])
    assert calls > 0, batches


def test_installed_regional_migrates_a_fresh_store(wheel_venv: tuple[Path, Path], tmp_path: Path) -> None:
    _, bin_dir = wheel_venv
    store = tmp_path / "ch"
    r = subprocess.run([str(bin_dir / "stratoscope"), "regional", "--check", "--clickhouse", f"chdb://{store}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "clickhouse: ok\n"), r.stderr[-3000:]
    code = ("import sys\nfrom stratoscope.regional.sinks.clickhouse import (DEFAULT_DATABASE,"
            " applied_migrations, connect, load_migrations)\n"
            "applied = applied_migrations(connect('chdb://' + sys.argv[1]), DEFAULT_DATABASE)\n"
            "print(sorted(applied) == [m.version for m in load_migrations()], len(applied))\n")
    q = subprocess.run([str(bin_dir / "python"), "-c", code, str(store)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert q.returncode == 0, q.stderr[-3000:]
    ok, count = q.stdout.split()
    assert ok == "True" and int(count) >= 6, q.stdout
