/* Scheduler: run-queue latency (wakeup or preemption -> switch-in) per cgroup
 * and comm, on-CPU time, voluntary and involuntary context switches.
 *
 * Every update is keyed by the task being switched out, which is `current`:
 * a task's run-queue wait is measured when it is switched in and recorded
 * when it is switched out again, so no map by task holds comms or cgroups.
 *
 * Two builds (RAW), neither reading a struct layout:
 * - RAW=1 (the default): raw tracepoints. They skip the record the kernel
 *   fills before a formatted tracepoint's program runs, and its perf dispatch
 *   (docs/BENCHMARKS.md, "Scheduler cost"). Arguments are the tracepoints'
 *   TP_PROTO: sched_switch(bool preempt, prev, next, unsigned int prev_state)
 *   in its four-argument form (kernel 5.18+; an older kernel refuses the
 *   attach, since the program reads args[3]) and sched_wakeup(p). Tasks are
 *   told apart by their task_struct address. The switched-out task's comm and
 *   cgroup come from a per-CPU copy (cpu_state.slot, below) or, when that is
 *   missing or stale, from the helpers.
 * - RAW=0, the fallback (sched.yaml): formatted tracepoints, comm and pids
 *   from the record, cgroup from the helper on every switch.
 *
 * Run-queue wait. A task becomes runnable by a wakeup (sched_wakeup, in the
 * waker's context) or by staying runnable when switched out (preempted); the
 * time goes to `enqueued`, a hash by task. Switching the task in reads and
 * clears it into the CPU's state; switching the task out again (it is
 * `current` then) records switch-in time minus that time under its key.
 *
 * Full maps: an update that finds its map full (lookup_or_try_init returns
 * NULL) goes to the map's overflow series in <map>_other_{0,1} instead: comm
 * "other", cgroup 0, the latency slot kept. Those keys range over the bounded
 * fields only (one key for cpu, at most 66 slots for runq), so the small
 * separate map always has room; each diverted update is counted in
 * <map>_overflow_{0,1}[0] ([1] would count updates lost with the other map
 * full too). See syscalls.c for why a separate map rather than a reserve. */
#include "stratoscope.h"

#ifndef RAW
#define RAW 1
#endif
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

/* A task: its task_struct pointer (RAW=1) or its pid (RAW=0). */
#if RAW
typedef u64 task_id;
#else
typedef u32 task_id;
#endif
/* Time a task was woken or preempted, until it is switched in; 0 once it has
 * been. A plain hash written in place (an LRU update takes a lock on every
 * wakeup); entries go when the task is freed. A wakeup or preemption that
 * finds it full loses that run-queue sample, counted in runq_overflow_{0,1}[1]. */
BPF_HASH(enqueued, task_id, u64, MAX_TASKS);

#if RAW
/* The comm and cgroup of tasks switched out on a CPU, direct-mapped by the
 * task's address (ident_slot()): the switched-out task's key is then a copy
 * from one slot instead of two helper calls (the comm's ~75 ns and the
 * cgroup's ~45 ns in sched_switch). A copy is valid while its epoch equals
 * ident_epoch[slot], which is bumped when a task of that slot is renamed or
 * freed (a freed task's address comes back as another task), and for every
 * slot when a task moves cgroup (a process's threads move with it, unnamed
 * here). A task has the same slot on every CPU, so one bump reaches all its
 * copies. */
#define IDENT_SLOTS 128
struct ident_slot {
    u64 task;
    u64 cgroup;
    char comm[16];
    u32 epoch;
    u32 pad;
};
BPF_ARRAY(ident_epoch, u32, IDENT_SLOTS);
#endif

/* Per CPU, about the task running on it: when it was switched in, and the
 * `enqueued` time read then (0: none). RAW=1 also keeps the CPU's idle task
 * (learned the first time it is switched out: switches to and from idle skip
 * the copies and the `enqueued` lookup) and the copies of comm and cgroup. */
struct cpu_state {
    u64 since;
    u64 queued;
#if RAW
    u64 idle;
    struct ident_slot slot[IDENT_SLOTS];
#endif
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

static __always_inline void mark_enqueued(task_id task, u64 now)
{
    u64 *ts = enqueued.lookup(&task);
    if (ts)
        *ts = now;
    else if (enqueued.update(&task, &now) != 0)
        count_lost_runq();
}

/* The switched-out task's on-CPU slice and its switch, under its key. */
static __always_inline void count_switch(struct task_key *pk, u64 oncpu, int runnable,
                                         u32 active)
{
    struct cpu_val init = {}, *cv;
    if (active)
        cv = cpu_1.lookup_or_try_init(pk, &init);
    else
        cv = cpu_0.lookup_or_try_init(pk, &init);
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
        cv->oncpu_ns += oncpu;
        /* Still runnable (preempted, or yielded while running): involuntary. */
        if (runnable)
            cv->involuntary += 1;
        else
            cv->voluntary += 1;
    }
}

