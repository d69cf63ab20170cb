/* T threads that burn CPU for S seconds, under a chosen comm; prints the
 * process's CPU time in ns (all threads) once they are done. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>

static double seconds;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *spin(void *arg)
{
    (void)arg;
    volatile unsigned long x = 0;
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            x += i;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    int n = atoi(argv[2]);
    seconds = atof(argv[3]);
    pthread_t t[64];
    for (int i = 0; i < n && i < 64; i++)
        pthread_create(&t[i], NULL, spin, NULL);
    for (int i = 0; i < n && i < 64; i++)
        pthread_join(t[i], NULL);
    struct timespec cpu;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    printf("%lld\n", (long long)cpu.tv_sec * 1000000000LL + cpu.tv_nsec);
    return 0;
}
