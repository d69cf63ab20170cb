#!/usr/bin/env python3
"""Edge overhead benchmark: what `stratoscope edge` costs the workloads it watches.

One run measures, with paired and shuffled rounds (every round runs every
configuration once, in a fresh random order, so drift hits all of them alike;
results are medians over rounds, and "added"/"ratio" are medians of the
per-round differences/ratios against that round's bare run):

1. syscall cost: a C loop (loadtest/workloads/sysloop.c, gcc -O2) doing N
   getppid() then N one-byte write()s to /dev/null, timed inside the program,
   under: bare; stratoscope `syscalls` counts only (LATENCY=0); `syscalls` with
   latency histograms (LATENCY=1); all six programs (syscall latency on);
   Debian's syscount-bpfcc;
   syscount-bpfcc -L; and the floor under any per-syscall program: an empty
   program (returns 0) on the raw tracepoint raw_syscalls:sys_exit (`empty-rawtp`)
   and on the formatted one (`empty-tp`).
2. in-kernel ns per event per BPF function (kernel.bpf_stats_enabled=1 only
   for this phase, then restored; never on during the timed rounds).
3. HTTP on 127.0.0.1 (nginx + wrk if installed, else the C server/client in
   loadtest/workloads/) bare vs all six programs (after the collector's first
   drain) vs all six with syscall latency off vs all six with no drain in the
   run vs the default set (the programs not marked ``default: false``):
   requests/s, loss %, CPU per request; then one untimed run with
   bpf_stats on for BPF ns per request and per program.
4. profile at 19 Hz: a CPU-bound C loop bare vs only the `profile` program.
5. collector user-space cost: all six programs, then the default set, default
   10 s interval, each for --idle-seconds then --steady-seconds; CPU % of one core and RSS from
   /proc/PID/{stat,status}.

Other processes' tracing BPF programs tax the bare runs too: rounds during
which any are seen are rerun (--retries) after waiting for them to go away
(--clean-wait). Ends with a summary block against the targets. Needs root, gcc
and the project's venv; see loadtest/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = HERE / "workloads"
SYSCOUNT = Path("/usr/sbin/syscount-bpfcc")
ALL_PROGRAMS = "syscalls,sched,tcp,block,process,profile"


def default_programs() -> str:
    """The edge's default set, as `stratoscope edge` picks it when no program is named
    (the project's venv runs this script, so the edge's own reader is at hand)."""
    from stratoscope.edge.spec import default_programs as edge_default_programs

    return ",".join(sorted(edge_default_programs(ROOT / "bpf")))


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "counts_ns": 120.0,  # added ns per syscall, syscalls LATENCY=0
    "latency_ns": 300.0,  # added ns per syscall, syscalls LATENCY=1
    "http_loss_pct": 3.0,  # requests/s lost with the default program set
    "http_all_loss_pct": 8.0,  # requests/s lost with every program
    "profile_pct": 1.0,  # CPU-bound slowdown with profile at 19 Hz
    "idle_cpu_pct": 0.5,  # collector CPU, % of one core, idle node
    "rss_mb": 150.0,  # collector resident memory
}

# BPF program types worth flagging when another process has them loaded.
TRACING_PROG_TYPES = {2: "kprobe", 5: "tracepoint", 7: "perf_event", 17: "raw_tracepoint",
                      26: "tracing"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


@dataclass
class Config:
    """One thing attached (or nothing) while a workload runs."""

    name: str
    argv: list[str] | None  # None: bare
    ready: str = ""  # regex on the tool's output that says it is attached
    kind: str = "bare"  # bare | stratoscope | syscount | empty
    expect: list[str] = field(default_factory=list)  # stratoscope programs that must attach
    interval_s: float = 10.0  # stratoscope drain interval
    failed: str | None = None


class ToolError(RuntimeError):
    pass


class Tool:
    """A started tracer: output drained by threads, readiness by regex, stop by SIGINT."""

    def __init__(self, cfg: Config) -> None:
        assert cfg.argv is not None
        self.cfg = cfg
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.match: re.Match[str] | None = None
        self._re = re.compile(cfg.ready)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cfg.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            start_new_session=True, preexec_fn=_default_sigint,
        )
        _LIVE[self.proc.pid] = self.proc
        self._threads = [
            threading.Thread(target=self._read, args=(s,), daemon=True)
            for s in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if not self.ready.is_set():
                m = self._re.search(line)
                if m:
                    self.match = m
                    self.ready.set()

    def tail(self, n: int = 8) -> str:
        return " | ".join(self.lines[-n:]) or "(no output)"

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers catch the last lines
                raise ToolError(
                    f"{self.cfg.name} exited with {self.proc.returncode} before attaching: "
                    f"{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ToolError(f"{self.cfg.name} not attached after {timeout:.0f}s: {self.tail()}")
        if self.cfg.kind == "stratoscope" and self.match is not None:
            attached = [p.strip() for p in self.match.group(1).split(",")]
            missing = [p for p in self.cfg.expect if p not in attached]
            if missing:
                self.stop()
                raise ToolError(f"{self.cfg.name}: programs not attached: {', '.join(missing)}")

    def stop(self, timeout: float = 180.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.cfg.name} (pid {self.pid}) ignored SIGINT for {timeout:.0f}s; killing")
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)
        _LIVE.pop(self.proc.pid, None)
        return int(self.proc.returncode)


_LIVE: dict[int, subprocess.Popen[Any]] = {}


def _default_sigint() -> None:
    # A background parent may have SIGINT ignored; the tools are stopped with it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cleanup_live() -> None:
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.pop(pid, None)


@contextlib.contextmanager
def attached(cfg: Config, after_first_drain: bool = False) -> Iterator[Tool | None]:
    """Run the body with cfg's tool attached (nothing for bare); stop it after.

    after_first_drain: for stratoscope, also wait until its first drain is over
    (the first drain loads symbol tables and is far costlier than later ones)."""
    if cfg.argv is None:
        yield None
        return
    tool = Tool(cfg)
    try:
        tool.wait_ready()
        time.sleep(0.5)  # let start-up work settle
        if after_first_drain and cfg.kind == "stratoscope" and cfg.interval_s <= 60:
            wait_first_drain(tool, cfg.interval_s)
        yield tool
    finally:
        rc = tool.stop()
        if rc != 0 and sys.exc_info()[0] is None:
            raise ToolError(f"{cfg.name} exited with {rc} after SIGINT: {tool.tail()}")


def wait_first_drain(tool: Tool, interval_s: float, timeout: float = 240.0) -> float:
    """Wait until the collector's first drain is over; return how long that took.

    The collector drains interval_s after attaching; it is over once the
    process has used CPU since then and then stays below 10 % of a core for 2 s."""
    t0 = time.monotonic()
    ticks = proc_cpu_ticks(tool.pid)
    mark: int | None = None
    quiet = 0
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now_ticks = proc_cpu_ticks(tool.pid)
        rate = (now_ticks - ticks) / CLK_TCK / 0.5
        ticks = now_ticks
        if time.monotonic() - t0 < interval_s:
            continue
        if mark is None:
            mark = now_ticks
        quiet = quiet + 1 if rate < 0.10 else 0
        if quiet >= 4 and (now_ticks > mark or time.monotonic() - t0 > interval_s + 30):
            return time.monotonic() - t0
    log(f"{tool.cfg.name}: first drain not over after {timeout:.0f}s; measuring anyway")
    return time.monotonic() - t0


def stratoscope_bin(arg: str | None) -> str:
    if arg:
        return arg
    venv = ROOT / ".venv" / "bin" / "stratoscope"
    if venv.exists():
        return str(venv)
    found = shutil.which("stratoscope")
    if not found:
        sys.exit("edge_overhead: cannot find stratoscope (pass --stratoscope PATH)")
    return found


def strato(
    name: str, exe: str, programs: str, params: list[str], interval: str | None = "10s"
) -> Config:
    argv = [exe, "edge", "--programs", programs, "--metrics-port", "0",
            "--output", "jsonl:/dev/null"]
    if interval:
        argv += ["--interval", interval]
    for p in params:
        argv += ["--param", p]
    return Config(name, argv, r"attached (.+?); draining", "stratoscope", programs.split(","),
                  float(interval.removesuffix("s")) if interval else 10.0)


def syscount(name: str, extra: list[str]) -> Config:
    return Config(name, [str(SYSCOUNT), *extra], r"Tracing syscalls", "syscount")


#: The floor under counting syscalls: what attaching any program to every syscall's
#: exit costs, whatever the program does. Each runs in a child of this script
#: (--empty-tracer), the way the other tracers run.
EMPTY_TRACERS = {
    "empty-rawtp": "RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }",
    "empty-tp": "TRACEPOINT_PROBE(raw_syscalls, sys_exit) { return 0; }",
}


def empty_tracer(name: str) -> Config:
    return Config(name, [sys.executable, str(Path(__file__).resolve()), "--empty-tracer", name],
                  r"Tracing syscalls", "empty")


def run_empty_tracer(name: str) -> int:
    """Child mode: attach one empty program, say so, wait for SIGINT, detach."""
    from bcc import BPF

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    b = BPF(text=EMPTY_TRACERS[name].encode())
    print(f"Tracing syscalls ({name}); Ctrl-C to end", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        b.cleanup()
    return 0


# --------------------------------------------------------------------------- build / run


def build(src: str, outdir: Path) -> Path:
    out = outdir / src.removesuffix(".c")
    cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(WORKLOADS / src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"edge_overhead: gcc failed for {src}:\n{r.stderr}")
    return out


def run_kv(argv: list[str], timeout: float = 600) -> dict[str, float]:
    """Run a workload that prints key=value pairs on one line; return them as floats."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()}")
    out: dict[str, float] = {}
    for k, v in re.findall(r"(\w+)=([-\d.]+)", r.stdout):
        out[k] = float(v)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rounds_order(items: list[Config], rng: random.Random) -> list[Config]:
    order = [c for c in items if c.failed is None]
    rng.shuffle(order)
    return order


