/* TCP connection lifecycle: active and passive opens, closes, lifetimes,
 * resets sent and received, retransmits, and (with RTT=1) smoothed RTT, per
 * service port and remote address. Formatted tracepoints only.
 *
 * The "port" label is the service side of a connection: the remote port of
 * an active open, the local port of a passive one, so ephemeral ports never
 * become labels. */
#include <linux/socket.h>
#include "stratoscope.h"

/* tcp_send_reset carries `enum sk_rst_reason` since 6.10; BCC builds the
 * argument struct from the running kernel's format, so older headers need the
 * enum declared (its values are not used here). */
#if !__has_include(<net/rstreason.h>)
enum sk_rst_reason { STRATO_SK_RST_REASON_UNKNOWN };
#endif

#define STRATO_IPPROTO_TCP 6

#ifndef MAX_SERIES
#define MAX_SERIES 8192
#endif
#ifndef MAX_CONNS
#define MAX_CONNS 65536
#endif

#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_CLOSE 7
#define DIR_UNKNOWN 0
#define DIR_ACTIVE 1
#define DIR_PASSIVE 2

struct conn_key {
    u8 raddr[16];  /* IPv6, or IPv4-mapped IPv6 */
    u16 port;
    u16 family;
    u8 direction;
    u8 pad[3];
};

struct conn_val {
    u64 opens;
    u64 closes;
    u64 resets_sent;
    u64 resets_received;
    u64 retransmits;
};

struct conn_info {
    u64 established_ns;
    struct conn_key key;
};

struct life_key {
    u16 port;
    u8 direction;
    u8 pad;
    u32 slot;
};

/* Connections that could not be tracked (the table of live connections was
 * full), per service port and direction: their closes and lifetimes are not
 * recorded, so opens = closes + untracked + still open, per port. */
struct track_key {
    u16 port;
    u8 direction;
    u8 pad;
};

struct track_val {
    u64 untracked;
};

