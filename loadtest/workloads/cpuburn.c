/* CPU-bound fixed work for the profile overhead benchmark: ITER rounds of an
 * xorshift/multiply chain over a 4 KiB table (stays in L1, no syscalls).
 * Prints "elapsed_ns=<wall ns> cpu_ns=<thread CPU ns> iter=<ITER> check=<value>".
 * CPU time (CLOCK_THREAD_CPUTIME_ID) leaves out time spent preempted by other
 * processes but includes interrupts taken while this thread runs (this kernel
 * has tick CPU accounting without IRQ time accounting), so it includes the
 * perf-event sample handler and its BPF program. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((noinline)) static uint64_t work(long iter)
{
    static uint64_t table[512];
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (int i = 0; i < 512; i++)
        table[i] = (uint64_t)i * 0x2545F4914F6CDD1DULL;
    for (long i = 0; i < iter; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t *slot = &table[x & 511];
        *slot = *slot * 6364136223846793005ULL + x;
        x += *slot >> 29;
    }
    return x;
}

int main(int argc, char **argv)
{
    long iter = argc > 1 ? atol(argv[1]) : 100000000L;
    if (iter <= 0) {
        fprintf(stderr, "usage: %s ITERATIONS\n", argv[0]);
        return 2;
    }
    long long w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    uint64_t check = work(iter);
    long long w1 = now_ns(CLOCK_MONOTONIC), c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    printf("elapsed_ns=%lld cpu_ns=%lld iter=%ld check=%llu\n", w1 - w0, c1 - c0, iter,
           (unsigned long long)check);
    return 0;
}
