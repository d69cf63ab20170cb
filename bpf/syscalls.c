/* System calls per (syscall, comm, cgroup): counts, errors per errno and,
 * with LATENCY=1, a latency histogram. Raw tracepoints on sys_enter/sys_exit
 * (cheaper to attach than the formatted ones; costs measured in docs/BENCHMARKS.md).
 *
 * Every aggregate map exists twice (_0 and _1); flip_ctl[0] says which one the
 * programs write. User space flips it, waits out in-flight programs, then reads
 * and clears the idle copy, so no increment is lost between read and reset.
 *
 * Full maps: a BCC hash map that is full makes lookup_or_try_init return NULL.
 * An increment that finds no room goes to the map's overflow series instead,
 * kept in a separate map <map>_other_{0,1} with the same key and value: comm
 * "other" and cgroup 0, the syscall (and errno / latency slot) kept, so totals
 * per syscall stay exact. A separate map, rather than a reserve inside the main
 * one, because a hash map cannot reserve entries for particular keys: once the
 * main map is full, only this map's own bound matters, and its keys range over
 * the bounded fields alone (about 460 syscalls; x errnos; x 66 latency slots),
 * so OTHER_SERIES covers them. Each diverted increment is counted in
 * <map>_overflow_{0,1}[0]; one that finds the other map full too (which needs
 * garbage syscall numbers or a tiny OTHER_SERIES) is counted in slot [1], so no
 * increment is ever dropped silently. Counters flip with their maps, so one
 * window's counts match that window's "other" series exactly.
 *
 * Sizing: MAX_SERIES series per map (latency: 4 entries per series, one per
 * bucket) covers a busy node, 1,000 active processes with 30 kinds of syscalls
 * each per interval, with room to spare. The maps are preallocated: a map
 * that allocates as it goes (BPF_F_NO_PREALLOC) fails an insert with ENOMEM
 * when a burst of new series outruns its per-CPU free list, which sent
 * increments of a busy node to "other" although the map had room. */
#include <uapi/linux/ptrace.h>
#include "stratoscope.h"

#ifndef LATENCY
#define LATENCY 0
#endif
/* 1: each task's comm, cgroup and entry timestamp in task-local storage (kernel
 * 5.11+ with BTF). 0, the fallback: comm and cgroup from the helpers on every
 * call and the entry timestamp in a hash by thread id (MAX_TASKS entries). */
