/* A thread renamed by another thread: the main thread names a worker through
 * /proc/self/task/<tid>/comm while the worker waits on a pipe, then the worker
 * makes exactly N system calls number NR (unassigned: each fails with ENOSYS)
 * under the new name. The worker has made system calls under its old name
 * before (its start-up and the wait), so a collector that caches names per task
 * must notice the rename. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int go[2], ready[2];
static long n, nr;
static pid_t worker_tid;

static void *worker(void *arg)
{
    char c = 0;
    (void)arg;
    worker_tid = (pid_t)syscall(SYS_gettid);
    if (write(ready[1], &c, 1) != 1 || read(go[0], &c, 1) != 1)
        return (void *)1;
    for (long i = 0; i < n; i++)
        if (syscall(nr) != -1 || errno != ENOSYS)
            return (void *)1;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s NEWCOMM N NR\n", argv[0]);
        return 2;
    }
    n = atol(argv[2]);
    nr = atol(argv[3]);
    pthread_t t;
    char c = 0, path[64];
    void *ret;
    if (pipe(go) || pipe(ready) || pthread_create(&t, NULL, worker, NULL))
        return 1;
    if (read(ready[0], &c, 1) != 1)
        return 1;
    snprintf(path, sizeof(path), "/proc/self/task/%d/comm", worker_tid);
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, argv[1], strlen(argv[1])) != (ssize_t)strlen(argv[1]))
        return 1;
    close(fd);
    if (write(go[1], &c, 1) != 1 || pthread_join(t, &ret) || ret)
        return 1;
    return 0;
}
