/* Exactly N successful openat calls and M that fail with ENOENT, under a comm
 * set with prctl after start-up (so the loader's own opens are not counted). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s COMM OK_COUNT ENOENT_COUNT [PAUSE_US_PER_1000]\n", argv[0]);
        return 2;
    }
    long ok = atol(argv[2]), missing = atol(argv[3]);
    long pause_us = argc == 5 ? atol(argv[4]) : 0;
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    for (long i = 0; i < ok; i++) {
        int fd = openat(AT_FDCWD, "/proc/self/stat", O_RDONLY);
        if (fd < 0)
            return 1;
        close(fd);
        if (pause_us && i % 1000 == 999)
            usleep(pause_us);
    }
    for (long i = 0; i < missing; i++) {
        if (openat(AT_FDCWD, "/nonexistent/stratoscope", O_RDONLY) >= 0)
            return 1;
        if (pause_us && i % 1000 == 999)
            usleep(pause_us);
    }
    return 0;
}
