/* System calls per (syscall, comm, cgroup): counts, errors per errno and,
 * with LATENCY=1, a latency histogram. Raw tracepoints on sys_enter/sys_exit
 * (cheaper to attach than the formatted ones; costs measured in docs/BENCHMARKS.md).
 *
 * Every aggregate map exists twice (_0 and _1); flip_ctl[0] says which one the
 * programs write. User space flips it, waits out in-flight programs, then reads
 * and clears the idle copy, so no increment is lost between read and reset. */
#include <uapi/linux/ptrace.h>
#include "stratoscope.h"

#ifndef LATENCY
#define LATENCY 1
#endif
#ifndef MAX_SERIES
#define MAX_SERIES 10240
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 32768
#endif

struct count_key {
    u32 syscall;
    u32 pad;
    u64 cgroup;
    char comm[16];
};

struct error_key {
    u32 syscall;
    s32 err;
    u64 cgroup;
    char comm[16];
};

struct latency_key {
    u32 syscall;
    u32 slot;
    u64 cgroup;
    char comm[16];
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_PERCPU_HASH(counts_0, struct count_key, u64, MAX_SERIES);
BPF_PERCPU_HASH(counts_1, struct count_key, u64, MAX_SERIES);
BPF_HASH(errors_0, struct error_key, u64, MAX_SERIES);
BPF_HASH(errors_1, struct error_key, u64, MAX_SERIES);
#if LATENCY
BPF_PERCPU_HASH(latency_0, struct latency_key, struct strato_hist_val, MAX_SERIES);
BPF_PERCPU_HASH(latency_1, struct latency_key, struct strato_hist_val, MAX_SERIES);
BPF_TABLE("lru_hash", u32, u64, start, MAX_THREADS);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 ts = bpf_ktime_get_ns();
    u64 *slot = start.lookup(&tid);
    if (slot)
        *slot = ts;
    else
        start.update(&tid, &ts);
    return 0;
}
#endif

RAW_TRACEPOINT_PROBE(sys_exit)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long ret = (long)ctx->args[1];
    long nr = 0;
#if defined(__x86_64__)
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
#elif defined(__aarch64__)
    int nr32 = 0;
    bpf_probe_read_kernel(&nr32, sizeof(nr32), &regs->syscallno);
    nr = nr32;
#endif
    if (nr < 0)
        return 0;

    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;

    struct count_key key = {};
    key.syscall = (u32)nr;
    key.cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&key.comm, sizeof(key.comm));

    u64 one = 1, init = 0, *cnt;
    if (active)
        cnt = counts_1.lookup_or_try_init(&key, &init);
    else
        cnt = counts_0.lookup_or_try_init(&key, &init);
    if (cnt)
        *cnt += 1;

    if (ret < 0 && ret >= -4095) {
        struct error_key ekey = {};
        ekey.syscall = key.syscall;
        ekey.err = (s32)-ret;
        ekey.cgroup = key.cgroup;
        __builtin_memcpy(ekey.comm, key.comm, sizeof(ekey.comm));
        u64 *ecnt;
        if (active)
            ecnt = errors_1.lookup_or_try_init(&ekey, &init);
        else
            ecnt = errors_0.lookup_or_try_init(&ekey, &init);
        if (ecnt)
            __sync_fetch_and_add(ecnt, one);
    }

#if LATENCY
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *tsp = start.lookup(&tid);
    if (!tsp || *tsp == 0)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *tsp;
    *tsp = 0;
    struct latency_key lkey = {};
    lkey.syscall = key.syscall;
    lkey.slot = strato_slot(delta);
    lkey.cgroup = key.cgroup;
    __builtin_memcpy(lkey.comm, key.comm, sizeof(lkey.comm));
    struct strato_hist_val hinit = {}, *h;
    if (active)
        h = latency_1.lookup_or_try_init(&lkey, &hinit);
    else
        h = latency_0.lookup_or_try_init(&lkey, &hinit);
    if (h) {
        h->count += 1;
        h->sum += delta;
    }
#endif
    return 0;
}