struct rtt_key {
    u8 raddr[16];
    u16 family;
    u16 pad;
    u32 slot;
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_HASH(conns_0, struct conn_key, struct conn_val, MAX_SERIES);
BPF_HASH(conns_1, struct conn_key, struct conn_val, MAX_SERIES);
BPF_HASH(lifetime_0, struct life_key, struct strato_hist_val, MAX_SERIES);
BPF_HASH(lifetime_1, struct life_key, struct strato_hist_val, MAX_SERIES);
BPF_HASH(srtt_0, struct rtt_key, struct strato_hist_val, MAX_SERIES);
BPF_HASH(srtt_1, struct rtt_key, struct strato_hist_val, MAX_SERIES);
/* Full maps: an update that finds conns or srtt full goes to the map's
 * overflow series in <map>_other_{0,1} (remote address all zero, which the
 * edge labels "other"; port, family, direction and slot kept, so totals per
 * port and direction stay exact) and is counted in <map>_overflow_{0,1}[0]
 * ([1]: lost with the other map full too). Separate maps because a hash map
 * cannot reserve entries for some keys; their keys range over the bounded
 * fields only (srtt: 2 families x 66 slots; lifetime, whose port is blanked:
 * 2 directions x 66 slots). */
#ifndef OTHER_SERIES
#define OTHER_SERIES 16384
#endif
BPF_HASH(conns_other_0, struct conn_key, struct conn_val, OTHER_SERIES);
BPF_HASH(conns_other_1, struct conn_key, struct conn_val, OTHER_SERIES);
BPF_HASH(srtt_other_0, struct rtt_key, struct strato_hist_val, 256);
BPF_HASH(srtt_other_1, struct rtt_key, struct strato_hist_val, 256);
BPF_HASH(lifetime_other_0, struct life_key, struct strato_hist_val, 256);
BPF_HASH(lifetime_other_1, struct life_key, struct strato_hist_val, 256);
BPF_PERCPU_ARRAY(conns_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(conns_overflow_1, u64, 2);
BPF_PERCPU_ARRAY(srtt_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(srtt_overflow_1, u64, 2);
BPF_PERCPU_ARRAY(lifetime_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(lifetime_overflow_1, u64, 2);
BPF_HASH(tracking_0, struct track_key, struct track_val, MAX_SERIES);
BPF_HASH(tracking_1, struct track_key, struct track_val, MAX_SERIES);
BPF_HASH(tracking_other_0, struct track_key, struct track_val, 16);
BPF_HASH(tracking_other_1, struct track_key, struct track_val, 16);
BPF_PERCPU_ARRAY(tracking_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(tracking_overflow_1, u64, 2);
/* Live connections by socket: a plain hash, never evicting one (an LRU would
 * drop a live connection's close and lifetime without a trace). One that finds
 * it full is counted in tracking. A closed connection moves to `closed`, an LRU
 * that only names the direction of an RST sent after the close (tcp_close()
 * with SO_LINGER 0); an evicted one leaves that RST counted, direction unknown. */
BPF_HASH(live, u64, struct conn_info, MAX_CONNS);
BPF_TABLE("lru_hash", u64, struct conn_info, closed, 4096);

static __always_inline u32 active_copy(void)
{
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    return flip ? (*flip & 1) : 0;
}

static __always_inline struct conn_val *conn_counters(struct conn_key *k)
{
    struct conn_val init = {}, *v;
    u32 active = active_copy();
    if (active)
        v = conns_1.lookup_or_try_init(k, &init);
    else
        v = conns_0.lookup_or_try_init(k, &init);
    if (v)
        return v;
    struct conn_key okey = {.port = k->port, .family = k->family, .direction = k->direction};
    if (active)
        v = conns_other_1.lookup_or_try_init(&okey, &init);
    else
        v = conns_other_0.lookup_or_try_init(&okey, &init);
    u32 oslot = v ? 0 : 1;
    u64 *ovf;
    if (active)
        ovf = conns_overflow_1.lookup(&oslot);
    else
        ovf = conns_overflow_0.lookup(&oslot);
    if (ovf)
        __sync_fetch_and_add(ovf, 1);
    return v;
}

static __always_inline void count_untracked(struct conn_key *k)
{
    struct track_key tk = {.port = k->port, .direction = k->direction};
    struct track_val init = {}, *t;
    u32 active = active_copy();
    if (active)
        t = tracking_1.lookup_or_try_init(&tk, &init);
    else
        t = tracking_0.lookup_or_try_init(&tk, &init);
    if (!t) {  /* more ports than MAX_SERIES: under port "other" */
        tk.port = 0;
        if (active)
            t = tracking_other_1.lookup_or_try_init(&tk, &init);
        else
            t = tracking_other_0.lookup_or_try_init(&tk, &init);
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

static __always_inline void set_addr(u8 *dst, u16 family, const u8 *v4, const u8 *v6)
{
    if (family == AF_INET) {
        __builtin_memset(dst, 0, 10);
        dst[10] = 0xff;
        dst[11] = 0xff;
        bpf_probe_read_kernel(dst + 12, 4, v4);
    } else {
        bpf_probe_read_kernel(dst, 16, v6);
    }
}

/* sockaddr_in / sockaddr_in6 as the reset tracepoints carry them (28 bytes). */
static __always_inline void key_from_sockaddr(struct conn_key *k, const u8 *sa, u16 *port)
{
    u8 buf[28] = {};
    bpf_probe_read_kernel(buf, sizeof(buf), sa);
    u16 family = buf[0] | (buf[1] << 8);
    *port = (buf[2] << 8) | buf[3];
    k->family = family;
    if (family == AF_INET)
        set_addr(k->raddr, AF_INET, buf + 4, buf + 4);
    else
        set_addr(k->raddr, AF_INET6, buf + 8, buf + 8);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != STRATO_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int old = args->oldstate, new = args->newstate;

    if (new == ST_ESTABLISHED && (old == ST_SYN_SENT || old == ST_SYN_RECV)) {
        /* Read the ports through a helper: clang may otherwise turn "cond ? a : b"
         * into a load through a selected ctx pointer, which the verifier refuses. */
        u16 sport = 0, dport = 0;
        bpf_probe_read_kernel(&sport, sizeof(sport), &args->sport);
        bpf_probe_read_kernel(&dport, sizeof(dport), &args->dport);
        struct conn_info info = {};
        info.established_ns = bpf_ktime_get_ns();
        info.key.family = args->family;
        info.key.direction = old == ST_SYN_SENT ? DIR_ACTIVE : DIR_PASSIVE;
        info.key.port = old == ST_SYN_SENT ? dport : sport;
        set_addr(info.key.raddr, args->family, args->daddr, args->daddr_v6);
        if (live.update(&sk, &info) != 0)
            count_untracked(&info.key);
        struct conn_val *v = conn_counters(&info.key);
        if (v)
            __sync_fetch_and_add(&v->opens, 1);
        return 0;
    }
    if (new != ST_CLOSE)
        return 0;
    struct conn_info *info = live.lookup(&sk);
    if (!info)
        return 0;  /* never established while we watched, or not tracked (counted) */
    u64 lifetime = bpf_ktime_get_ns() - info->established_ns;
    struct conn_info done = *info;
    struct conn_key key = done.key;
    /* Keep it for an RST sent after the close, as tcp_close() with SO_LINGER 0 does. */
    closed.update(&sk, &done);
    live.delete(&sk);
    struct conn_val *v = conn_counters(&key);
    if (v)
        __sync_fetch_and_add(&v->closes, 1);
    struct life_key lk = {.port = key.port, .direction = key.direction, .slot = strato_slot(lifetime)};
    struct strato_hist_val hinit = {}, *h;
    u32 active = active_copy();
    if (active)
        h = lifetime_1.lookup_or_try_init(&lk, &hinit);
    else
        h = lifetime_0.lookup_or_try_init(&lk, &hinit);
    if (!h) {
        struct life_key okey = {.direction = lk.direction, .slot = lk.slot};
        if (active)
            h = lifetime_other_1.lookup_or_try_init(&okey, &hinit);
        else
            h = lifetime_other_0.lookup_or_try_init(&okey, &hinit);
        u32 oslot = h ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = lifetime_overflow_1.lookup(&oslot);
        else
            ovf = lifetime_overflow_0.lookup(&oslot);
        if (ovf)
            __sync_fetch_and_add(ovf, 1);
    }
    if (h) {
        __sync_fetch_and_add(&h->count, 1);
        __sync_fetch_and_add(&h->sum, lifetime);
    }
    return 0;
}

/* The key of a tracked connection, or one built from the event's own fields. */
static __always_inline void key_for(struct conn_key *k, u64 sk, u16 family, u16 port,
                                    const u8 *v4, const u8 *v6)
{
    struct conn_info *info = sk ? live.lookup(&sk) : 0;
    if (!info && sk)
        info = closed.lookup(&sk);
    if (info) {
        *k = info->key;
        return;
    }
    k->family = family;
    k->port = port;
    set_addr(k->raddr, family, v4, v6);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    struct conn_key key = {};
    key_for(&key, (u64)args->skaddr, args->family, args->dport, args->daddr, args->daddr_v6);
    struct conn_val *v = conn_counters(&key);
    if (v)
        __sync_fetch_and_add(&v->retransmits, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    /* No family/port fields here: the addresses come as sockaddr_in(6). An RST
     * without a tracked socket is labelled with our local port. */
    struct conn_key remote = {}, local = {};
    u16 rport = 0, lport = 0;
    key_from_sockaddr(&remote, args->daddr, &rport);
    key_from_sockaddr(&local, args->saddr, &lport);
    struct conn_key key = {};
    key_for(&key, (u64)args->skaddr, remote.family, lport, remote.raddr + 12, remote.raddr);
    struct conn_val *v = conn_counters(&key);
    if (v)
        __sync_fetch_and_add(&v->resets_sent, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct conn_key key = {};
    key_for(&key, (u64)args->skaddr, args->family, args->sport, args->daddr, args->daddr_v6);
    struct conn_val *v = conn_counters(&key);
    if (v)
        __sync_fetch_and_add(&v->resets_received, 1);
    return 0;
}

#ifndef RTT
#define RTT 0
#endif

#if RTT
/* Opt-in (RTT=1): the only per-segment hook; without it the program runs per
 * connection and per retransmit or reset only. Not compiled, it is not attached. */
TRACEPOINT_PROBE(tcp, tcp_probe)
{
    /* Runs on every segment: the remote address is read straight from the
     * record (sockaddr_in / sockaddr_in6 as 28 bytes), no helper calls. */
    struct rtt_key k = {};
    u16 family = args->family;
    k.family = family;
    if (family == AF_INET) {
        k.raddr[10] = 0xff;
        k.raddr[11] = 0xff;
        __builtin_memcpy(k.raddr + 12, (const u8 *)args->daddr + 4, 4);
    } else {
        __builtin_memcpy(k.raddr, (const u8 *)args->daddr + 8, 16);
    }
    u64 srtt = args->srtt;  /* microseconds */
    k.slot = strato_slot(srtt);
    struct strato_hist_val hinit = {}, *h;
    u32 active = active_copy();
    if (active)
        h = srtt_1.lookup_or_try_init(&k, &hinit);
    else
        h = srtt_0.lookup_or_try_init(&k, &hinit);
    if (!h) {
        struct rtt_key okey = {.family = k.family, .slot = k.slot};
        if (active)
            h = srtt_other_1.lookup_or_try_init(&okey, &hinit);
        else
            h = srtt_other_0.lookup_or_try_init(&okey, &hinit);
        u32 oslot = h ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = srtt_overflow_1.lookup(&oslot);
        else
            ovf = srtt_overflow_0.lookup(&oslot);
        if (ovf)
            __sync_fetch_and_add(ovf, 1);
    }
    if (h) {
        __sync_fetch_and_add(&h->count, 1);
        __sync_fetch_and_add(&h->sum, srtt);
    }
    return 0;
}
#endif
