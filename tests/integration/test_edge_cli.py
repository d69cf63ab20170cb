"""The `stratoscope edge` command: its promised messages, exit codes and outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.kernel
STRATOSCOPE = [sys.executable, "-m", "stratoscope.cli"]


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STRATOSCOPE, *args], capture_output=True, text=True, timeout=120, **kw  # type: ignore[call-overload]
    )


def test_config_typo_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("interval: 1s\nprogram: [syscalls]\n")
    r = _run(["edge", "--config", str(cfg), "--once"])
    assert r.returncode == 2
    assert r.stderr.strip() == f"stratoscope: error: unknown setting 'program' in {cfg}"
    assert "Traceback" not in r.stderr


def test_unknown_program_exits_2() -> None:
    r = _run(["edge", "--programs", "syscalls,gpu", "--once"])
    assert r.returncode == 2
    assert "unknown program 'gpu' (known: block, process, profile, sched, syscalls, tcp)" in r.stderr
    assert "Traceback" not in r.stderr


def test_without_cap_bpf_exits_2_naming_the_fix() -> None:
    # Drop every capability but keep uid 0: what a misconfigured unit would do.
    r = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *STRATOSCOPE,
         "edge", "--programs", "syscalls", "--once"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "missing CAP_BPF/CAP_PERFMON" in r.stderr
    assert "Traceback" not in r.stderr


def test_requested_program_that_fails_to_attach_exits_2(tmp_path: Path) -> None:
    bpf = tmp_path / "bpf"
    bpf.mkdir()
    root = Path(__file__).resolve().parents[2] / "bpf"
    for f in root.iterdir():
        (bpf / f.name).write_bytes(f.read_bytes())
    # Break the block program's C so it cannot compile.
    (bpf / "block.c").write_text((root / "block.c").read_text() + "\nthis is not C;\n")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"bpf_dir: {bpf}\n")
    r = _run(["edge", "--config", str(cfg), "--programs", "block", "--once", "--metrics-port", "0"])
    assert r.returncode == 2
    assert "program 'block': failed to compile or attach" in r.stderr


def test_default_set_survives_a_failing_program(tmp_path: Path) -> None:
    bpf = tmp_path / "bpf"
    bpf.mkdir()
    root = Path(__file__).resolve().parents[2] / "bpf"
    for f in root.iterdir():
        (bpf / f.name).write_bytes(f.read_bytes())
    (bpf / "block.c").write_text("this is not C;\n")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"bpf_dir: {bpf}\n")
    out = tmp_path / "out.jsonl"
    port = 19431
    proc = subprocess.Popen(
        [*STRATOSCOPE, "edge", "--config", str(cfg), "--interval", "1s", "--output",
         f"jsonl:{out}", "--metrics-port", str(port)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if 'stratoscope_edge_programs_attached{program="process"} 1.0' in metrics:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        # the default set (default: true in bpf/*.yaml): block fails, the rest attach
        assert 'stratoscope_edge_programs_attached{program="process"} 1.0' in metrics
        assert 'stratoscope_edge_programs_attached{program="tcp"} 1.0' in metrics
        assert 'stratoscope_edge_programs_attached{program="profile"} 1.0' in metrics
        assert 'stratoscope_edge_programs_attached{program="block"} 0.0' in metrics
        assert 'stratoscope_edge_program_attach_failures_total{program="block"} 1.0' in metrics
        assert 'program="syscalls"' not in metrics and 'program="sched"' not in metrics  # opt-in
        child = subprocess.Popen(["true"])  # one exec, one exit
        assert child.wait(timeout=30) == 0

        wait_for("the process program's exit event", lambda: any(
            e["kind"] == "exit" and e["pid"] == child.pid
            for line in out.read_text().splitlines()
            for e in json.loads(line).get("events", [])), 60, every_s=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.count("program 'block'") == 1  # warned once
    batches = [json.loads(line) for line in out.read_text().splitlines()]
    names = {m["name"] for b in batches for m in b["metrics"]}
    assert "process_events_total" in names


def test_once_writes_one_batch_and_sigterm_drains(tmp_path: Path) -> None:
    out = tmp_path / "b.jsonl"
    r = _run(["edge", "--programs", "syscalls", "--interval", "1s", "--once",
              "--output", f"jsonl:{out}", "--metrics-port", "0", "--node-id", "node-a"])
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    b = json.loads(lines[0])
    assert b["node_id"] == "node-a" and b["seq"] == 1
    assert any(s["labels"]["comm"] for m in b["metrics"] for s in m["series"])

    out2 = tmp_path / "c.jsonl"
    proc = subprocess.Popen(
        [*STRATOSCOPE, "edge", "--programs", "syscalls", "--interval", "60s",
         "--output", f"jsonl:{out2}", "--metrics-port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "attached" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    final = [json.loads(x) for x in out2.read_text().splitlines()]
    assert len(final) == 1 and final[0]["metrics"], "SIGTERM must end with a final drain"
