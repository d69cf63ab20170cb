#!/usr/bin/env python3
"""What the `sched` program costs per context switch: one build of bpf/ against another
(by default main's against this checkout's), in one run.

Every configuration is a real `stratoscope edge --programs sched` whose --config points
at a copy of a bpf/ directory (`old`: `git archive REV bpf/`; `new`: this checkout's;
`--variant NAME=FILE.c`: this checkout's with sched.c replaced). With --refs, two
reference tracers run too: `empty-raw` and `empty-tp`, empty programs on raw and on
formatted sched_switch + sched_wakeup (the dispatch floor of each kind).

Phases (paired rounds: each round runs every configuration once in a fresh random
order; "added" is the median of per-round differences against that round's bare run):

1. time (kernel.bpf_stats_enabled off): the workloads, bare and under each tracer,
   CPU time of all their processes and wall time per hop or request:
   - pingpong (workloads/ring.c, 2 processes pinned to one CPU passing a byte over
     pipes): per hop one wakeup and one switch, caches warm;
   - ring (16 processes on one CPU, each writing --touch-kb of its own memory before it
     passes the byte on): many tasks per CPU and the scheduler's data pushed out of
     L1/L2 between switches;
   - http: the loopback HTTP pair of edge_overhead.py (nginx + wrk if installed, else
     workloads/httpd.c + httpload.c); both processes stay busy, so switches are few.
2. stats (bpf_stats on for this phase only, restored after): each tracer under the
   same workloads and sysloop (a getppid() loop: switches are rare, mostly of other
   processes, with cold caches); run_time_ns / run_cnt per program from the tracer's
   /proc/PID/fdinfo, and runs per hop, request or syscall.

The tracers are real collectors (10 s drain interval); the first drain is not waited
for. A configuration whose first build failed and that runs its fallback build is
marked "(fallback)". Needs root and the project's venv:

    sudo .venv/bin/python loadtest/sched_cost.py --rounds 7
    sudo .venv/bin/python loadtest/sched_cost.py --old HEAD~1 --refs --phases time
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import edge_overhead as eo  # noqa: E402  (the tracer, round and bpf_stats machinery)

ROOT = HERE.parent

EMPTY = {
    "empty-raw": "RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }\n"
                 "RAW_TRACEPOINT_PROBE(sched_wakeup) { return 0; }\n",
    "empty-tp": "TRACEPOINT_PROBE(sched, sched_switch) { return 0; }\n"
                "TRACEPOINT_PROBE(sched, sched_wakeup) { return 0; }\n",
}


def bcc_tracer(src: Path) -> int:
    """Child mode: load one BCC source (its probes attach themselves), wait for SIGINT."""
    import signal

    from bcc import BPF

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    b = BPF(src_file=str(src).encode())
    print("attached empty; draining", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        b.cleanup()
    return 0


def bpf_copy(tmp: Path, name: str, rev: str | None, sched_c: Path | None = None) -> Path:
    """A bpf/ directory for one configuration: REV's (git archive) or this checkout's."""
    dest = tmp / name
    dest.mkdir()
    if rev is not None:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bpf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest / "bpf"
    out = dest / "bpf"
    out.mkdir()
    for f in (ROOT / "bpf").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if sched_c is not None:
        (out / "sched.c").write_bytes(sched_c.read_bytes())
    return out


def edge_config(tmp: Path, name: str, bpf_dir: Path, exe: str, programs: str,
                params: list[str]) -> eo.Config:
    conf = tmp / f"{name}.yaml"
    conf.write_text(f"bpf_dir: {bpf_dir}\n")
    argv = [exe, "edge", "--config", str(conf), "--programs", programs, "--metrics-port", "0",
            "--output", "jsonl:/dev/null", "--interval", "10s"]
    for p in params:
        argv += ["--param", p]
    return eo.Config(name, argv, r"attached (.+?); draining", "stratoscope",
                     programs.split(","), 10.0)


def fallback_seen(tool: eo.Tool | None) -> bool:
    return tool is not None and any("fallback build" in line for line in tool.lines)


class Workloads:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.ring = eo.build("ring.c", tmp)
        self.sysloop = eo.build("sysloop.c", tmp)
        self.http: eo.HttpBench | None = None
        if "http" in args.workloads:
            ns = argparse.Namespace(
                http_port=args.http_port, http_server="auto", http_client="auto",
                http_body=1024, http_conns=16, http_seconds=args.http_seconds)
            self.http = eo.HttpBench(ns, tmp)

    def run(self, kind: str) -> dict[str, float]:
        if kind == "pingpong":
            return eo.run_kv([str(self.ring), str(self.args.laps), str(self.args.cpu), "2"])
        if kind == "ring":
            return eo.run_kv([str(self.ring), str(self.args.laps // 40), str(self.args.cpu),
                              "16", str(self.args.touch_kb)])
        if kind == "sysloop":
            return eo.run_kv([str(self.sysloop), str(self.args.calls)])
        assert self.http is not None
        r = self.http.load(self.args.http_seconds)
        r["cpu_ns_per_req"] = (r["server_cpu_s"] + r["client_cpu_s"]) / r["requests"] * 1e9
        return r

    def ops(self, kind: str, res: dict[str, float]) -> float:
        """Hops, requests or calls in one run (the denominator of 'runs per op')."""
        if kind in ("pingpong", "ring"):
            return res["hops"]
        if kind == "sysloop":
            return 2 * res["calls"]
        return res["requests"]


METRICS = {"pingpong": ("hop_cpu_ns", "hop_wall_ns"), "ring": ("hop_cpu_ns", "hop_wall_ns"),
           "http": ("cpu_ns_per_req", "rps")}


def phase_time(args: argparse.Namespace, configs: list[eo.Config], wl: Workloads,
               rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in [k for k in args.workloads if k in METRICS]:
        def body(cfg: eo.Config, label: str, kind: str = kind) -> dict[str, float]:
            with eo.attached(cfg) as tool:
                res = eo.watched(label, lambda: wl.run(kind))
                res["fallback"] = float(fallback_seen(tool))
                return res

        rounds, disturbed = eo.run_rounds(f"time {kind}", args.rounds, configs, rng, args, body)
        rows: dict[str, Any] = {}
        for cfg in configs:
            entry: dict[str, Any] = {"failed": cfg.failed}
            paired = [(g[cfg.name], g["bare"]) for g in rounds if cfg.name in g and "bare" in g]
            for m in METRICS[kind]:
                entry[m] = eo.median([x[m] for x, _ in paired])
                entry[f"{m}_added"] = eo.median([x[m] - b[m] for x, b in paired])
                entry[f"{m}_all"] = [x[m] for x, _ in paired]
            entry["fallback"] = any(x.get("fallback") for x, _ in paired)
            rows[cfg.name] = entry
        # new against old, per round, on the added cost
        for cfg in configs:
            if cfg.name in ("bare", "old"):
                continue
            m = METRICS[kind][0]
            ratios = [(g[cfg.name][m] - g["bare"][m]) / (g["old"][m] - g["bare"][m])
                      for g in rounds if {cfg.name, "old", "bare"} <= set(g)
                      and g["old"][m] != g["bare"][m]]
            rows[cfg.name]["added_vs_old"] = eo.median(ratios)
        out[kind] = {"rows": rows, "disturbed": disturbed}
    return out


def phase_stats(args: argparse.Namespace, configs: list[eo.Config], wl: Workloads,
                rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    traced = [c for c in configs if c.argv is not None]
    with eo.bpf_stats_on("stats"):
        for kind in args.workloads:
            def body(cfg: eo.Config, label: str, kind: str = kind) -> dict[str, float]:
                with eo.attached(cfg) as tool:
                    assert tool is not None
                    before = eo.prog_snapshot(tool.pid)
                    res = eo.watched(label, lambda: wl.run(kind))
                    after = eo.prog_snapshot(tool.pid)
                    names = eo.prog_names(after)
                    got: dict[str, float] = {"fallback": float(fallback_seen(tool))}
                    for f in eo.prog_deltas(before, after, names):
                        fn = re.sub(r"^(raw_tracepoint__|tracepoint__sched__)", "", f["function"])
                        if f["runs"]:
                            got[f"{fn}_ns"] = f["ns_per_run"]
                            got[f"{fn}_per_op"] = f["runs"] / wl.ops(kind, res)
                    return got

            rounds, disturbed = eo.run_rounds(f"stats {kind}", args.stats_rounds, traced, rng,
                                              args, body)
            rows: dict[str, Any] = {}
            for cfg in traced:
                got = [g[cfg.name] for g in rounds if cfg.name in g]
                keys = sorted({k for g in got for k in g})
                rows[cfg.name] = {k: eo.median([g[k] for g in got if k in g]) for k in keys}
                rows[cfg.name]["failed"] = cfg.failed
                for fn in ("sched_switch", "sched_wakeup"):
                    rows[cfg.name][f"{fn}_ns_all"] = [g.get(f"{fn}_ns") for g in got]
            for cfg in traced:
                if cfg.name == "old":
                    continue
                for fn in ("sched_switch", "sched_wakeup"):
                    ratios = [g[cfg.name][f"{fn}_ns"] / g["old"][f"{fn}_ns"] for g in rounds
                              if f"{fn}_ns" in g.get(cfg.name, {}) and f"{fn}_ns" in g.get("old", {})]
                    rows[cfg.name][f"{fn}_vs_old"] = eo.median(ratios)
            out[kind] = {"rows": rows, "disturbed": disturbed}
    return out


def print_time(t: dict[str, Any]) -> None:
    for kind, e in t.items():
        m0, m1 = METRICS[kind]
        unit = "request" if kind == "http" else "hop"
        print()
        print(f"== time, {kind}: per {unit}; added = median of per-round differences with "
              "that round's bare; kernel.bpf_stats_enabled off ==")
        print(f"{'configuration':<16} {m0:>15} {'added':>8} {'added/old':>9}   {m1:>12} {'added':>8}")
        for name, r in e["rows"].items():
            if r[m0] != r[m0]:
                print(f"{name:<16} FAILED: {r['failed']}")
                continue
            fb = " (fallback)" if r["fallback"] else ""
            vs = f"{r['added_vs_old']:>9.2f}" if "added_vs_old" in r else f"{'':>9}"
            add0 = "" if name == "bare" else f"{r[m0 + '_added']:+8.0f}"
            add1 = "" if name == "bare" else f"{r[m1 + '_added']:+8.0f}"
            print(f"{name:<16} {r[m0]:>15.0f} {add0:>8} {vs}   {r[m1]:>12.0f} {add1:>8}{fb}")
        print(eo.disturbed_note(e["disturbed"]))


def print_stats(s: dict[str, Any]) -> None:
    for kind, e in s.items():
        print()
        print(f"== bpf_stats, {kind}: ns per run (median over rounds) and runs per "
              f"{'request' if kind == 'http' else 'syscall' if kind == 'sysloop' else 'hop'};"
              " x old: median of per-round ratios ==")
        print(f"{'configuration':<16} {'sched_switch':>12} {'x old':>6} {'runs/op':>8}   "
              f"{'sched_wakeup':>12} {'x old':>6} {'runs/op':>8}")
        for name, r in e["rows"].items():
            if "sched_switch_ns" not in r:
                print(f"{name:<16} FAILED: {r.get('failed')}")
                continue
            fb = " (fallback)" if r.get("fallback") else ""
            cells = []
            for fn in ("sched_switch", "sched_wakeup"):
                vs = r.get(f"{fn}_vs_old")
                cells.append(f"{r.get(f'{fn}_ns', float('nan')):>12.0f} "
                             f"{(f'{vs:.2f}' if vs else ''):>6} {r.get(f'{fn}_per_op', 0):>8.3f}")
            print(f"{name:<16} {cells[0]}   {cells[1]}{fb}")
        print(eo.disturbed_note(e["disturbed"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", default="main", help="git revision whose bpf/ is `old`")
    p.add_argument("--no-new", action="store_true", help="leave this checkout's bpf/ out")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FILE.c",
                   help="also this sched.c, with this checkout's sched.yaml")
    p.add_argument("--param", action="append", default=[], metavar="[CONFIG:]K=V",
                   help="a --param for one configuration (new:sched.RAW=0) or for all")
    p.add_argument("--programs", default="sched",
                   help="programs each edge runs (sched must be one; the others come from "
                        "the same bpf/ copy), e.g. all six for the cache pressure of a "
                        "fully traced node")
    p.add_argument("--refs", action="store_true", help="also empty-raw and empty-tp")
    p.add_argument("--phases", default="time,stats")
    p.add_argument("--workloads", default="pingpong,ring,http,sysloop",
                   help="time uses all but sysloop; stats all")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--stats-rounds", type=int, default=None, help="default: --rounds")
    p.add_argument("--laps", type=int, default=200_000,
                   help="laps of the 2-process ring (the 16-process one makes laps / 40)")
    p.add_argument("--touch-kb", type=int, default=256,
                   help="memory each process of the 16-process ring writes per hop")
    p.add_argument("--cpu", type=int, default=0, help="CPU for the rings (-1: unpinned)")
    p.add_argument("--calls", type=int, default=1_000_000, help="getppid()/write() for sysloop")
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument("--http-port", type=int, default=18432)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--clean-wait", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stratoscope", help="path to the stratoscope executable")
    p.add_argument("--json", type=Path)
    p.add_argument("--bcc-tracer", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workloads = args.workloads.split(",")
    if args.stats_rounds is None:
        args.stats_rounds = args.rounds
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bcc_tracer:
        return bcc_tracer(args.bcc_tracer)
    if os.geteuid() != 0:
        print("sched_cost: needs root (BPF programs, bpf_stats)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    exe = eo.stratoscope_bin(args.stratoscope)
    params: dict[str, list[str]] = {}
    common: list[str] = []
    for p in args.param:
        name, sep, kv = p.partition(":")
        if sep:
            params.setdefault(name, []).append(kv)
        else:
            common.append(p)
    tmp = Path(tempfile.mkdtemp(prefix="sched-cost-"))
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.old],
                         check=True, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                          check=True, capture_output=True, text=True).stdout.strip()
    print(f"sched_cost: old = {args.old} ({rev}), new = this checkout ({head}); "
          f"programs {args.programs}; rounds={args.rounds}, seed={args.seed}", flush=True)
    configs = [eo.Config("bare", None),
               edge_config(tmp, "old", bpf_copy(tmp, "old", args.old), exe, args.programs,
                           common + params.get("old", []))]
    if not args.no_new:
        configs.append(edge_config(tmp, "new", bpf_copy(tmp, "new", None), exe, args.programs,
                                   common + params.get("new", [])))
    for v in args.variant:
        name, _, path = v.partition("=")
        configs.append(edge_config(tmp, name, bpf_copy(tmp, name, None, Path(path)), exe,
                                   args.programs, common + params.get(name, [])))
    if args.refs:
        for name, text in EMPTY.items():
            src = tmp / f"{name}.c"
            src.write_text(text)
            configs.append(eo.Config(name, [sys.executable, str(Path(__file__).resolve()),
                                            "--bcc-tracer", str(src)],
                                     r"attached (.+?); draining", "bcc"))
    res: dict[str, Any] = {"seed": args.seed, "old": args.old, "old_rev": rev, "new": head,
                           "configs": [c.name for c in configs]}
    wl = Workloads(args, tmp)
    try:
        if wl.http is not None:
            wl.http.start()
        if "time" in args.phases:
            res["time"] = phase_time(args, configs, wl, rng)
            print_time(res["time"])
            sys.stdout.flush()
        if "stats" in args.phases:
            res["stats"] = phase_stats(args, configs, wl, rng)
            print_stats(res["stats"])
    except KeyboardInterrupt:
        eo._cleanup_live()
        return 130
    finally:
        if wl.http is not None:
            wl.http.stop()
        eo._cleanup_live()
    res["contaminated"] = eo.CONTAMINATED
    print(f"\n(bpf_stats now {eo.BPF_STATS.read_text().strip()}; runs that saw other tracing "
          f"programs: {len(eo.CONTAMINATED)}; seed {args.seed}; {time.strftime('%d %b %H:%M')})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
