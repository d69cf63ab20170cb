/* CHILDREN processes, one after another, each under its own comm PREFIX<i>
 * (set with prctl, so nothing before it counts), each making exactly CALLS
 * system calls number NR and then _exit. With an unassigned NR (x86_64 leaves
 * 335..423 free) every call fails with ENOSYS and no other process on the
 * machine makes that syscall, so its totals over all comms are exact. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s PREFIX CHILDREN CALLS NR\n", argv[0]);
        return 2;
    }
    const char *prefix = argv[1];
    long children = atol(argv[2]), calls = atol(argv[3]), nr = atol(argv[4]);
    for (long c = 0; c < children; c++) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            char comm[16];
            snprintf(comm, sizeof(comm), "%s%ld", prefix, c);
            prctl(PR_SET_NAME, comm, 0, 0, 0);
            for (long i = 0; i < calls; i++)
                if (syscall(nr) != -1 || errno != ENOSYS)
                    _exit(3);
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 1;
    }
    return 0;
}
