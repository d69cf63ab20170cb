/* Process lifecycle: exec, exit (with exit code), fork and OOM kills, counted
 * exactly in a map and reported one by one through a ring buffer that is
 * rate-limited per CPU (drops are counted, never silent).
 *
 * The exit code comes from exit_group()'s argument; a process that dies
 * without calling it (killed by a signal) reports code -1. */
#include "stratoscope.h"

#ifndef MAX_SERIES
#define MAX_SERIES 4096
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 65536
#endif
#ifndef EVENTS_PER_SEC
#define EVENTS_PER_SEC 2000
#endif
#ifndef RING_PAGES
#define RING_PAGES 64
#endif

#define KIND_EXEC 1
#define KIND_EXIT 2
#define KIND_FORK 3
#define KIND_OOM 4

struct event {
    u64 time_ns;
    u64 cgroup;
    s64 code;
    u32 kind;
    u32 pid;
    u32 ppid;
    char comm[16];
    char detail[128];
};

struct count_key {
    u32 kind;
    s32 code;
    u64 cgroup;
    char comm[16];
};

struct bucket {
    u64 last_ns;
    u64 tokens;
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_HASH(counts_0, struct count_key, u64, MAX_SERIES);
BPF_HASH(counts_1, struct count_key, u64, MAX_SERIES);
/* Full counts map: an increment that finds no room goes to the overflow
 * series in counts_other_{0,1} (comm "other", cgroup 0; kind and exit code
 * kept, so totals per event kind stay exact) and is counted in
 * counts_overflow_{0,1}[0] ([1]: lost with the other map full too). Its keys
 * range over kind x exit code only (4 x ~300), so 2048 entries have room. A
 * separate map because a hash map cannot reserve entries for some keys. */
BPF_HASH(counts_other_0, struct count_key, u64, 2048);
BPF_HASH(counts_other_1, struct count_key, u64, 2048);
BPF_PERCPU_ARRAY(counts_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(counts_overflow_1, u64, 2);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_PERCPU_ARRAY(lost, u64, 1);
BPF_PERCPU_ARRAY(rate, struct bucket, 1);
/* Exit codes live from exit_group() to the exit (an LRU: nothing else deletes
 * one whose process leader exited first; it would take MAX_TASKS processes
 * inside exit_group() at once to evict a live one). */
BPF_TABLE("lru_hash", u32, s64, exit_codes, MAX_TASKS);
/* Parents of the tasks forked since the program attached, by pid: a plain hash
 * (an LRU would evict a live task's parent without a trace), every entry
 * deleted when its task exits. A fork that finds it full is counted in
 * tracking_{0,1}; that task's events show ppid 0. */
BPF_HASH(parents, u32, u32, MAX_TASKS);
struct track_key {
    u32 table;
};
BPF_HASH(tracking_0, struct track_key, u64, 4);
BPF_HASH(tracking_1, struct track_key, u64, 4);

static __always_inline void count_untracked_task(void)
{
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    struct track_key k = {.table = 1};
    u64 init = 0, *v;
    if (flip && (*flip & 1))
        v = tracking_1.lookup_or_try_init(&k, &init);
    else
        v = tracking_0.lookup_or_try_init(&k, &init);
    if (v)  /* one key in a map of 4: always room */
        __sync_fetch_and_add(v, 1);
}

static __always_inline void count(u32 kind, s32 code)
{
    struct count_key k = {.kind = kind, .code = code};
    k.cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&k.comm, sizeof(k.comm));
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;
    u64 init = 0, *v;
    if (active)
        v = counts_1.lookup_or_try_init(&k, &init);
    else
        v = counts_0.lookup_or_try_init(&k, &init);
    if (!v) {
        struct count_key okey = {.kind = kind, .code = code};
        __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
        if (active)
            v = counts_other_1.lookup_or_try_init(&okey, &init);
        else
            v = counts_other_0.lookup_or_try_init(&okey, &init);
        u32 oslot = v ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = counts_overflow_1.lookup(&oslot);
        else
            ovf = counts_overflow_0.lookup(&oslot);
        if (ovf)
            *ovf += 1;
    }
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* Token bucket per CPU: EVENTS_PER_SEC refill, burst of one second. */
static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    struct bucket *b = rate.lookup(&zero);
    if (!b)
        return 0;
    u64 elapsed = now - b->last_ns;
    if (b->last_ns == 0 || elapsed > 1000000000ULL) {
        b->tokens = EVENTS_PER_SEC;
        b->last_ns = now;
    } else {
        u64 refill = elapsed * EVENTS_PER_SEC / 1000000000ULL;
        if (refill) {
            b->tokens += refill;
            if (b->tokens > EVENTS_PER_SEC)
                b->tokens = EVENTS_PER_SEC;
            b->last_ns = now;
        }
    }
    if (b->tokens == 0)
        return 0;
    b->tokens -= 1;
    return 1;
}

static __always_inline struct event *reserve(u32 kind, u32 pid)
{
    u64 now = bpf_ktime_get_ns();
    u32 zero = 0;
    struct event *e = 0;
    if (take_token(now))
        e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        u64 *l = lost.lookup(&zero);
        if (l)
            *l += 1;
        return 0;
    }
    e->time_ns = now;
    e->kind = kind;
    e->pid = pid;
    e->cgroup = bpf_get_current_cgroup_id();
    e->code = 0;
    e->detail[0] = 0;
    u32 *pp = parents.lookup(&pid);
    e->ppid = pp ? *pp : 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = args->pid;
    count(KIND_EXEC, 0);
    struct event *e = reserve(KIND_EXEC, pid);
    if (!e)
        return 0;
    TP_DATA_LOC_READ_STR(&e->detail, filename, sizeof(e->detail));
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 child = args->child_pid, parent = args->parent_pid;
    if (parents.update(&child, &parent) != 0)
        count_untracked_task();
    count(KIND_FORK, 0);
    struct event *e = reserve(KIND_FORK, child);
    if (!e)
        return 0;
    e->ppid = parent;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    s64 code = args->error_code & 0xff;
    exit_codes.update(&tgid, &code);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid) {  /* a thread, not the process */
        u32 tid = (u32)id;
        parents.delete(&tid);
        return 0;
    }
    s64 code = -1;
    s64 *cp = exit_codes.lookup(&tgid);
    if (cp) {
        code = *cp;
        exit_codes.delete(&tgid);
    }
    count(KIND_EXIT, (s32)code);
    struct event *e = reserve(KIND_EXIT, tgid);
    parents.delete(&tgid);
    if (!e)
        return 0;
    e->code = code;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(oom, mark_victim)
{
    u32 pid = args->pid;
    count(KIND_OOM, 0);
    struct event *e = reserve(KIND_OOM, pid);
    if (!e)
        return 0;
    events.ringbuf_submit(e, 0);
    return 0;
}
