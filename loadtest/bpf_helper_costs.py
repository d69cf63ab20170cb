"""Where the syscalls program's in-kernel time goes: one BPF helper or map op at a time.

Attaches a raw tracepoint on sys_exit whose body is exactly one piece of the
syscalls program (reading orig_ax, the cgroup id, the comm, a per-CPU hash
update with a 32-byte or an 8-byte key, ...), runs a getppid loop, and prints
run_time_ns / run_cnt from the program's fdinfo (kernel.bpf_stats_enabled).
The "empty" row is the floor: bpf_stats' own clock reads, which every other row
also pays; subtract it to get the cost of the piece. Each variant runs in a
fresh BPF object; run as root.

    .venv/bin/python loadtest/bpf_helper_costs.py [--calls 2000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

HEADER = """#include <uapi/linux/ptrace.h>
struct k32 { u64 a; u64 b; char c[16]; };
BPF_PERCPU_HASH(h32, struct k32, u64, 10240);
BPF_PERCPU_HASH(h8, u64, u64, 10240);
BPF_ARRAY(flip, u32, 1);
struct ident { u64 ts; u64 cgroup; char comm[16]; u32 nr; u32 gen; };
BPF_TASK_STORAGE(tasks, struct ident);
BPF_TABLE("lru_hash", u32, u64, lru, 32768);
RAW_TRACEPOINT_PROBE(sys_exit) { %s return 0; }
"""

VARIANTS: dict[str, str] = {
    "empty": "",
    "pid_tgid": "u64 x = bpf_get_current_pid_tgid(); if (x == 7) return 1;",
    "flip slot (array)": "u32 z = 0; u32 *f = flip.lookup(&z); if (f && *f == 7) return 1;",
    "orig_ax (probe_read)": (
        "long nr = 0; struct pt_regs *regs = (struct pt_regs *)ctx->args[0];"
        " bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax); if (nr == -1) return 1;"
    ),
    "ktime": "u64 t = bpf_ktime_get_ns(); if (t == 7) return 1;",
    "task storage get": (
        "struct ident *t = tasks.task_storage_get((struct task_struct *)"
        "bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE); if (t && t->gen == 7) return 1;"
    ),
    "LRU hash by tid, lookup": (
        "u32 tid = (u32)bpf_get_current_pid_tgid(); u64 z = 0, *v = lru.lookup(&tid);"
        " if (!v) lru.update(&tid, &z); else if (*v == 7) return 1;"
    ),
    "cgroup id": "u64 cg = bpf_get_current_cgroup_id(); if (cg == 7) return 1;",
    "comm": "char c[16]; bpf_get_current_comm(&c, sizeof(c)); if (c[0] == 7) return 1;",
    "percpu hash, 8 B key": "u64 k = 1; u64 init = 0, *v = h8.lookup_or_try_init(&k, &init); if (v) *v += 1;",
    "percpu hash, 32 B key": (
        "struct k32 k = {}; k.a = 1; u64 init = 0, *v = h32.lookup_or_try_init(&k, &init);"
        " if (v) *v += 1;"
    ),
    "counts path (all of the above)": (
        "long nr = 0; struct pt_regs *regs = (struct pt_regs *)ctx->args[0];"
        " bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);"
        " u32 z = 0; u32 *f = flip.lookup(&z); if (f && *f == 7) return 1;"
        " struct k32 k = {}; k.a = nr; k.b = bpf_get_current_cgroup_id();"
        " bpf_get_current_comm(&k.c, sizeof(k.c));"
        " u64 init = 0, *v = h32.lookup_or_try_init(&k, &init); if (v) *v += 1;"
    ),
}

LOOP_C = """#include <stdlib.h>
#include <unistd.h>
int main(int c, char **v) { long n = atol(v[1]); for (long i = 0; i < n; i++) getppid(); return 0; }
"""


def run_variant(body: str, loop: Path, calls: int) -> float:
    from bcc import BPF

    b = BPF(text=HEADER % body)
    try:
        fd = b.funcs[b"raw_tracepoint__sys_exit"].fd
        subprocess.run([str(loop), str(calls)], check=True)
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        ns = int(re.search(r"run_time_ns:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
        cnt = int(re.search(r"run_cnt:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
        return ns / max(cnt, 1)
    finally:
        b.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = stats.read_text().strip()
    with tempfile.TemporaryDirectory() as tmp:
        loop = Path(tmp) / "loop"
        (Path(tmp) / "loop.c").write_text(LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", str(loop), str(Path(tmp) / "loop.c")], check=True)
        stats.write_text("1\n")
        try:
            results = {
                name: statistics.median(run_variant(body, loop, args.calls) for _ in range(args.repeat))
                for name, body in VARIANTS.items()
            }
        finally:
            stats.write_text(previous + "\n")
    floor = results["empty"]
    print(f"{'piece':34s} {'ns/run':>8s} {'minus empty':>12s}")
    for name, ns in results.items():
        print(f"{name:34s} {ns:8.1f} {ns - floor:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
