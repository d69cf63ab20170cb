/* Context-switch workload for the scheduler benchmark: PROCS processes in a
 * ring pass one byte around over pipes, LAPS times. With every process pinned
 * to one CPU (the default, CPU 0) each hop is exactly one wakeup and one
 * context switch from the sender to the receiver (2 processes: a ping-pong);
 * with CPU -1 they float and switches to and from the idle task come on top.
 *
 * With TOUCH_KB > 0 each process first writes one byte per 64 of its own
 * TOUCH_KB buffer before it passes the byte on, so switches find the caches
 * holding that buffer rather than the scheduler's data (the regime of a busy
 * server, where switches are rare next to the work between them). That work
 * is in the times too: compare against a bare run.
 *
 * Timed inside the programs over the LAPS laps (after a warm-up): wall clock
 * (CLOCK_MONOTONIC) of process 0, and the CPU time of all of them
 * (CLOCK_PROCESS_CPUTIME_ID of each, sent back over a pipe), which includes
 * the kernel's switch path and the BPF programs run in it, but not time the
 * CPU gave to other processes.
 * Prints one line of key=value pairs, ns per hop:
 *   hop_wall_ns= hop_cpu_ns= hops=
 * Usage: ring LAPS [CPU|-1] [PROCS] [TOUCH_KB] */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 256

static volatile char *buf;
static long buf_len;

static long long now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void touch(void)
{
    for (long i = 0; i < buf_len; i += 64)
        buf[i]++;
}

static void xread(int fd, void *p, size_t n)
{
    if (read(fd, p, n) != (ssize_t)n) {
        perror("read");
        exit(1);
    }
}

static void xwrite(int fd, const void *p, size_t n)
{
    if (write(fd, p, n) != (ssize_t)n) {
        perror("write");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long laps = argc > 1 ? atol(argv[1]) : 100000L;
    int cpu = argc > 2 ? atoi(argv[2]) : 0;
    int procs = argc > 3 ? atoi(argv[3]) : 2;
    buf_len = argc > 4 ? atol(argv[4]) * 1024 : 0;
    if (laps <= 0 || procs < 2 || procs > MAX_PROCS || buf_len < 0) {
        fprintf(stderr, "usage: %s LAPS [CPU|-1] [PROCS 2..%d] [TOUCH_KB]\n", argv[0],
                MAX_PROCS);
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0) {
            perror("sched_setaffinity");
            return 1;
        }
    }
    if (buf_len > 0 && !(buf = calloc(1, buf_len))) {
        perror("calloc");
        return 1;
    }
    /* pipe i carries the byte from process i to process i + 1 (mod procs) */
    int p[MAX_PROCS][2], results[2];
    for (int i = 0; i < procs; i++)
        if (pipe(p[i]) != 0) {
            perror("pipe");
            return 1;
        }
    if (pipe(results) != 0) {
        perror("pipe");
        return 1;
    }
    long warm = laps / 20 + 10;
    char c = 'x';
    pid_t kids[MAX_PROCS];
    for (int i = 1; i < procs; i++) {
        kids[i] = fork();
        if (kids[i] < 0) {
            perror("fork");
            return 1;
        }
        if (kids[i] == 0) {
            long long c0 = 0;
            for (long l = 0; l < warm + laps; l++) {
                xread(p[i - 1][0], &c, 1);
                if (l == warm)
                    c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
                touch();
                xwrite(p[i][1], &c, 1);
            }
            long long used = now_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
            xwrite(results[1], &used, sizeof(used));
            _exit(0);
        }
    }
    long long w0 = 0, c0 = 0;
    for (long l = 0; l < warm + laps; l++) {
        if (l == warm) {
            w0 = now_ns(CLOCK_MONOTONIC);
            c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
        }
        touch();
        xwrite(p[0][1], &c, 1);
        xread(p[procs - 1][0], &c, 1);
    }
    long long w1 = now_ns(CLOCK_MONOTONIC), cpu_ns = now_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
    for (int i = 1; i < procs; i++) {
        long long used = 0;
        xread(results[0], &used, sizeof(used));
        cpu_ns += used;
    }
    for (int i = 1; i < procs; i++) {
        int status;
        if (waitpid(kids[i], &status, 0) != kids[i] || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "process %d failed\n", i);
            return 1;
        }
    }
    long hops = laps * procs;
    printf("hop_wall_ns=%.2f hop_cpu_ns=%.2f hops=%ld\n", (double)(w1 - w0) / hops,
           (double)cpu_ns / hops, hops);
    return 0;
}
