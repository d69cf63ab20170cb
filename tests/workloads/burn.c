/* Burns S seconds of CPU time (not wall time: a loaded machine must not
 * shrink the sample count) in a named function, then waits on stdin so the
 * profiler can still read /proc/PID/maps when it symbolizes. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long stratoscope_burn_cpu(double seconds)
{
    volatile unsigned long x = 0;
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 200000; i++)
            x += i * 7;
    return x;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    stratoscope_burn_cpu(atof(argv[2]));
    printf("done\n");
    fflush(stdout);
    char buf[8];
    (void)!read(0, buf, sizeof(buf));
    return 0;
}
