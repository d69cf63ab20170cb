/* A busy node: CHILDREN processes alive at once, each under its own comm
 * PREFIX<i>, each making ROUNDS rounds of 30 kinds of system calls, plus one
 * process under comm PROBE (give it the same prefix) making OK successful
 * openat calls (each followed by a close) and MISSING that fail with ENOENT. Every process counts the system calls it makes (by number,
 * from the prctl that names it until its _exit, which never returns and so is
 * never counted at sys_exit) and adds them to a table in shared memory; the
 * parent prints that table as "nr count" lines once every child has exited.
 *
 * All children are alive from the start barrier to the exit barrier, so the
 * collector sees CHILDREN concurrently active processes. Only raw syscall()
 * calls are made after the prctl (no libc wrappers that might add calls).
 * Usage: busy_node PREFIX CHILDREN ROUNDS PROBE_COMM OK MISSING [NOSYS_BASE] */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/times.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_NR 512

struct shared {
    long counts[MAX_NR];
    long ready;
    long done;
};

static struct shared *sh;
static long mine[MAX_NR];

static long call(long nr, long a, long b, long c, long d)
{
    mine[nr]++;
    return syscall(nr, a, b, c, d);
}

/* With a base number, the 30 kinds are the unassigned numbers BASE..BASE+29
 * instead (x86_64 leaves 335..423 free): each fails with ENOSYS, and no other
 * process on the machine makes them, so their totals over all comms are exact. */
static long nosys_base;

static void kinds30(void)
{
    if (nosys_base) {
        for (long nr = nosys_base; nr < nosys_base + 30; nr++)
            if (call(nr, 0, 0, 0, 0) != -1 || errno != ENOSYS)
                _exit(4);
        return;
    }

    struct utsname u;
    struct rusage ru;
    struct tms t;
    struct timespec ts;
    struct timeval tv;
    struct itimerval it;
    struct rlimit rl;
    struct sched_param sp;
    stack_t ss;
    sigset_t set;
    cpu_set_t mask;
    char cwd[4096];
    uid_t r, e, s;

    call(SYS_getpid, 0, 0, 0, 0);
    call(SYS_getppid, 0, 0, 0, 0);
    call(SYS_getuid, 0, 0, 0, 0);
    call(SYS_geteuid, 0, 0, 0, 0);
    call(SYS_getgid, 0, 0, 0, 0);
    call(SYS_getegid, 0, 0, 0, 0);
    call(SYS_gettid, 0, 0, 0, 0);
    call(SYS_getpgrp, 0, 0, 0, 0);
    call(SYS_getsid, 0, 0, 0, 0);
    call(SYS_getpgid, 0, 0, 0, 0);
    call(SYS_getpriority, PRIO_PROCESS, 0, 0, 0);
    call(SYS_umask, 022, 0, 0, 0);
    call(SYS_sched_yield, 0, 0, 0, 0);
    call(SYS_uname, (long)&u, 0, 0, 0);
    call(SYS_getrusage, RUSAGE_SELF, (long)&ru, 0, 0);
    call(SYS_times, (long)&t, 0, 0, 0);
    call(SYS_getcwd, (long)cwd, sizeof(cwd), 0, 0);
    call(SYS_prlimit64, 0, RLIMIT_NOFILE, 0, (long)&rl);
    call(SYS_sched_getscheduler, 0, 0, 0, 0);
    call(SYS_sched_getparam, 0, (long)&sp, 0, 0);
    call(SYS_sched_getaffinity, 0, sizeof(mask), (long)&mask, 0);
    call(SYS_getgroups, 0, 0, 0, 0);
    call(SYS_getresuid, (long)&r, (long)&e, (long)&s, 0);
    call(SYS_getresgid, (long)&r, (long)&e, (long)&s, 0);
    call(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&ts, 0, 0);
    call(SYS_clock_getres, CLOCK_MONOTONIC, (long)&ts, 0, 0);
    call(SYS_gettimeofday, (long)&tv, 0, 0, 0);
    call(SYS_getitimer, ITIMER_REAL, (long)&it, 0, 0);
    call(SYS_sigaltstack, 0, (long)&ss, 0, 0);
    call(SYS_close, -1, 0, 0, 0); /* fails with EBADF: errors too */
    (void)set;
}

static void child(const char *comm, int start_fd, int exit_fd, long rounds, long ok, long missing)
{
    char c;
    /* prctl's sys_exit already sees the new comm, so it counts as ours. */
    call(SYS_prctl, PR_SET_NAME, (long)comm, 0, 0);
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_SEQ_CST);
    call(SYS_read, start_fd, (long)&c, 1, 0); /* returns 0 once the parent closes it */
    for (long i = 0; i < rounds; i++)
        kinds30();
    for (long i = 0; i < ok; i++) {
        long fd = call(SYS_openat, AT_FDCWD, (long)"/proc/self/stat", O_RDONLY, 0);
        if (fd < 0)
            _exit(3);
        call(SYS_close, fd, 0, 0, 0);
    }
    for (long i = 0; i < missing; i++)
        if (call(SYS_openat, AT_FDCWD, (long)"/nonexistent/stratoscope", O_RDONLY, 0) >= 0)
            _exit(3);
    /* The exit barrier's read is counted before it is made: nothing follows it but _exit. */
    mine[SYS_read]++;
    for (int nr = 0; nr < MAX_NR; nr++)
        if (mine[nr])
            __atomic_fetch_add(&sh->counts[nr], mine[nr], __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&sh->done, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_read, exit_fd, &c, 1);
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s PREFIX CHILDREN ROUNDS PROBE_COMM OK MISSING [NOSYS_BASE]\n",
                argv[0]);
        return 2;
    }
    nosys_base = argc == 8 ? atol(argv[7]) : 0;
    if (nosys_base && (nosys_base < 335 || nosys_base + 30 > 424)) {
        fprintf(stderr, "NOSYS_BASE must leave BASE..BASE+29 within 335..423\n");
        return 2;
    }
    const char *prefix = argv[1];
    long children = atol(argv[2]), rounds = atol(argv[3]);
    const char *probe = argv[4];
    long ok = atol(argv[5]), missing = atol(argv[6]);
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        return 1;
    memset(sh, 0, sizeof(*sh));
    int start[2], stop[2];
    if (pipe(start) || pipe(stop))
        return 1;
    pid_t *pids = calloc(children + 1, sizeof(pid_t));
    for (long i = 0; i <= children; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            close(start[1]);
            close(stop[1]);
            char comm[32]; /* the kernel keeps 15 bytes: keep PREFIX short */
            if (i == children)
                child(probe, start[0], stop[0], 0, ok, missing);
            snprintf(comm, sizeof(comm), "%s%ld", prefix, i);
            child(comm, start[0], stop[0], rounds, 0, 0);
        }
        pids[i] = pid;
    }
    while (__atomic_load_n(&sh->ready, __ATOMIC_SEQ_CST) < children + 1)
        usleep(1000);
    close(start[1]); /* every child is named and alive: go */
    while (__atomic_load_n(&sh->done, __ATOMIC_SEQ_CST) < children + 1)
        usleep(1000);
    close(stop[1]);
    for (long i = 0; i <= children; i++) {
        int status;
        if (waitpid(pids[i], &status, 0) != pids[i] || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child %ld failed\n", i);
            return 1;
        }
    }
    for (int nr = 0; nr < MAX_NR; nr++)
        if (sh->counts[nr])
            printf("%d %ld\n", nr, sh->counts[nr]);
    return 0;
}