CONTAMINATED: list[str] = []
_STATS_PHASE = False  # True while this script itself has bpf_stats on
_ROUND_DIRTY: list[str] = []  # other processes' tracing seen during the current round
_ROUND_STATS: list[str] = []  # bpf_stats found on (not by us) during the current round


STATS_NOTE = "kernel.bpf_stats_enabled=1 (set by someone else)"


def foreign_now(include_stats: bool = True) -> list[str]:
    """Tracing BPF programs of other processes, and bpf_stats turned on by someone else."""
    found = foreign_tracing_progs({os.getpid(), *_LIVE})
    if include_stats and not _STATS_PHASE and BPF_STATS.read_text().strip() != "0":
        found.append(STATS_NOTE)
    return found


def watched(label: str, fn: Callable[[], T]) -> T:
    """fn(), noting other processes' tracing BPF programs seen before, during (every
    0.5 s) or after it: they tax every syscall, the bare runs' too."""
    findings: set[str] = set(foreign_now())
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            findings.update(foreign_now())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        res = fn()
    finally:
        stop.set()
        poller.join()
    findings.update(foreign_now())
    if findings:
        note = f"{label}: " + "; ".join(sorted(findings))
        CONTAMINATED.append(note)
        # Other tracing comes and goes: the round is run again. bpf_stats left on by
        # someone else may stay on for good: noted and counted, not waited out.
        (_ROUND_DIRTY if findings - {STATS_NOTE} else _ROUND_STATS).append(note)
    return res


def wait_clean(phase: str, timeout: float) -> None:
    """Wait (up to timeout) until no other process has tracing BPF programs for 3 s."""
    t0 = time.monotonic()
    clean = 0
    logged = False
    while clean < 3:
        found = foreign_now(include_stats=False)
        clean = 0 if found else clean + 1
        if found and not logged:
            log(f"{phase}: waiting up to {timeout:.0f}s for other tracing to end: {found[0]}")
            logged = True
        if time.monotonic() - t0 > timeout:
            log(f"{phase}: other tracing still present after {timeout:.0f}s; going on")
            return
        if clean < 3:
            time.sleep(1.0)


def run_rounds(
    phase: str, n: int, configs: list[Config], rng: random.Random, args: argparse.Namespace,
    body: Callable[[Config, str], dict[str, float]],
) -> tuple[list[dict[str, dict[str, float]]], dict[str, int]]:
    """n paired rounds, each running every live configuration once in a fresh random
    order. A round during which another process had tracing BPF programs loaded is
    thrown away and run again, up to --retries times; then it is kept and counted."""
    rounds: list[dict[str, dict[str, float]]] = []
    stats = {"discarded": 0, "kept_disturbed": 0, "bpf_stats_by_others": 0}
    for r in range(n):
        for attempt in range(args.retries + 1):
            wait_clean(phase, args.clean_wait)
            _ROUND_DIRTY.clear()
            _ROUND_STATS.clear()
            order = rounds_order(configs, rng)
            again = f" (attempt {attempt + 1})" if attempt else ""
            log(f"{phase}: round {r + 1}/{n}{again}: {', '.join(c.name for c in order)}")
            got: dict[str, dict[str, float]] = {}
            for cfg in order:
                try:
                    got[cfg.name] = body(cfg, f"{phase} round {r + 1}{again} {cfg.name}")
                except (ToolError, RuntimeError) as exc:
                    cfg.failed = f"round {r + 1}: {exc}"
                    log(f"{phase}: {cfg.name} FAILED: {exc}")
            if not _ROUND_DIRTY:
                break
            last = attempt == args.retries
            log(f"{phase}: round {r + 1} disturbed by other tracing ({_ROUND_DIRTY[0]}); "
                + ("keeping it, counted as disturbed" if last else "running it again"))
            if last:
                stats["kept_disturbed"] += 1
            else:
                stats["discarded"] += 1
        if _ROUND_STATS:
            stats["bpf_stats_by_others"] += 1
        rounds.append(got)
    return rounds, stats


def measured(label: str, argv: list[str]) -> dict[str, float]:
    return watched(label, lambda: run_kv(argv))


# --------------------------------------------------------------------------- bpf stats


def bpf_prog_fds(pid: int) -> list[int]:
    fds = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                    fds.append(int(fd))
    return fds


def fdinfo(pid: int, fd: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    out = {}
    for k, v in re.findall(r"^(\w+):\s+(\S+)$", text, re.M):
        with contextlib.suppress(ValueError):
            out[k] = int(v, 10)
    return out


def prog_snapshot(pid: int) -> dict[int, tuple[int, int, int]]:
    """prog_id -> (prog_type, run_cnt, run_time_ns) for every BPF prog fd of pid."""
    snap = {}
    for fd in bpf_prog_fds(pid):
        with contextlib.suppress(OSError):
            info = fdinfo(pid, fd)
            if "prog_id" in info:
                snap[info["prog_id"]] = (info.get("prog_type", -1), info.get("run_cnt", 0),
                                         info.get("run_time_ns", 0))
    return snap


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())