#ifndef TASK_STORAGE
#define TASK_STORAGE 1
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 65536
#endif
#ifndef MAX_SERIES
#define MAX_SERIES 65536
#endif
/* A latency series spreads over a few buckets (one entry per bucket). */
#define LATENCY_ENTRIES (4 * MAX_SERIES)
#ifndef OTHER_SERIES
#define OTHER_SERIES 4096
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
BPF_PERCPU_HASH(counts_other_0, struct count_key, u64, OTHER_SERIES);
BPF_PERCPU_HASH(counts_other_1, struct count_key, u64, OTHER_SERIES);
BPF_HASH(errors_other_0, struct error_key, u64, OTHER_SERIES);
BPF_HASH(errors_other_1, struct error_key, u64, OTHER_SERIES);
/* [0]: increments moved to the other series; [1]: lost (other map full too). */
BPF_PERCPU_ARRAY(counts_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(counts_overflow_1, u64, 2);
BPF_PERCPU_ARRAY(errors_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(errors_overflow_1, u64, 2);
#if LATENCY
BPF_PERCPU_HASH(latency_0, struct latency_key, struct strato_hist_val, LATENCY_ENTRIES);
BPF_PERCPU_HASH(latency_1, struct latency_key, struct strato_hist_val, LATENCY_ENTRIES);
BPF_PERCPU_HASH(latency_other_0, struct latency_key, struct strato_hist_val, OTHER_SERIES);
BPF_PERCPU_HASH(latency_other_1, struct latency_key, struct strato_hist_val, OTHER_SERIES);
BPF_PERCPU_ARRAY(latency_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(latency_overflow_1, u64, 2);
#endif

/* One call in counts (or its overflow series). With LATENCY, a call with a
 * latency sample is counted by the sample instead: syscalls_total adds both
 * maps (plus_samples_of in syscalls.yaml), so the hot path updates one map. */
static __always_inline void count_call(struct count_key *key, u32 active)
{
    u64 init = 0, *cnt, *ovf;
    if (active)
        cnt = counts_1.lookup_or_try_init(key, &init);
    else
        cnt = counts_0.lookup_or_try_init(key, &init);
    if (!cnt) {
        struct count_key okey = {};
        okey.syscall = key->syscall;
        __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
        if (active)
            cnt = counts_other_1.lookup_or_try_init(&okey, &init);
        else
            cnt = counts_other_0.lookup_or_try_init(&okey, &init);
        u32 slot = cnt ? 0 : 1;
        if (active)
            ovf = counts_overflow_1.lookup(&slot);
        else
            ovf = counts_overflow_0.lookup(&slot);
        if (ovf)
            *ovf += 1;
    }
    if (cnt)
        *cnt += 1;
}

#if TASK_STORAGE
/* What the hot path needs about the current task, kept in the task itself
 * (task-local storage: no hash lookup, freed when the task exits):
 * - its comm and cgroup, read with the helpers (~95 + ~50 ns) once and then
 *   copied (gen says they are current: gen == ident_epoch[0] + 1);
 * - with LATENCY, the entry timestamp and syscall number sys_enter left for
 *   sys_exit (the number from sys_enter's arguments, not a probe read).
 * A rename of the current task (prctl, exec) rewrites the cached comm from the
 * tracepoint's argument; a rename of another task or a cgroup move bumps
 * ident_epoch, so every task reads its comm and cgroup afresh once. */
struct task_ident {
    u64 ts;
    u64 cgroup;
    char comm[16];
    u32 nr;
    u32 gen;
};

BPF_TASK_STORAGE(tasks, struct task_ident);
BPF_ARRAY(ident_epoch, u32, 1);

static __always_inline u32 current_gen(void)
{
    u32 zero = 0;
    u32 *e = ident_epoch.lookup(&zero);
    return (e ? *e : 0) + 1;
}

RAW_TRACEPOINT_PROBE(task_rename)
{
    /* TP_PROTO(struct task_struct *task, const char *comm), fired before the copy. */
    if (ctx->args[0] == bpf_get_current_task()) {
        struct task_ident *t = tasks.task_storage_get(
            (struct task_struct *)bpf_get_current_task_btf(), 0, 0);
        if (t && t->gen == current_gen()) {
            __builtin_memset(t->comm, 0, sizeof(t->comm));
            bpf_probe_read_kernel_str(t->comm, sizeof(t->comm), (const char *)ctx->args[1]);
        }
        return 0;
    }
    u32 zero = 0;
    u32 *e = ident_epoch.lookup(&zero);
    if (e)
        __sync_fetch_and_add(e, 1);
    return 0;
}

RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
    u32 zero = 0;
    u32 *e = ident_epoch.lookup(&zero);
    if (e)
        __sync_fetch_and_add(e, 1);
    return 0;
}
#endif

#if LATENCY
static __always_inline void count_lost_sample(void)
{
    /* No room for this call's entry: its latency sample is lost, counted. */
    u32 zero = 0, slot = 1, *flip = flip_ctl.lookup(&zero);
    u64 *ovf = (flip && (*flip & 1)) ? latency_overflow_1.lookup(&slot)
                                     : latency_overflow_0.lookup(&slot);
    if (ovf)
        *ovf += 1;
}

#if TASK_STORAGE
RAW_TRACEPOINT_PROBE(sys_enter)
{
    struct task_ident *t = tasks.task_storage_get(
        (struct task_struct *)bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!t) {
        count_lost_sample();
        return 0;
    }
    t->nr = (u32)ctx->args[1];
    t->ts = bpf_ktime_get_ns();
    return 0;
}
#else
struct entry {
    u64 ts;
    u32 nr;
    u32 pad;
};
BPF_HASH(entered, u32, struct entry, MAX_TASKS);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 nr = (u32)ctx->args[1];
#if defined(__x86_64__)
    if (nr == 60 || nr == 231)  /* exit, exit_group: never return, would leak an entry */
        return 0;
#elif defined(__aarch64__)
    if (nr == 93 || nr == 94)
        return 0;
#endif
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct entry e = {.ts = bpf_ktime_get_ns(), .nr = nr};
    if (entered.update(&tid, &e) != 0)
        count_lost_sample();
    return 0;
}
#endif
#endif

RAW_TRACEPOINT_PROBE(sys_exit)
{
    long ret = (long)ctx->args[1];
    long nr = -1;
#if TASK_STORAGE
    struct task_ident *t = tasks.task_storage_get(
        (struct task_struct *)bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
#endif
#if LATENCY
    u64 ts = 0;
#if TASK_STORAGE
    if (t && t->ts) {
        ts = t->ts;
        nr = (s32)t->nr;
        t->ts = 0;
    } else
#else
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct entry *e = entered.lookup(&tid);
    if (e) {
        ts = e->ts;
        nr = (s32)e->nr;
        entered.delete(&tid);
    } else
#endif
#endif
    {
        /* No sys_enter seen (in flight at attach, a new task's first return). */
        struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
#if defined(__x86_64__)
        bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
#elif defined(__aarch64__)
        int nr32 = 0;
        bpf_probe_read_kernel(&nr32, sizeof(nr32), &regs->syscallno);
        nr = nr32;
#endif
    }
    if (nr < 0)
        return 0;

    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;

    struct count_key key = {};
    key.syscall = (u32)nr;
#if TASK_STORAGE
    u32 gen = current_gen();
    if (t && t->gen == gen) {
        key.cgroup = t->cgroup;
        __builtin_memcpy(key.comm, t->comm, sizeof(key.comm));
    } else
#endif
    {
        key.cgroup = bpf_get_current_cgroup_id();
        bpf_get_current_comm(&key.comm, sizeof(key.comm));
#if TASK_STORAGE
        if (t) {
            t->cgroup = key.cgroup;
            __builtin_memcpy(t->comm, key.comm, sizeof(key.comm));
            t->gen = gen;
        }
#endif
    }

    u64 one = 1, init = 0, *ovf;
    u32 slot;
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
        if (!ecnt) {
            struct error_key okey = {};
            okey.syscall = ekey.syscall;
            okey.err = ekey.err;
            __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
            if (active)
                ecnt = errors_other_1.lookup_or_try_init(&okey, &init);
            else
                ecnt = errors_other_0.lookup_or_try_init(&okey, &init);
            slot = ecnt ? 0 : 1;
            if (active)
                ovf = errors_overflow_1.lookup(&slot);
            else
                ovf = errors_overflow_0.lookup(&slot);
            if (ovf)
                *ovf += 1;
        }
        if (ecnt)
            __sync_fetch_and_add(ecnt, one);
    }

#if LATENCY
    if (!ts) {
        /* No latency sample for this call: count it in counts. */
        count_call(&key, active);
        return 0;
    }
    u64 delta = bpf_ktime_get_ns() - ts;
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
    if (!h) {
        struct latency_key okey = {};
        okey.syscall = lkey.syscall;
        okey.slot = lkey.slot;
        __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
        if (active)
            h = latency_other_1.lookup_or_try_init(&okey, &hinit);
        else
            h = latency_other_0.lookup_or_try_init(&okey, &hinit);
        slot = h ? 0 : 1;
        if (active)
            ovf = latency_overflow_1.lookup(&slot);
        else
            ovf = latency_overflow_0.lookup(&slot);
        if (ovf)
            *ovf += 1;
    }
    if (h) {
        h->count += 1;
        h->sum += delta;
    }
#else
    count_call(&key, active);
#endif
    return 0;
}
