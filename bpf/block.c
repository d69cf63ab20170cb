/* Block I/O: latency from issue to completion, operations and bytes, per
 * device and operation. Formatted tracepoints; dev is the kernel dev_t. */
#include "stratoscope.h"

#ifndef MAX_SERIES
#define MAX_SERIES 4096
#endif
#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384
#endif

enum { OP_OTHER = 0, OP_READ = 1, OP_WRITE = 2, OP_DISCARD = 3, OP_FLUSH = 4 };

struct rq_key {
    u64 sector;
    u32 dev;
    u32 pad;
};

struct rq_start {
    u64 ts;
    u64 bytes;
};

struct io_key {
    u32 dev;
    u32 op;
};

struct io_val {
    u64 ops;
    u64 bytes;
    u64 errors;
};

struct lat_key {
    u32 dev;
    u32 op;
    u32 slot;
    u32 pad;
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_HASH(io_0, struct io_key, struct io_val, MAX_SERIES);
BPF_HASH(io_1, struct io_key, struct io_val, MAX_SERIES);
BPF_HASH(latency_0, struct lat_key, struct strato_hist_val, MAX_SERIES);
BPF_HASH(latency_1, struct lat_key, struct strato_hist_val, MAX_SERIES);
/* Full maps: an update that finds io or latency full goes to the map's
 * overflow series in <map>_other_{0,1} (device 0, which the edge labels
 * "other"; op and slot kept, so totals per operation stay exact) and is
 * counted in <map>_overflow_{0,1}[0] ([1]: lost with the other map full too).
 * Separate maps because a hash map cannot reserve entries for some keys; their
 * keys range over 5 ops x 66 slots, so 512 entries have room. */
BPF_HASH(io_other_0, struct io_key, struct io_val, 512);
BPF_HASH(io_other_1, struct io_key, struct io_val, 512);
BPF_HASH(latency_other_0, struct lat_key, struct strato_hist_val, 512);
BPF_HASH(latency_other_1, struct lat_key, struct strato_hist_val, 512);
BPF_PERCPU_ARRAY(io_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(io_overflow_1, u64, 2);
BPF_PERCPU_ARRAY(latency_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(latency_overflow_1, u64, 2);
/* Requests between issue and completion: a plain hash, never evicting one (an
 * LRU would drop an in-flight request's completion without a trace). A request
 * issued while it is full is counted in tracking_{0,1} per device and op (the
 * device "other" past MAX_SERIES), and its completion is not recorded. The
 * first completion of a request deletes its entry (a partial completion's
 * later calls carry an advanced sector and find none). */
BPF_HASH(inflight, struct rq_key, struct rq_start, MAX_INFLIGHT);
struct track_val {
    u64 untracked;
};
BPF_HASH(tracking_0, struct io_key, struct track_val, MAX_SERIES);
BPF_HASH(tracking_1, struct io_key, struct track_val, MAX_SERIES);
BPF_HASH(tracking_other_0, struct io_key, struct track_val, 16);
BPF_HASH(tracking_other_1, struct io_key, struct track_val, 16);
BPF_PERCPU_ARRAY(tracking_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(tracking_overflow_1, u64, 2);

/* rwbs is e.g. "W", "WS", "FWS", "R", "RA", "D", "F", "N". */
static __always_inline u32 op_of(const char *rwbs)
{
    u32 op = OP_OTHER;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        char c = rwbs[i];
        if (c == 'W') return OP_WRITE;
        if (c == 'R') return OP_READ;
        if (c == 'D') return OP_DISCARD;
        if (c == 'F') op = OP_FLUSH;
        if (c == 0) break;
    }
    return op;
}

static __always_inline void count_untracked(u32 dev, u32 op)
{
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;
    struct io_key k = {.dev = dev, .op = op};
    struct track_val init = {}, *t;
    if (active)
        t = tracking_1.lookup_or_try_init(&k, &init);
    else
        t = tracking_0.lookup_or_try_init(&k, &init);
    if (!t) {
        k.dev = 0;
        if (active)
            t = tracking_other_1.lookup_or_try_init(&k, &init);
        else
            t = tracking_other_0.lookup_or_try_init(&k, &init);
        u32 oslot = t ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = tracking_overflow_1.lookup(&oslot);
        else
            ovf = tracking_overflow_0.lookup(&oslot);
        if (ovf)
            __sync_fetch_and_add(ovf, 1);
    }
    if (t)
        __sync_fetch_and_add(&t->untracked, 1);
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct rq_key k = {.sector = args->sector, .dev = args->dev};
    struct rq_start s = {.ts = bpf_ktime_get_ns(), .bytes = args->bytes};
    if (inflight.update(&k, &s) != 0) {
        char rwbs[4] = {};
        bpf_probe_read_kernel(&rwbs, sizeof(rwbs), args->rwbs);
        count_untracked(k.dev, op_of(rwbs));
    }
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct rq_key k = {.sector = args->sector, .dev = args->dev};
    struct rq_start *s = inflight.lookup(&k);
    if (!s)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->ts;
    u64 bytes = s->bytes;
    inflight.delete(&k);

    char rwbs[4] = {};
    bpf_probe_read_kernel(&rwbs, sizeof(rwbs), args->rwbs);
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;

    struct io_key ik = {.dev = args->dev, .op = op_of(rwbs)};
    struct io_val vinit = {}, *v;
    if (active)
        v = io_1.lookup_or_try_init(&ik, &vinit);
    else
        v = io_0.lookup_or_try_init(&ik, &vinit);
    u32 oslot;
    u64 *ovf;
    if (!v) {
        struct io_key okey = {.op = ik.op};
        if (active)
            v = io_other_1.lookup_or_try_init(&okey, &vinit);
        else
            v = io_other_0.lookup_or_try_init(&okey, &vinit);
        oslot = v ? 0 : 1;
        if (active)
            ovf = io_overflow_1.lookup(&oslot);
        else
            ovf = io_overflow_0.lookup(&oslot);
        if (ovf)
            __sync_fetch_and_add(ovf, 1);
    }
    if (v) {
        __sync_fetch_and_add(&v->ops, 1);
        __sync_fetch_and_add(&v->bytes, bytes);
        if (args->error)
            __sync_fetch_and_add(&v->errors, 1);
    }

    struct lat_key lk = {.dev = ik.dev, .op = ik.op, .slot = strato_slot(delta)};
    struct strato_hist_val hinit = {}, *h;
    if (active)
        h = latency_1.lookup_or_try_init(&lk, &hinit);
    else
        h = latency_0.lookup_or_try_init(&lk, &hinit);
    if (!h) {
        struct lat_key okey = {.op = lk.op, .slot = lk.slot};
        if (active)
            h = latency_other_1.lookup_or_try_init(&okey, &hinit);
        else
            h = latency_other_0.lookup_or_try_init(&okey, &hinit);
        oslot = h ? 0 : 1;
        if (active)
            ovf = latency_overflow_1.lookup(&oslot);
        else
            ovf = latency_overflow_0.lookup(&oslot);
        if (ovf)
            __sync_fetch_and_add(ovf, 1);
    }
    if (h) {
        __sync_fetch_and_add(&h->count, 1);
        __sync_fetch_and_add(&h->sum, delta);
    }
    return 0;
}