def prog_name(prog_id: int) -> str:
    """Full function name from bpftool (BTF), else the kernel's 15-char name via bpf(2)."""
    if shutil.which("bpftool"):
        r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            with contextlib.suppress(ValueError, KeyError):
                return str(json.loads(r.stdout)["name"])
    if _SYS_BPF is None:
        return f"id{prog_id}"
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_id
    fd = libc.syscall(_SYS_BPF, 13, attr, 128)  # BPF_PROG_GET_FD_BY_ID
    if fd < 0:
        return f"id{prog_id}"
    try:
        info = ctypes.create_string_buffer(256)
        attr = ctypes.create_string_buffer(128)
        ctypes.c_uint32.from_buffer(attr, 0).value = fd
        ctypes.c_uint32.from_buffer(attr, 4).value = 256
        ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(info)
        if libc.syscall(_SYS_BPF, 15, attr, 128) != 0:  # BPF_OBJ_GET_INFO_BY_FD
            return f"id{prog_id}"
        return info.raw[64:80].split(b"\0", 1)[0].decode() or f"id{prog_id}"
    finally:
        os.close(fd)


def foreign_tracing_progs(own: set[int]) -> list[str]:
    """Other processes holding tracing BPF programs (they would tax the bare runs too)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in own:
            continue
        pid = int(d)
        kinds: dict[str, int] = {}
        for fd in bpf_prog_fds(pid):
            with contextlib.suppress(OSError):
                t = fdinfo(pid, fd).get("prog_type", -1)
                if t in TRACING_PROG_TYPES:
                    kinds[TRACING_PROG_TYPES[t]] = kinds.get(TRACING_PROG_TYPES[t], 0) + 1
        if kinds:
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                found.append(f"pid {pid} ({comm}): "
                             + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return found


# --------------------------------------------------------------------------- phases


SYSCALLS = ("getppid", "write")
CLOCKS = ("cpu", "wall")


def phase_syscalls(args: argparse.Namespace, configs: list[Config], loop: Path,
                   rng: random.Random) -> dict[str, Any]:
    log("syscalls: validating every tool configuration once (also a warm-up)")
    for cfg in configs:
        if cfg.argv is None:
            continue
        try:
            with attached(cfg):
                run_kv([str(loop), str(max(args.calls // 10, 10000))])
        except (ToolError, RuntimeError) as exc:
            cfg.failed = str(exc)
            log(f"syscalls: {cfg.name} FAILED: {exc}")
    def body(cfg: Config, label: str) -> dict[str, float]:
        with attached(cfg):
            return measured(label, [str(loop), str(args.calls)])

    rounds, disturbed = run_rounds("syscalls", args.rounds, configs, rng, args, body)
    rows: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
    for got in rounds:
        if "bare" not in got:
            continue
        for name, res in got.items():
            rows[name].append({**res, **{f"bare_{k}": v for k, v in got["bare"].items()}})
    table: dict[str, Any] = {}
    for cfg in configs:
        rs = rows[cfg.name]
        entry: dict[str, Any] = {"failed": cfg.failed, "rounds": len(rs)}
        for sc in SYSCALLS:
            for clk in CLOCKS:
                k = f"{sc}_{clk}_ns"
                vals = [x[k] for x in rs]
                added = [x[k] - x[f"bare_{k}"] for x in rs]
                ratio = [x[k] / x[f"bare_{k}"] for x in rs]
                entry[f"{sc}_{clk}"] = {
                    "ns": median(vals), "added": median(added), "ratio": median(ratio),
                    "added_min": min(added, default=float("nan")),
                    "added_max": max(added, default=float("nan")), "all": vals,
                }
        table[cfg.name] = entry
    # Added cost against syscount's added cost in the same round (the yardstick).
    for cfg in configs:
        for sc in SYSCALLS:
            k = f"{sc}_cpu_ns"
            ratios = [(got[cfg.name][k] - got["bare"][k]) / (got["syscount"][k] - got["bare"][k])
                      for got in rounds if {cfg.name, "bare", "syscount"} <= set(got)
                      and got["syscount"][k] != got["bare"][k]]
            if ratios and cfg.name in table:
                table[cfg.name][f"{sc}_cpu"]["vs_syscount"] = median(ratios)
    table["_disturbed"] = disturbed
    return table


def disturbed_note(d: dict[str, int]) -> str:
    return (f"(rounds thrown away and rerun because another process had tracing BPF programs "
            f"loaded: {d['discarded']}; rounds kept although disturbed: {d['kept_disturbed']}; "
            f"rounds with kernel.bpf_stats_enabled left on by someone else: "
            f"{d.get('bpf_stats_by_others', 0)})")


def print_syscall_table(table: dict[str, Any], calls: int) -> None:
    for clk, title in (("cpu", "thread CPU time (CLOCK_THREAD_CPUTIME_ID) - primary"),
                       ("wall", "wall clock (CLOCK_MONOTONIC) - includes preemption by "
                                "other processes")):
        print()
        print(f"== Syscall cost, {title}: {calls:,} calls per phase; ns/call median over "
              "rounds; added/ratio: median of per-round paired values vs that round's bare ==")
        hdr = (f"{'configuration':<16} {'getppid ns':>10} {'added':>8} {'ratio':>6}   "
               f"{'write ns':>9} {'added':>8} {'ratio':>6}   added min..max getppid / write")
        print(hdr)
        print("-" * len(hdr))
        for name, e in table.items():
            if name.startswith("_"):
                continue
            if e["rounds"] == 0:
                print(f"{name:<16} FAILED: {e['failed']}")
                continue
            g, w = e[f"getppid_{clk}"], e[f"write_{clk}"]
            spread = "" if name == "bare" else (
                f"{g['added_min']:+.0f}..{g['added_max']:+.0f} / "
                f"{w['added_min']:+.0f}..{w['added_max']:+.0f}")
            print(f"{name:<16} {g['ns']:>10.1f} {g['added']:>+8.1f} {g['ratio']:>6.2f}   "
                  f"{w['ns']:>9.1f} {w['added']:>+8.1f} {w['ratio']:>6.2f}   {spread}")
            if e["failed"]:
                print(f"{'':<16} (partly failed: {e['failed']})")
        print(disturbed_note(table["_disturbed"]))
    sc_e = table.get("syscount")
    if not sc_e or not sc_e["rounds"]:
        return
    print()
    print("== Added CPU ns per call against syscount-bpfcc's in the same round (median of "
          "per-round ratios); the target is <= 0.5 for strato-counts ==")
    print(f"{'configuration':<16} {'getppid added':>13} {'x syscount':>10}   "
          f"{'write added':>11} {'x syscount':>10}")
    for name, e in table.items():
        if name.startswith("_") or name == "bare" or not e["rounds"]:
            continue
        g, w = e["getppid_cpu"], e["write_cpu"]
        print(f"{name:<16} {g['added']:>+13.1f} {g.get('vs_syscount', float('nan')):>10.2f}   "
              f"{w['added']:>+11.1f} {w.get('vs_syscount', float('nan')):>10.2f}")
    half = 0.5 * sc_e["getppid_cpu"]["added"]
    print(f"(0.5 x syscount's added cost: {half:+.1f} ns per getppid(), "
          f"{0.5 * sc_e['write_cpu']['added']:+.1f} per write())")


@contextlib.contextmanager
def bpf_stats_on(phase: str) -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the body only; the previous value is restored."""
    global _STATS_PHASE
    prev = BPF_STATS.read_text().strip()
    log(f"{phase}: enabling kernel.bpf_stats_enabled (was {prev})")
    _STATS_PHASE = True
    BPF_STATS.write_text("1\n")
    try:
        yield
    finally:
        BPF_STATS.write_text(prev + "\n")
        _STATS_PHASE = False
        log(f"{phase}: kernel.bpf_stats_enabled restored to {prev}")


