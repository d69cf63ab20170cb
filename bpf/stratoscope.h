/* Shared helpers for Stratoscope BPF programs: pure functions only (no maps),
 * because BCC rewrites map calls in the main file alone. */
#ifndef STRATOSCOPE_H
#define STRATOSCOPE_H

/* floor(log2(v)) for v >= 1, branch-free so the verifier sees no loop. */
static __always_inline u32 strato_log2(u64 v)
{
    u32 r, shift;
    r = (v > 0xFFFFFFFFULL) << 5; v >>= r;
    shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
    shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
    shift = (v > 0xF) << 2; v >>= shift; r |= shift;
    shift = (v > 0x3) << 1; v >>= shift; r |= shift;
    r |= (u32)(v >> 1);
    return r;
}

/* Histogram slot for OpenTelemetry exponential buckets at scale 0, which are
 * upper-inclusive: index i counts 2^i < v <= 2^(i+1). The slot is index + 2 so
 * it stays unsigned: slot 0 is the zero bucket, slot 1 is index -1 (v == 1),
 * slot k >= 2 is index k - 2 = floor(log2(v - 1)). */
static __always_inline u32 strato_slot(u64 v)
{
    if (v == 0)
        return 0;
    if (v == 1)
        return 1;
    return strato_log2(v - 1) + 2;
}

/* Comm of a map's overflow series (the series an increment goes to when its
 * own map is full); the edge relabels every unbounded field of it "other". */
#define OTHER_COMM "other"

/* Value of a histogram map: count and sum of the samples in one bucket. */
struct strato_hist_val {
    u64 count;
    u64 sum;
};

#endif