/* One run-queue wait of the switched-out task, under its key. */
static __always_inline void record_wait(struct task_key *pk, u64 delta, u32 active)
{
    struct runq_key rk = {};
    rk.slot = strato_slot(delta);
    rk.cgroup = pk->cgroup;
    __builtin_memcpy(rk.comm, pk->comm, sizeof(rk.comm));
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

/* The task switched in: its switch-in time, and the time it became runnable. */
static __always_inline void switch_in(struct cpu_state *cs, task_id next, u64 now)
{
    cs->since = now;
    cs->queued = 0;
    u64 *tsp = enqueued.lookup(&next);
    if (tsp && *tsp) {
        cs->queued = *tsp;
        *tsp = 0;
    }
}

#if RAW
static __always_inline u32 ident_slot(u64 task)
{
    /* Fibonacci hashing of the address, at cache-line granularity. */
    return (u32)(((task >> 6) * 0x9E3779B97F4A7C15ULL) >> 57) & (IDENT_SLOTS - 1);
}

static __always_inline u32 slot_epoch(u32 slot)
{
    u32 *e = ident_epoch.lookup(&slot);
    return e ? *e : 0;
}

static __always_inline void bump_epoch(u32 slot)
{
    u32 *e = ident_epoch.lookup(&slot);
    if (e)
        __sync_fetch_and_add(e, 1);
}

RAW_TRACEPOINT_PROBE(task_rename)
{
    /* TP_PROTO(struct task_struct *task, const char *comm), fired before the copy. */
    u64 task = ctx->args[0];
    u32 n = ident_slot(task), zero = 0;
    bump_epoch(n);
    if (task != bpf_get_current_task())
        return 0;
    /* The current task: its copy here takes the new name at once, in case it is
     * switched out before the kernel copies the name. */
    struct cpu_state *cs = cpu_state.lookup(&zero);
    if (!cs)
        return 0;
    struct ident_slot *s = &cs->slot[n];
    s->task = task;
    s->epoch = slot_epoch(n);
    s->cgroup = bpf_get_current_cgroup_id();
    __builtin_memset(s->comm, 0, sizeof(s->comm));
    bpf_probe_read_kernel_str(s->comm, sizeof(s->comm), (const char *)ctx->args[1]);
    return 0;
}

RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
#pragma unroll
    for (u32 i = 0; i < IDENT_SLOTS; i++)
        bump_epoch(i);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup)
{
    /* TP_PROTO(struct task_struct *p) */
    mark_enqueued(ctx->args[0], bpf_ktime_get_ns());
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup_new)
{
    mark_enqueued(ctx->args[0], bpf_ktime_get_ns());
    return 0;
}

/* prev's (current's) comm and cgroup: this CPU's copy, else the helpers (and
 * the copy renewed). 0 when prev is this CPU's idle task. */
static __always_inline int prev_ident(struct task_key *pk, u64 prev, struct cpu_state *cs)
{
    u32 n = ident_slot(prev), epoch = slot_epoch(n);
    struct ident_slot *s = &cs->slot[n];
    if (s->task == prev && s->epoch == epoch) {
        pk->cgroup = s->cgroup;
        __builtin_memcpy(pk->comm, s->comm, sizeof(pk->comm));
        return 1;
    }
    if (bpf_get_current_pid_tgid() == 0) {
        cs->idle = prev;  /* pid 0: this CPU's idle task */
        return 0;
    }
    pk->cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&pk->comm, sizeof(pk->comm));
    s->task = prev;
    s->epoch = epoch;
    s->cgroup = pk->cgroup;
    __builtin_memcpy(s->comm, pk->comm, sizeof(s->comm));
    return 1;
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
     *          unsigned int prev_state); prev is current. */
    u64 now = bpf_ktime_get_ns();
    u64 prev = ctx->args[1], next = ctx->args[2];
    u32 zero = 0;
    struct cpu_state *cs = cpu_state.lookup(&zero);
    if (!cs)
        return 0;

    struct task_key pk = {};
    if (prev != cs->idle && prev_ident(&pk, prev, cs)) {
        /* Stays on the run queue: preempted, or switched while TASK_RUNNING. */
        int runnable = (u8)ctx->args[0] || (u32)ctx->args[3] == 0;
        u32 active = active_copy();
        u64 since = cs->since;
        count_switch(&pk, since && now > since ? now - since : 0, runnable, active);
        if (cs->queued && since)
            record_wait(&pk, since > cs->queued ? since - cs->queued : 0, active);
        if (runnable)
            mark_enqueued(prev, now);
    }

    if (next == cs->idle) {
        cs->since = now;
        cs->queued = 0;
    } else {
        switch_in(cs, next, now);
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_free)
{
    /* TP_PROTO(struct task_struct *p); its address may come back as another task. */
    task_id task = ctx->args[0];
    enqueued.delete(&task);
    bump_epoch(ident_slot(task));
    return 0;
}

#else /* formatted tracepoints */

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
    struct cpu_state *cs = cpu_state.lookup(&zero);
    if (!cs)
        return 0;

    if (prev != 0) {
        /* prev is current: its cgroup from the helper, its comm from the record. */
        struct task_key pk = {};
        pk.cgroup = bpf_get_current_cgroup_id();
        __builtin_memcpy(pk.comm, args->prev_comm, sizeof(pk.comm));  /* loads from the record */
        /* Still runnable (state 0, or TASK_REPORT_MAX when preempted). */
        int runnable = (args->prev_state & 0xff) == 0;
        u32 active = active_copy();
        u64 since = cs->since;
        count_switch(&pk, since && now > since ? now - since : 0, runnable, active);
        if (cs->queued && since)
            record_wait(&pk, since > cs->queued ? since - cs->queued : 0, active);
        if (runnable)
            mark_enqueued(prev, now);
    }
    if (next == 0) {
        cs->since = now;
        cs->queued = 0;
        return 0;
    }
    switch_in(cs, next, now);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_free)
{
    task_id task = args->pid;
    enqueued.delete(&task);
    return 0;
}
#endif