def prog_names(snap: dict[int, tuple[int, int, int]]) -> dict[int, str]:
    """Names while the programs are still loaded (they are gone once the tool stops)."""
    return {prog_id: prog_name(prog_id) for prog_id in snap}


def prog_deltas(before: dict[int, tuple[int, int, int]],
                after: dict[int, tuple[int, int, int]],
                names: dict[int, str]) -> list[dict[str, Any]]:
    funcs: list[dict[str, Any]] = []
    for prog_id, (ptype, cnt, ns) in sorted(after.items()):
        _, cnt0, ns0 = before.get(prog_id, (ptype, 0, 0))
        runs_n, time_ns = cnt - cnt0, ns - ns0
        funcs.append({"function": names[prog_id], "prog_id": prog_id,
                      "type": TRACING_PROG_TYPES.get(ptype, str(ptype)),
                      "runs": runs_n, "total_ns": time_ns,
                      "ns_per_run": time_ns / runs_n if runs_n else None})
    return funcs


def phase_kernel_ns(runs: list[tuple[Config, str, list[str]]]) -> dict[str, Any]:
    """runs: (configuration, label, workload argv). bpf_stats is on only here."""
    out: dict[str, Any] = {"bpf_stats_before": BPF_STATS.read_text().strip(), "runs": {}}
    with bpf_stats_on("kernel ns"):
        for cfg, label, argv in runs:
            if cfg.failed:
                out["runs"][label] = {"failed": cfg.failed}
                continue
            log(f"kernel ns: {label}")
            try:
                with attached(cfg) as tool:
                    assert tool is not None
                    before = prog_snapshot(tool.pid)
                    t0 = time.monotonic()
                    res = measured(f"bpf_stats {label}", argv)
                    seconds = time.monotonic() - t0
                    after = prog_snapshot(tool.pid)
                    names = prog_names(after)
            except (ToolError, RuntimeError) as exc:
                out["runs"][label] = {"failed": str(exc)}
                log(f"kernel ns: {label} FAILED: {exc}")
                continue
            funcs = prog_deltas(before, after, names)
            per_syscall = sum(
                f["ns_per_run"] for f in funcs
                if f["ns_per_run"] is not None and re.search(r"sys_(enter|exit)$", f["function"])
            )
            out["runs"][label] = {"functions": funcs, "per_syscall_ns": per_syscall,
                                  "seconds": seconds, "workload": res}
    return out


def print_kernel_table(k: dict[str, Any]) -> None:
    print()
    print("== In-kernel ns per BPF program run (kernel.bpf_stats_enabled=1 for this phase "
          "only; run_time_ns/run_cnt deltas from /proc/PID/fdinfo over one workload run; "
          "runs include every other process's events) ==")
    print(f"{'run':<30} {'function':<42} {'type':<15} {'runs':>11} {'ns/run':>8}")
    for label, e in k["runs"].items():
        if "failed" in e:
            print(f"{label:<30} FAILED: {e['failed']}")
            continue
        for f in e["functions"]:
            nsr = f"{f['ns_per_run']:.1f}" if f["ns_per_run"] is not None else "-"
            print(f"{label:<30} {f['function']:<42} {f['type']:<15} {f['runs']:>11,} {nsr:>8}")
        if e["per_syscall_ns"]:
            print(f"{label:<30} {'=> per syscall (sys_enter + sys_exit)':<42} {'':<15} "
                  f"{'':>11} {e['per_syscall_ns']:>8.1f}")


def profile_direct_pct(k: dict[str, Any] | None, hz: int = 19) -> float:
    """Per CPU: ns per on_cpu_sample run x samples/s, as % of that CPU."""
    e = (k or {}).get("runs", {}).get("strato-profile / cpuburn", {})
    for f in e.get("functions", []):
        if f["function"] == "on_cpu_sample" and f["ns_per_run"]:
            return float(f["ns_per_run"]) * hz / 1e9 * 100
    return float("nan")


# --- HTTP


class HttpBench:
    """A loopback HTTP server and a load generator; nginx + wrk when installed."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.port = args.http_port
        self.server: subprocess.Popen[Any] | None = None
        use_nginx = args.http_server == "nginx" or (
            args.http_server == "auto" and shutil.which("nginx"))
        use_wrk = args.http_client == "wrk" or (args.http_client == "auto" and shutil.which("wrk"))
        self.server_kind = "nginx" if use_nginx else "c-httpd"
        self.client_kind = "wrk" if use_wrk else "c-httpload"
        if not use_wrk:
            self.httpload = build("httpload.c", tmp)
        if not use_nginx:
            self.httpd = build("httpd.c", tmp)

    def describe(self) -> str:
        return (f"{self.server_kind} (1 worker) on 127.0.0.1:{self.port}, "
                f"{self.args.http_body} B static body; {self.client_kind} "
                f"1 thread x {self.args.http_conns} keep-alive connections, "
                f"{self.args.http_seconds:g} s per run")

    def start(self) -> None:
        if self.server_kind == "nginx":
            www = self.tmp / "www"
            www.mkdir(exist_ok=True)
            (www / "index.html").write_bytes(b"a" * self.args.http_body)
            os.chmod(self.tmp, 0o755)
            os.chmod(www, 0o755)
            os.chmod(www / "index.html", 0o644)
            conf = self.tmp / "nginx.conf"
            t = self.tmp
            conf.write_text(f"""
