/* Scheduler: run-queue latency (wakeup or preemption -> switch-in) per cgroup
 * and comm, on-CPU time, voluntary and involuntary context switches.
 *
 * Formatted tracepoints only (their arguments are defined by the kernel's
 * format files, so no struct layout is read). Every update is keyed by the
 * task being switched out, which is `current` (cgroup from the helper, comm
 * from the record): a task's run-queue wait is measured when it is switched in
 * and recorded when it is switched out again, so no map by pid holds comms.
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
/* Wakeup (or preemption) time per pid until the task is switched in; 0 once it
 * has been. A plain hash written in place (an LRU update takes a lock on
 * every wakeup); entries go when the task is freed. A wakeup that finds it
 * full loses that run-queue sample, counted in runq_overflow_{0,1}[1]. */
BPF_HASH(enqueued, u32, u64, MAX_TASKS);

/* Per CPU: when the running task was switched in, and the run-queue wait it
 * had (recorded when it is switched out again, when it is `current` and its
 * comm and cgroup come from the tracepoint and a helper, not a map by pid). */
struct cpu_state {
    u64 since;
    u64 waited;
    u64 pending;
};
BPF_PERCPU_ARRAY(cpu_state, struct cpu_state, 1);

static __always_inline u32 active_copy(void)
{
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    return flip ? (*flip & 1) : 0;
}

static __always_inline void count_lost_runq(void)
{
    u32 lost = 1;
    u64 *ovf = active_copy() ? runq_overflow_1.lookup(&lost) : runq_overflow_0.lookup(&lost);
    if (ovf)
        __sync_fetch_and_add(ovf, 1);
}

static __always_inline void mark_enqueued(u32 pid, u64 now)
{
    u64 *ts = enqueued.lookup(&pid);
    if (ts)
        *ts = now;
    else if (enqueued.update(&pid, &now) != 0)
        count_lost_runq();
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_enqueued(args->pid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_enqueued(args->pid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid, next = args->next_pid, zero = 0;
    u32 active = active_copy();
    struct cpu_state *cs = cpu_state.lookup(&zero);
    if (!cs)
        return 0;

    if (prev != 0) {
        /* prev is current: its cgroup from the helper, its comm from the record. */
        struct task_key pk = {};
        pk.cgroup = bpf_get_current_cgroup_id();
        __builtin_memcpy(pk.comm, args->prev_comm, sizeof(pk.comm));  /* loads from the record */
        int runnable = (args->prev_state & 0xff) == 0;

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
        if (cv) {
            if (cs->since && now > cs->since)
                cv->oncpu_ns += now - cs->since;
            /* Still runnable (state 0, or TASK_REPORT_MAX when preempted): involuntary. */
            if (runnable)
                cv->involuntary += 1;
            else
                cv->voluntary += 1;
        }

        if (cs->pending) {
            u64 delta = cs->waited;
            cs->pending = 0;
            struct runq_key rk = {};
            rk.slot = strato_slot(delta);
            rk.cgroup = pk.cgroup;
            __builtin_memcpy(rk.comm, pk.comm, sizeof(rk.comm));
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
        }
        if (runnable)
            mark_enqueued(prev, now);
    }
    cs->since = now;
    cs->pending = 0;

    if (next == 0)
        return 0;
    u64 *tsp = enqueued.lookup(&next);
    if (tsp && *tsp) {
        cs->waited = now > *tsp ? now - *tsp : 0;
        cs->pending = 1;
        *tsp = 0;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_free)
{
    u32 pid = args->pid;
    enqueued.delete(&pid);
    return 0;
}
