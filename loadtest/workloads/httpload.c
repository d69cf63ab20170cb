/* Minimal closed-loop HTTP/1.1 load generator for the edge overhead benchmark,
 * used only when wrk is not installed. One thread, epoll, CONNS keep-alive
 * connections to 127.0.0.1:PORT, each sending the next GET as soon as the
 * previous response (Content-Length body) is complete. Stops after SECONDS or
 * MAX_REQUESTS responses, whichever comes first.
 * Usage: httpload PORT PATH CONNS SECONDS MAX_REQUESTS
 * Prints "requests=<n> seconds=<s> rps=<r> errors=<e>". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    char buf[16384];
    int len;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s PORT PATH CONNS SECONDS MAX_REQUESTS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    const char *path = argv[2];
    int nconn = atoi(argv[3]);
    double seconds = atof(argv[4]);
    long max_req = atol(argv[5]);
    char req[512];
    int reqlen = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", path);

    struct conn *cs = calloc(nconn, sizeof(*cs));
    int ep = epoll_create1(0);
    int one = 1;
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&a, sizeof(a))) {
            perror("connect");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        cs[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    long done = 0, errors = 0;
    double t0 = now(), deadline = t0 + seconds;
    for (int i = 0; i < nconn; i++)
        if (write(cs[i].fd, req, reqlen) != reqlen)
            errors++;
    struct epoll_event evs[256];
    while (done < max_req && now() < deadline) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            struct conn *c = &cs[evs[k].data.u32];
            int r = read(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                fprintf(stderr, "connection closed by server\n");
                return 1;
            }
            c->len += r;
            c->buf[c->len] = 0;
            for (;;) {
                char *hend = strstr(c->buf, "\r\n\r\n");
                if (!hend)
                    break;
                char *cl = strcasestr(c->buf, "Content-Length:");
                long body = cl && cl < hend ? atol(cl + 15) : 0;
                int total = (int)(hend + 4 - c->buf) + (int)body;
                if (c->len < total)
                    break;
                if (strncmp(c->buf + 9, "200", 3) != 0)
                    errors++;
                memmove(c->buf, c->buf + total, c->len - total + 1);
                c->len -= total;
                done++;
                if (write(c->fd, req, reqlen) != reqlen)
                    errors++;
            }
        }
    }
    double el = now() - t0;
    printf("requests=%ld seconds=%.3f rps=%.1f errors=%ld\n", done, el, done / el, errors);
    return 0;
}