worker_processes 1;
daemon off;
pid {t}/nginx.pid;
error_log {t}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path {t}/cb;
    proxy_temp_path {t}/px;
    fastcgi_temp_path {t}/fc;
    uwsgi_temp_path {t}/uw;
    scgi_temp_path {t}/sc;
    server {{
        listen 127.0.0.1:{self.port};
        root {www};
        location / {{ }}
    }}
}}
""")
            argv = ["nginx", "-p", str(t), "-c", str(conf)]
        else:
            argv = [str(self.httpd), str(self.port), str(self.args.http_body)]
        self.server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        _LIVE[self.server.pid] = self.server
        import socket
        deadline = time.monotonic() + 15
        while True:
            if self.server.poll() is not None:
                err = self.server.stderr.read().decode() if self.server.stderr else ""
                raise RuntimeError(f"{self.server_kind} exited: {err.strip()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.server_kind} did not listen on 127.0.0.1:{self.port}")
            time.sleep(0.1)
        self.load(min(2.0, self.args.http_seconds))  # warm-up

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGQUIT if self.server_kind == "nginx"
                                    else signal.SIGTERM)
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            _LIVE.pop(self.server.pid, None)

    def server_pids(self) -> list[int]:
        if self.server is None:
            return []
        pids = [self.server.pid]
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{d}/stat").read_text()
                    if int(stat[stat.rindex(")") + 2:].split()[1]) == self.server.pid:
                        pids.append(int(d))
        return pids

    def load(self, seconds: float) -> dict[str, float]:
        """One load run: requests/s, and CPU seconds used by the client and the server."""
        url_path = "/index.html"
        if self.client_kind == "wrk":
            argv = ["wrk", "-t1", f"-c{self.args.http_conns}", f"-d{seconds:g}s",
                    f"http://127.0.0.1:{self.port}{url_path}"]
        else:
            max_req = int(seconds * 1_000_000)  # bound: far above what loopback reaches
            argv = [str(self.httpload), str(self.port), url_path, str(self.args.http_conns),
                    f"{seconds:g}", str(max_req)]
        spids = self.server_pids()
        s0 = sum(proc_cpu_ticks(p) for p in spids)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _LIVE[proc.pid] = proc
        timer = threading.Timer(seconds + 60, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            stdout, stderr = proc.stdout.read(), proc.stderr.read()
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            _LIVE.pop(proc.pid, None)
        server_cpu = (sum(proc_cpu_ticks(p) for p in spids) - s0) / CLK_TCK
        client_cpu = ru.ru_utime + ru.ru_stime
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {stderr.strip()}")
        if self.client_kind == "wrk":
            m = re.search(r"Requests/sec:\s+([\d.]+)", stdout)
            n = re.search(r"(\d+) requests in", stdout)
            if not m or not n or re.search(r"Non-2xx or 3xx responses|Socket errors", stdout):
                raise RuntimeError(f"wrk: unexpected output: {stdout.strip()}")
            rps, requests = float(m.group(1)), float(n.group(1))
        else:
            kv = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", stdout)}
            if kv.get("errors", 0) or "rps" not in kv:
                raise RuntimeError(f"httpload: unexpected output: {stdout.strip()}")
            rps, requests = kv["rps"], kv["requests"]
        return {"rps": rps, "requests": requests, "server_cpu_s": server_cpu,
                "client_cpu_s": client_cpu}


def phase_http(args: argparse.Namespace, configs: list[Config], tmp: Path,
               rng: random.Random) -> dict[str, Any]:
    """configs[0] is bare; every other one is compared with it round by round.

    Besides requests/s, CPU per request (server + client + collector process CPU
    time / requests) gives a loss estimate that other load on the machine moves less."""
    bench = HttpBench(args, tmp)
    out: dict[str, Any] = {"setup": bench.describe()}
    log(f"http: {bench.describe()}")
    base = configs[0].name
    try:
        bench.start()
        def body(cfg: Config, label: str) -> dict[str, float]:
            with attached(cfg, after_first_drain=True) as tool:
                c0 = proc_cpu_ticks(tool.pid) if tool else 0
                res = watched(label, lambda: bench.load(args.http_seconds))
                res["collector_cpu_s"] = (proc_cpu_ticks(tool.pid) - c0) / CLK_TCK if tool else 0.0
                res["cpu_us_per_req"] = (
                    (res["server_cpu_s"] + res["client_cpu_s"] + res["collector_cpu_s"])
                    / res["requests"] * 1e6)
                return res

        rounds, out["disturbed"] = run_rounds("http", args.rounds, configs, rng, args, body)
        rows: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
        for got in rounds:
            if base not in got:
                continue
            for name, v in got.items():
                v["ratio"] = v["rps"] / got[base]["rps"]
                v["cpu_ratio"] = got[base]["cpu_us_per_req"] / v["cpu_us_per_req"]
                rows[name].append(v)
        out["runs"] = rows
        out["summary"] = {
            n: {k: median([x[k] for x in v]) for k in
                ("rps", "ratio", "cpu_us_per_req", "cpu_ratio", "collector_cpu_s")}
            for n, v in rows.items() if v
        }
        out["loss_pct"] = {n: (1 - e["ratio"]) * 100 for n, e in out["summary"].items()
                           if n != base}
        out["cpu_loss_pct"] = {n: (1 - e["cpu_ratio"]) * 100 for n, e in out["summary"].items()
                               if n != base}
        out["failed"] = {c.name: c.failed for c in configs if c.failed}
        traced = configs[1]
        if not traced.failed:
            out["bpf_config"] = traced.name
            out["bpf"] = http_bpf_breakdown(args, bench, traced)
    except RuntimeError as exc:
        out["failed"] = {"setup": str(exc)}
        log(f"http: FAILED: {exc}")
    finally:
        bench.stop()
    return out


def http_bpf_breakdown(args: argparse.Namespace, bench: HttpBench, cfg: Config) -> dict[str, Any]:
    """One more load run with bpf_stats on (not a timed round): BPF ns per request."""
    try:
        with bpf_stats_on("http"), attached(cfg, after_first_drain=True) as tool:
            assert tool is not None
            before = prog_snapshot(tool.pid)
            res = watched(f"http bpf_stats {cfg.name}", lambda: bench.load(args.http_seconds))
            after = prog_snapshot(tool.pid)
            names = prog_names(after)
    except (ToolError, RuntimeError) as exc:
        log(f"http: bpf_stats run FAILED: {exc}")
        return {"failed": str(exc)}
    funcs = prog_deltas(before, after, names)
    for f in funcs:
        f["runs_per_req"] = f["runs"] / res["requests"]
        f["ns_per_req"] = f["total_ns"] / res["requests"]
    return {"functions": funcs, "requests": res["requests"], "rps": res["rps"],
            "bpf_us_per_req": sum(f["ns_per_req"] for f in funcs) / 1000}


def print_http(h: dict[str, Any]) -> None:
    print()
    print(f"== HTTP on loopback: {h['setup']}; traced runs start after the collector's first "
          "drain ==")
    if "summary" not in h:
        print(f"FAILED: {h['failed']}")
        return
    print(f"{'configuration':<20} {'req/s':>9} {'ratio':>7} {'loss %':>7}   "
          f"{'CPU us/req':>10} {'ratio':>7} {'loss %':>7}   {'collector CPU s/run':>19}   "
          "req/s per round")
    for name, e in h["summary"].items():
        runs = ", ".join(f"{x['rps']:,.0f}" for x in h["runs"][name])
        print(f"{name:<20} {e['rps']:>9,.0f} {e['ratio']:>7.4f} {(1 - e['ratio']) * 100:>7.2f}   "
              f"{e['cpu_us_per_req']:>10.2f} {e['cpu_ratio']:>7.4f} "
              f"{(1 - e['cpu_ratio']) * 100:>7.2f}   {e['collector_cpu_s']:>19.2f}   {runs}")
    print("(ratios and losses: medians of per-round paired values vs that round's bare; "
          "CPU us/req = (server + client + collector CPU time) / requests)")
    print(disturbed_note(h["disturbed"]))
    b = h.get("bpf")
    if b and "functions" in b:
        print(f"-- BPF time per request, {h['bpf_config']} with bpf_stats on (one extra run, "
              f"{b['rps']:,.0f} req/s; not a timed round): {b['bpf_us_per_req']:.2f} us/request")
        print(f"   {'function':<42} {'runs/req':>9} {'ns/run':>8} {'ns/req':>8}")
        for f in sorted(b["functions"], key=lambda f: -f["ns_per_req"]):
            if f["runs"]:
                print(f"   {f['function']:<42} {f['runs_per_req']:>9.2f} "
                      f"{f['ns_per_run']:>8.0f} {f['ns_per_req']:>8.0f}")
    elif b:
        print(f"-- BPF time per request: FAILED: {b['failed']}")
    for name, why in h.get("failed", {}).items():
        print(f"{name}: FAILED: {why}")


def calibrate_burn(burn: Path, seconds: float) -> int:
    probe = run_kv([str(burn), "50000000"])
    return max(int(50_000_000 * seconds * 1e9 / probe["cpu_ns"]), 1_000_000)


def phase_profile(args: argparse.Namespace, configs: list[Config], burn: Path, iters: int,
                  rng: random.Random) -> dict[str, Any]:
    log(f"profile: {iters:,} iterations (~{args.burn_seconds:g} CPU s bare), "
        f"{args.profile_rounds} rounds")
    def body(cfg: Config, label: str) -> dict[str, float]:
        with attached(cfg):
            res = measured(label, [str(burn), str(iters)])
            return {"cpu": res["cpu_ns"] / 1e9, "wall": res["elapsed_ns"] / 1e9}

    rounds, disturbed = run_rounds("profile", args.profile_rounds, configs, rng, args, body)
    rows: dict[str, dict[str, list[float]]] = {c.name: {"cpu": [], "wall": []} for c in configs}
    ratios: dict[str, list[float]] = {"cpu": [], "wall": []}
    for got in rounds:
        for name, v in got.items():
            for clk in CLOCKS:
                rows[name][clk].append(v[clk])
        if len(got) == 2:
            for clk in CLOCKS:
                ratios[clk].append(got[configs[1].name][clk] / got[configs[0].name][clk])
    out: dict[str, Any] = {"iterations": iters, "runs": rows, "disturbed": disturbed,
                           "failed": {c.name: c.failed for c in configs if c.failed}}
    for clk in CLOCKS:
        ratio = median(ratios[clk])
        out[clk] = {"seconds": {n: median(v[clk]) for n, v in rows.items()}, "ratio": ratio,
                    "slowdown_pct": (ratio - 1) * 100,
                    "ratio_of_min": (min(rows[configs[1].name][clk], default=float("nan"))
                                     / min(rows[configs[0].name][clk], default=float("nan")))}
    return out


def print_profile(p: dict[str, Any], direct_pct: float) -> None:
    print()
    print(f"== Profile at 19 Hz: CPU-bound loop of {p['iterations']:,} iterations, bare vs only "
          "the profile program ==")
    for clk, title in (("cpu", "thread CPU time (primary)"), ("wall", "wall clock")):
        e = p[clk]
        print(f"-- {title}")
        for name, v in e["seconds"].items():
            runs = ", ".join(f"{x:.3f}" for x in p["runs"][name][clk])
            print(f"   {name:<16} {v:>8.3f} s median (runs: {runs})")
        print(f"   slowdown {e['slowdown_pct']:+.2f} % (median of paired per-round ratios); "
              f"ratio of the fastest runs {(e['ratio_of_min'] - 1) * 100:+.2f} %")
    print(f"-- direct cost from bpf_stats: on_cpu_sample ns/run x 19 Hz = {direct_pct:.3f} % "
          "of each CPU")
    print(disturbed_note(p["disturbed"]))
    for name, why in p.get("failed", {}).items():
        print(f"{name}: FAILED: {why}")


def proc_cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def proc_rss_kb(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def phase_idle(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """CPU and RSS of the collector: the first --idle-seconds after it attached
    (includes its first, symbol-loading drain), then --steady-seconds more."""
    total = args.idle_seconds + args.steady_seconds
    log(f"idle: {cfg.name}: {args.idle_seconds:g} s from attach + {args.steady_seconds:g} s "
        "steady state, sampling every 1 s")
    samples: list[tuple[float, int, int]] = []
    load_before = Path("/proc/loadavg").read_text().split()[0]
    try:
        with attached(cfg) as tool:
            assert tool is not None
            startup_ticks = proc_cpu_ticks(tool.pid)
            t_begin = time.monotonic()
            while True:
                now = time.monotonic()
                samples.append((now - t_begin, proc_cpu_ticks(tool.pid), proc_rss_kb(tool.pid)))
                if now - t_begin >= total:
                    break
                time.sleep(min(1.0, max(total - (now - t_begin), 0.0)))
    except ToolError as exc:
        log(f"idle: FAILED: {exc}")
        return {"failed": str(exc)}
    load_after = Path("/proc/loadavg").read_text().split()[0]

    def window(a: float, b: float) -> dict[str, Any]:
        w = [x for x in samples if a - 0.5 <= x[0] <= b + 0.5]
        if len(w) < 2:
            return {"seconds": 0.0, "cpu_pct": float("nan"), "rss_mb_min": float("nan"),
                    "rss_mb_max": float("nan")}
        (t0, c0, _), (t1, c1, _) = w[0], w[-1]
        rss = [x[2] / 1024 for x in w]
        return {"seconds": t1 - t0, "cpu_s": (c1 - c0) / CLK_TCK,
                "cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100,
                "rss_mb_min": min(rss), "rss_mb_max": max(rss)}

    buckets = []
    step = cfg.interval_s
    t = 0.0
    while t < total - 0.5:
        b = window(t, min(t + step, total))
        buckets.append({"from_s": t, "cpu_pct": b["cpu_pct"], "rss_mb_max": b["rss_mb_max"]})
        t += step
    return {"first": window(0, args.idle_seconds),
            "steady": window(args.idle_seconds, total) if args.steady_seconds > 0 else None,
            "buckets": buckets, "startup_cpu_s": startup_ticks / CLK_TCK,
            "rss_mb_min": min(x[2] for x in samples) / 1024,
            "rss_mb_max": max(x[2] for x in samples) / 1024,
            "loadavg_1m": f"{load_before} -> {load_after}"}


def print_idle(i: dict[str, Any], what: str) -> None:
    print()
    print(f"== Collector user-space cost: {what}, default 10 s interval, nothing "
          "run by this benchmark (the machine's other load continues) ==")
    if "failed" in i:
        print(f"FAILED: {i['failed']}")
        return
    f, st = i["first"], i["steady"]
    print(f"start-up before 'attached' (compile, load): {i['startup_cpu_s']:.1f} CPU s; "
          f"1-min loadavg {i['loadavg_1m']}")
    print(f"first {f['seconds']:.0f} s after attach: CPU {f['cpu_pct']:.2f} % of one core "
          f"({f['cpu_s']:.1f} CPU s), RSS {f['rss_mb_min']:.0f}-{f['rss_mb_max']:.0f} MB")
    if st:
        print(f"next {st['seconds']:.0f} s (steady):   CPU {st['cpu_pct']:.2f} % of one core "
              f"({st['cpu_s']:.1f} CPU s), RSS {st['rss_mb_min']:.0f}-{st['rss_mb_max']:.0f} MB")
    print("per 10 s from attach:  CPU % " + " ".join(f"{b['cpu_pct']:.1f}" for b in i["buckets"]))
    print("                       RSS MB " + " ".join(f"{b['rss_mb_max']:.0f}" for b in i["buckets"]))


# --------------------------------------------------------------------------- summary


def verdict(value: float, limit: float) -> str:
    if value != value:  # NaN
        return "NOT MEASURED"
    if value <= limit:
        return "PASS"
    return f"MISS by {value - limit:.2f} ({value / limit:.2f}x the target)"


def print_summary(res: dict[str, Any]) -> None:
    print()
    print("=" * 78)
    print("SUMMARY (edge overhead; medians of paired, shuffled rounds; targets in brackets;")
    print("syscall and profile numbers use thread CPU time, wall clock in parentheses)")
    print("=" * 78)
    sc = res.get("syscalls", {})

    def added(e: dict[str, Any], sc_name: str) -> str:
        return (f"{sc_name} {e[f'{sc_name}_cpu']['added']:+.0f} "
                f"({e[f'{sc_name}_wall']['added']:+.0f}) ns")

    for cfg, key, label in (("strato-counts", "counts_ns", "syscalls counts (LATENCY=0)"),
                            ("strato-latency", "latency_ns", "syscalls latency (LATENCY=1)")):
        e = sc.get(cfg)
        if not sc:
            break
        if not e or e["rounds"] == 0:
            print(f"{label:<30} NOT MEASURED {e['failed'] if e else ''}")
            continue
        worst = max(e["getppid_cpu"]["added"], e["write_cpu"]["added"])
        print(f"{label:<30} {added(e, 'getppid')}, {added(e, 'write')} per syscall "
              f"[<= +{TARGETS[key]:.0f}]: {verdict(worst, TARGETS[key])}")
    for cfg, label in (("strato-all", "all six programs"), ("syscount", "syscount-bpfcc"),
                       ("syscount-L", "syscount-bpfcc -L")):
        e = sc.get(cfg)
        if not e:
            continue
        if e["rounds"] == 0:
            print(f"{label:<30} FAILED: {e['failed']}")
            continue
        print(f"{label:<30} {added(e, 'getppid')}, {added(e, 'write')} per syscall (reference)")
    for cfg, label in (("empty-rawtp", "empty raw tp on sys_exit"),
                       ("empty-tp", "empty formatted tp on sys_exit")):
        e = sc.get(cfg)
        if e and e["rounds"]:
            vs = e["getppid_cpu"].get("vs_syscount", float("nan"))
            print(f"{label:<30} {added(e, 'getppid')}, {added(e, 'write')} per syscall "
                  f"= {vs:.2f}x syscount's (floor under any program on every syscall)")
    kn = res.get("kernel_ns", {}).get("runs", {})
    for label, e in kn.items():
        if e.get("per_syscall_ns"):
            print(f"{'BPF ns ' + label.split(' / ')[0]:<30} {e['per_syscall_ns']:.0f} ns per syscall "
                  "inside BPF programs (sys_enter + sys_exit, bpf_stats)")
    h = res.get("http")
    if h:
        for cfg, key, label in (("strato-default", "http_loss_pct", "HTTP, default set"),
                                ("strato-all", "http_all_loss_pct", "HTTP, all six programs")):
            loss = h.get("loss_pct", {}).get(cfg, float("nan"))
            print(f"{label:<30} {loss:.2f} % fewer requests/s "
                  f"[<= {TARGETS[key]:.0f} %]: {verdict(loss, TARGETS[key])}")
            cl = h.get("cpu_loss_pct", {}).get(cfg)
            if cl is not None:
                print(f"{'  same, CPU per request':<30} {cl:.2f} % fewer requests per CPU second "
                      "(less sensitive to other load)")
        b = h.get("bpf") or {}
        if "bpf_us_per_req" in b and "bare" in h.get("summary", {}):
            top = max(b["functions"], key=lambda f: f["ns_per_req"])
            print(f"{'  BPF time per request':<30} {b['bpf_us_per_req']:.1f} us (bpf_stats run; bare "
                  f"total CPU {h['summary']['bare']['cpu_us_per_req']:.1f} us/request; largest: "
                  f"{top['function']} {top['ns_per_req'] / 1000:.1f} us)")
        nl = h.get("loss_pct", {}).get("strato-all-nolat")
        if nl is not None:
            print(f"{'  syscalls without latency':<30} {nl:.2f} % fewer requests/s, "
                  f"{h['cpu_loss_pct']['strato-all-nolat']:.2f} % per CPU second "
                  "(all six, syscalls.LATENCY=0)")
        nd = h.get("loss_pct", {}).get("strato-all-nodrain")
        if nd is not None:
            print(f"{'  no drain in the run':<30} {nd:.2f} % fewer requests/s, "
                  f"{h['cpu_loss_pct']['strato-all-nodrain']:.2f} % per CPU second "
                  "(in-kernel part only; --interval 3600s)")
    p = res.get("profile")
    if p:
        sl = p["cpu"]["slowdown_pct"]
        print(f"{'profile 19 Hz, CPU-bound':<30} {sl:+.2f} % ({p['wall']['slowdown_pct']:+.2f} %) "
              f"slower, direct BPF cost {res.get('profile_direct_pct', float('nan')):.3f} % "
              f"[<= {TARGETS['profile_pct']:.0f} %]: {verdict(sl, TARGETS['profile_pct'])}")
    for idle_key, which in (("idle", "all six"), ("idle_default", "default set")):
        i = res.get(idle_key)
        if not i:
            continue
        if "failed" in i:
            print(f"{'collector idle, ' + which:<30} FAILED: {i['failed']}")
            continue
        for key, label in (("first", f"CPU, first {i['first']['seconds']:.0f} s"),
                           ("steady", "CPU, steady")):
            w = i.get(key)
            if not w:
                continue
            print(f"{'collector ' + label + ', ' + which:<30} {w['cpu_pct']:.2f} % of one core "
                  f"[<= {TARGETS['idle_cpu_pct']} %]: "
                  f"{verdict(w['cpu_pct'], TARGETS['idle_cpu_pct'])}")
        print(f"{'collector RSS, ' + which:<30} {i['rss_mb_min']:.0f}-{i['rss_mb_max']:.0f} MB "
              f"[<= {TARGETS['rss_mb']:.0f} MB]: {verdict(i['rss_mb_max'], TARGETS['rss_mb'])}")
    dist = []
    for phase, d in (("syscalls", sc.get("_disturbed")), ("http", (h or {}).get("disturbed")),
                     ("profile", (p or {}).get("disturbed"))):
        if d:
            dist.append(f"{phase} {d['discarded']} rerun / {d['kept_disturbed']} kept"
                        + (f" / {d['bpf_stats_by_others']} with bpf_stats on"
                           if d.get("bpf_stats_by_others") else ""))
    if dist:
        print(f"{'rounds disturbed by others':<30} " + ", ".join(dist))
    for w in res.get("warnings", []):
        print(f"WARNING: {w}")
    print("=" * 78)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="paired, shuffled rounds per phase")
    p.add_argument("--calls", type=int, default=5_000_000,
                   help="getppid() calls and write() calls per loop run")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: 2 rounds, 300k calls, 3 s HTTP, 15 s idle, no steady window")
    p.add_argument("--phases", default="syscalls,kernel,http,profile,idle",
                   help="comma-separated subset of syscalls,kernel,http,profile,idle")
    p.add_argument("--http-seconds", type=float, default=10.0,
                   help="seconds per HTTP load run, started after the collector's first drain")
    p.add_argument("--http-conns", type=int, default=16)
    p.add_argument("--idle-sets", default="all,default",
                   help="program sets for the idle phase: all (six), default (the default set)")
    p.add_argument("--http-configs", default=None,
                   help="subset of all,all-nolat,all-nodrain,default for the HTTP phase "
                        "(default: all of them; bare always runs)")
    p.add_argument("--http-body", type=int, default=1024, help="static file size in bytes")
    p.add_argument("--http-port", type=int, default=18431)
    p.add_argument("--http-server", choices=["auto", "nginx", "c"], default="auto")
    p.add_argument("--http-client", choices=["auto", "wrk", "c"], default="auto")
    p.add_argument("--burn-seconds", type=float, default=3.0,
                   help="length of the CPU-bound run, bare")
    p.add_argument("--profile-rounds", type=int, default=None,
                   help="rounds for the profile phase (default: 2 x --rounds)")
    p.add_argument("--idle-seconds", type=float, default=60.0,
                   help="collector cost window, from the 'attached' line")
    p.add_argument("--steady-seconds", type=float, default=60.0,
                   help="a further window right after it (0: skip), past the first drain")
    p.add_argument("--retries", type=int, default=2,
                   help="times a round disturbed by another process's tracing BPF programs "
                        "is thrown away and run again")
    p.add_argument("--clean-wait", type=float, default=120.0,
                   help="seconds to wait before a round for other tracing to end")
    p.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    p.add_argument("--stratoscope", help="path to the stratoscope executable")
    p.add_argument("--syscall-configs", default=None,
                   help="subset of strato-counts,strato-latency,strato-all,syscount,syscount-L,"
                        "empty-rawtp,empty-tp for the syscalls and kernel phases (default: all; "
                        "bare always runs)")
    p.add_argument("--json", type=Path, help="also write every result to this JSON file")
    p.add_argument("--empty-tracer", choices=sorted(EMPTY_TRACERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.calls = min(args.calls, 300_000)
        args.http_seconds = min(args.http_seconds, 3.0)
        args.burn_seconds = min(args.burn_seconds, 1.0)
        args.idle_seconds = min(args.idle_seconds, 15.0)
        args.steady_seconds = min(args.steady_seconds, 0.0)
    if args.profile_rounds is None:
        args.profile_rounds = 2 * args.rounds
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.empty_tracer:
        return run_empty_tracer(args.empty_tracer)
    if os.geteuid() != 0:
        print("edge_overhead: needs root (BPF programs, bpf_stats)", file=sys.stderr)
        return 2
    phases = set(args.phases.split(","))
    rng = random.Random(args.seed)
    exe = stratoscope_bin(args.stratoscope)
    bare = Config("bare", None)
    counts = strato("strato-counts", exe, "syscalls", ["syscalls.LATENCY=0"])
    latency = strato("strato-latency", exe, "syscalls", ["syscalls.LATENCY=1"])
    all_six = strato("strato-all", exe, ALL_PROGRAMS, ["syscalls.LATENCY=1"])
    sc = syscount("syscount", [])
    sc_l = syscount("syscount-L", ["-L"])
    empties = [empty_tracer(name) for name in EMPTY_TRACERS]
    if not SYSCOUNT.exists():
        sc.failed = sc_l.failed = (f"{SYSCOUNT} not found (apt-get install bpfcc-tools)")
    res: dict[str, Any] = {"seed": args.seed, "kernel": platform.release(),
                           "cpus": os.cpu_count(), "calls": args.calls, "rounds": args.rounds,
                           "warnings": []}
    stats_now = BPF_STATS.read_text().strip()
    if stats_now != "0":
        res["warnings"].append(f"kernel.bpf_stats_enabled was {stats_now} at start: every BPF "
                               "run is also timed by the kernel during the rounds")
    print(f"edge_overhead: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"rounds={args.rounds}, calls={args.calls:,}, seed={args.seed}, "
          f"stratoscope={exe}", flush=True)
    own = {os.getpid()}
    foreign = foreign_tracing_progs(own)
    if foreign:
        res["warnings"].append("other processes had tracing BPF programs at start: "
                               + "; ".join(foreign))

    def sigterm(_s: int, _f: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, sigterm)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="edge-overhead-"))
    try:
        loop = build("sysloop.c", tmp)
        burn = build("cpuburn.c", tmp)
        traced = [counts, latency, all_six, sc, sc_l, *empties]
        if args.syscall_configs:
            wanted = set(args.syscall_configs.split(","))
            unknown = wanted - {c.name for c in traced}
            if unknown:
                sys.exit(f"edge_overhead: unknown --syscall-configs {sorted(unknown)}")
            traced = [c for c in traced if c.name in wanted]
        configs = [bare, *traced]
        if "syscalls" in phases:
            res["syscalls"] = phase_syscalls(args, configs, loop, rng)
            print_syscall_table(res["syscalls"], args.calls)
            sys.stdout.flush()
        iters = calibrate_burn(burn, args.burn_seconds)
        prof = strato("strato-profile", exe, "profile", [])
        if "kernel" in phases:
            loop_argv = [str(loop), str(args.calls)]
            runs = [(c, f"{c.name} / sysloop", loop_argv) for c in traced]
            runs.append((prof, "strato-profile / cpuburn", [str(burn), str(iters)]))
            res["kernel_ns"] = phase_kernel_ns(runs)
            res["profile_direct_pct"] = profile_direct_pct(res["kernel_ns"])
            print_kernel_table(res["kernel_ns"])
            sys.stdout.flush()
        if "http" in phases:
            all_six.failed = None
            nodrain = strato("strato-all-nodrain", exe, ALL_PROGRAMS, ["syscalls.LATENCY=1"],
                             interval="3600s")
            nolat = strato("strato-all-nolat", exe, ALL_PROGRAMS, ["syscalls.LATENCY=0"])
            defaults = strato("strato-default", exe, default_programs(), [])
            http_cfgs = [all_six, nolat, nodrain, defaults]
            if args.http_configs:
                wanted = set(args.http_configs.split(","))
                http_cfgs = [c for c in http_cfgs if c.name.removeprefix("strato-") in wanted]
            res["http"] = phase_http(args, [bare, *http_cfgs], tmp, rng)
            print_http(res["http"])
            sys.stdout.flush()
        if "profile" in phases:
            res["profile"] = phase_profile(args, [bare, prof], burn, iters, rng)
            print_profile(res["profile"], res.get("profile_direct_pct", float("nan")))
            sys.stdout.flush()
        idle_sets = set(args.idle_sets.split(","))
        if "idle" in phases and "all" in idle_sets:
            idle_cfg = strato("strato-all-idle", exe, ALL_PROGRAMS, ["syscalls.LATENCY=1"],
                              interval=None)
            res["idle"] = phase_idle(args, idle_cfg)
            print_idle(res["idle"], "all six programs")
        if "idle" in phases and "default" in idle_sets:
            idle_default = strato("strato-default-idle", exe, default_programs(), [], interval=None)
            res["idle_default"] = phase_idle(args, idle_default)
            print_idle(res["idle_default"], f"the default set ({default_programs()})")
        foreign = foreign_tracing_progs(own | set(_LIVE))
        if foreign:
            res["warnings"].append("other processes had tracing BPF programs at the end: "
                                   + "; ".join(foreign))
        if CONTAMINATED:
            res["contaminated"] = CONTAMINATED
            res["warnings"].append(
                f"{len(CONTAMINATED)} measured run(s) saw another process's tracing BPF "
                "programs (see the per-phase notes for how many rounds were rerun or kept)")
            print()
            print("== Runs during which other processes had tracing BPF programs loaded "
                  "(including rounds thrown away and rerun) ==")
            for c in CONTAMINATED[:15]:
                print(f"   {c[:200]}")
            if len(CONTAMINATED) > 15:
                print(f"   ... {len(CONTAMINATED) - 15} more in the JSON")
    except KeyboardInterrupt:
        log("interrupted; stopping what was started")
        _cleanup_live()
        return 130
    finally:
        _cleanup_live()
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed_s"] = time.monotonic() - t_start
    print_summary(res)
    print(f"(total {res['elapsed_s'] / 60:.1f} min; seed {args.seed})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
