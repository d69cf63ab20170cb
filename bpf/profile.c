/* CPU profile: a perf-event CPU clock at SAMPLE_HZ per CPU; each sample counts
 * (process, cgroup, comm, kernel stack, user stack). Stacks are symbolized at
 * the edge. The stack tables flip together with the counts so a stack id is
 * never reused while a count still refers to it. */
#include <uapi/linux/bpf_perf_event.h>
#include "stratoscope.h"

#ifndef MAX_SERIES
#define MAX_SERIES 16384
#endif
#ifndef MAX_STACKS
#define MAX_STACKS 16384
#endif
#ifndef SAMPLE_HZ
#define SAMPLE_HZ 19
#endif

struct sample_key {
    u32 pid;
    s32 kstack;
    s32 ustack;
    u32 pad;
    u64 cgroup;
    char comm[16];
};

BPF_ARRAY(flip_ctl, u32, 1);
BPF_HASH(samples_0, struct sample_key, u64, MAX_SERIES);
BPF_HASH(samples_1, struct sample_key, u64, MAX_SERIES);
/* Full samples map: a sample that finds no room goes to the overflow series
 * in samples_other_{0,1}: pid 0, comm "other", cgroup 0, no user stack (user
 * stacks mean nothing without their process) but the kernel stack kept, and is
 * counted in samples_overflow_{0,1}[0] ([1]: lost with the other map full too).
 * Its keys are kernel stack ids, fewer than MAX_STACKS plus a few negative
 * errors, so MAX_STACKS + 64 entries always have room. A separate map because
 * a hash map cannot reserve entries for some keys. */
BPF_HASH(samples_other_0, struct sample_key, u64, MAX_STACKS + 64);
BPF_HASH(samples_other_1, struct sample_key, u64, MAX_STACKS + 64);
BPF_PERCPU_ARRAY(samples_overflow_0, u64, 2);
BPF_PERCPU_ARRAY(samples_overflow_1, u64, 2);
BPF_STACK_TRACE(stacks_0, MAX_STACKS);
BPF_STACK_TRACE(stacks_1, MAX_STACKS);

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid == 0)
        return 0;  /* idle */
    u32 zero = 0;
    u32 *flip = flip_ctl.lookup(&zero);
    u32 active = flip ? (*flip & 1) : 0;

    struct sample_key k = {.pid = pid};
    k.cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&k.comm, sizeof(k.comm));
    u64 init = 0, *v;
    if (active) {
        k.kstack = stacks_1.get_stackid(ctx, 0);
        k.ustack = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        v = samples_1.lookup_or_try_init(&k, &init);
    } else {
        k.kstack = stacks_0.get_stackid(ctx, 0);
        k.ustack = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        v = samples_0.lookup_or_try_init(&k, &init);
    }
    if (!v) {
        struct sample_key okey = {.kstack = k.kstack, .ustack = -1};
        __builtin_memcpy(okey.comm, OTHER_COMM, sizeof(OTHER_COMM));
        if (active)
            v = samples_other_1.lookup_or_try_init(&okey, &init);
        else
            v = samples_other_0.lookup_or_try_init(&okey, &init);
        u32 oslot = v ? 0 : 1;
        u64 *ovf;
        if (active)
            ovf = samples_overflow_1.lookup(&oslot);
        else
            ovf = samples_overflow_0.lookup(&oslot);
        if (ovf)
            *ovf += 1;
    }
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
