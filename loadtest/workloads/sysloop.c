/* Syscall loop for the edge overhead benchmark: N getppid() calls, then N
 * one-byte write()s to /dev/null, each phase timed inside the program with
 * clock_gettime: CLOCK_THREAD_CPUTIME_ID (CPU time of this thread, which
 * includes the kernel's syscall path and any BPF program run in it, but not
 * time spent preempted by other processes) and CLOCK_MONOTONIC (wall).
 * Prints one line of key=value pairs, ns per call:
 *   getppid_cpu_ns= write_cpu_ns= getppid_wall_ns= write_wall_ns= calls=
 * getppid goes through syscall(2) so no libc cache can skip the kernel. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 5000000L;
    if (n <= 0) {
        fprintf(stderr, "usage: %s CALLS\n", argv[0]);
        return 2;
    }
    int fd = open("/dev/null", O_WRONLY);
    if (fd < 0) {
        perror("open /dev/null");
        return 1;
    }
    char c = 'x';
    long warm = n / 50 + 1000;
    for (long i = 0; i < warm; i++) {
        syscall(SYS_getppid);
        if (write(fd, &c, 1) != 1)
            return 1;
    }

    long long w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    long long w1 = now_ns(CLOCK_MONOTONIC), c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    for (long i = 0; i < n; i++)
        if (write(fd, &c, 1) != 1) {
            perror("write");
            return 1;
        }
    long long w2 = now_ns(CLOCK_MONOTONIC), c2 = now_ns(CLOCK_THREAD_CPUTIME_ID);

    printf("getppid_cpu_ns=%.2f write_cpu_ns=%.2f getppid_wall_ns=%.2f write_wall_ns=%.2f "
           "calls=%ld\n",
           (double)(c1 - c0) / n, (double)(c2 - c1) / n, (double)(w1 - w0) / n,
           (double)(w2 - w1) / n, n);
    return 0;
}
