/* Scheduler: run-queue latency (wakeup or preemption -> switch-in) per cgroup
 * and comm, on-CPU time, voluntary and involuntary context switches.
 *
 * Formatted tracepoints only (their arguments are defined by the kernel's
 * format files, so no struct layout is read). The cgroup and comm of a task
 * are learned when it is switched out (it is `current` then) or forked, and
 * used when it is switched back in.
 *
 * Full maps: an update that finds its map full (lookup_or_try_init returns
 * NULL) goes to the map's overflow series in <map>_other_{0,1} instead: comm
 * "other", cgroup 0, the latency slot kept. Those keys range over the bounded
 * fields only (one key for cpu, at most 66 slots for runq), so the small
 * separate map always has room; each diverted update is counted in
 * <map>_overflow_{0,1}[0] ([1] would count updates lost with the other map
 * full too). See syscalls.c for why a separate map rather than a reserve. */
#include "stratoscope.h"

#ifndef MAX_SERIES
#define MAX_SERIES 10240
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 65536
#endif

struct task_key {
    u64 cgroup;
    char comm[16];  /* 8-byte aligned: compared as two words */
};

struct runq_key {
    u32 slot;
    u32 pad;
    u64 cgroup;
    char comm[16];
};

struct cpu_val {
    u64 oncpu_ns;
    u64 voluntary;
    u64 involuntary;
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_PERCPU_HASH(runq_0, struct runq_key, struct strato_hist_val, MAX_SERIES);
BPF_PERCPU_HASH(runq_1, struct runq_key, struct strato_hist_val, MAX_SERIES);
BPF_PERCPU_HASH(cpu_0, struct task_key, struct cpu_val, MAX_SERIES);
BPF_PERCPU_HASH(cpu_1, struct task_key, struct cpu_val, MAX_SERIES);
/* Other keys: cpu has one, runq one per slot (<= 66): 128 always has room. */
BPF_PERCPU_HASH(runq_other_0, struct runq_key, struct strato_hist_val, 128);
BPF_PERCPU_HASH(runq_other_1, struct runq_key, struct strato_hist_val, 128);
BPF_PERCPU_HASH(cpu_other_0, struct task_key, struct cpu_val, 128);
BPF_PERCPU_HASH(cpu_other_1, struct task_key, struct cpu_val, 128);
/* [0]: updates moved to the other series; [1]: lost (other map full too). */
BPF_PERCPU_ARRAY(runq_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(runq_overflow_1, u64, 2);
BPF_PERCPU_ARRAY(cpu_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(cpu_overflow_1, u64, 2);
BPF_TABLE("lru_hash", u32, struct task_key, task_info, MAX_TASKS);
BPF_TABLE("lru_hash", u32, u64, enqueued, MAX_TASKS);
BPF_PERCPU_ARRAY(switched_in, u64, 1);

static __always_inline u32 active_copy(void)
{
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    return flip ? (*flip & 1) : 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    u32 pid = args->pid;
    u64 now = bpf_ktime_get_ns();
    enqueued.update(&pid, &now);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    u32 pid = args->pid;
    u64 now = bpf_ktime_get_ns();
    struct task_key info = {};
    info.cgroup = bpf_get_current_cgroup_id();  /* the parent's: a child starts there */
    bpf_probe_read_kernel(&info.comm, sizeof(info.comm), args->comm);
    task_info.update(&pid, &info);
    enqueued.update(&pid, &now);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid, next = args->next_pid, zero = 0;
    u32 active = active_copy();

    if (prev != 0) {
        struct task_key pk = {};
        pk.cgroup = bpf_get_current_cgroup_id();
        bpf_probe_read_kernel(&pk.comm, sizeof(pk.comm), args->prev_comm);
        /* Write only when it changed (exec, cgroup move): most switches find it equal. */
        struct task_key *known = task_info.lookup(&prev);
        u64 *was = known ? (u64 *)known->comm : 0, *now_comm = (u64 *)pk.comm;
        if (!was || known->cgroup != pk.cgroup || was[0] != now_comm[0] || was[1] != now_comm[1])
            task_info.update(&prev, &pk);

        struct cpu_val init = {}, *cv;
        if (active)
            cv = cpu_1.lookup_or_try_init(&pk, &init);
        else
            cv = cpu_0.lookup_or_try_init(&pk, &init);
        if (!cv) {
            struct task_key okey = {};
            __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
            if (active)
                cv = cpu_other_1.lookup_or_try_init(&okey, &init);
            else
                cv = cpu_other_0.lookup_or_try_init(&okey, &init);
            u32 oslot = cv ? 0 : 1;
            u64 *ovf;
            if (active)
                ovf = cpu_overflow_1.lookup(&oslot);
            else
                ovf = cpu_overflow_0.lookup(&oslot);
            if (ovf)
                *ovf += 1;
        }
        u64 *since = switched_in.lookup(&zero);
        if (cv) {
            if (since && *since && now > *since)
                cv->oncpu_ns += now - *since;
            /* Still runnable (state 0, or TASK_REPORT_MAX when preempted): involuntary. */
            if ((args->prev_state & 0xff) == 0)
                cv->involuntary += 1;
            else
                cv->voluntary += 1;
        }
        if ((args->prev_state & 0xff) == 0)
            enqueued.update(&prev, &now);
    }

    u64 *since = switched_in.lookup(&zero);
    if (since)
        *since = now;

    if (next == 0)
        return 0;
    u64 *tsp = enqueued.lookup(&next);
    if (!tsp)
        return 0;
    u64 delta = now - *tsp;
    enqueued.delete(&next);

    struct runq_key rk = {};
    struct task_key *info = task_info.lookup(&next);
    if (info) {
        rk.cgroup = info->cgroup;
        __builtin_memcpy(rk.comm, info->comm, sizeof(rk.comm));
    } else {
        bpf_probe_read_kernel(&rk.comm, sizeof(rk.comm), args->next_comm);
    }
    rk.slot = strato_slot(delta);
    struct strato_hist_val hinit = {}, *h;
    if (active)
        h = runq_1.lookup_or_try_init(&rk, &hinit);
    else
        h = runq_0.lookup_or_try_init(&rk, &hinit);
    if (!h) {
        struct runq_key okey = {};
        okey.slot = rk.slot;
        __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
        if (active)
            h = runq_other_1.lookup_or_try_init(&okey, &hinit);
        else
            h = runq_other_0.lookup_or_try_init(&okey, &hinit);
        u32 oslot = h ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = runq_overflow_1.lookup(&oslot);
        else
            ovf = runq_overflow_0.lookup(&oslot);
        if (ovf)
            *ovf += 1;
    }
    if (h) {
        h->count += 1;
        h->sum += delta;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_free)
{
    u32 pid = args->pid;
    task_info.delete(&pid);
    enqueued.delete(&pid);
    return 0;
}
