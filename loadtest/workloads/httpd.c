/* Minimal HTTP/1.1 keep-alive server for the edge overhead benchmark, used
 * only when nginx is not installed. One thread, epoll, answers every request
 * with the same small static body. Binds 127.0.0.1 only.
 * Usage: httpd PORT BODY_BYTES   (prints "listening PORT" when ready) */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXFD 4096
#define BUFSZ 8192

static char inbuf[MAXFD][1024];
static int inlen[MAXFD];

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT BODY_BYTES\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    int body = atoi(argv[2]);
    char *resp = malloc(256 + body);
    int hl = sprintf(resp, "HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/html\r\n"
                           "Content-Length: %d\r\nConnection: keep-alive\r\n\r\n", body);
    memset(resp + hl, 'a', body);
    int resplen = hl + body;

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 1024)) {
        perror("bind/listen");
        return 1;
    }
    set_nonblock(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("listening %d\n", port);
    fflush(stdout);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept(ls, NULL, NULL)) >= 0) {
                    if (c >= MAXFD) {
                        close(c);
                        continue;
                    }
                    set_nonblock(c);
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    inlen[c] = 0;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            for (;;) {
                int r = read(fd, inbuf[fd] + inlen[fd], sizeof(inbuf[fd]) - 1 - inlen[fd]);
                if (r == 0 || (r < 0 && errno != EAGAIN)) {
                    close(fd);
                    break;
                }
                if (r < 0)
                    break;
                inlen[fd] += r;
                inbuf[fd][inlen[fd]] = 0;
                char *end;
                while ((end = strstr(inbuf[fd], "\r\n\r\n")) != NULL) {
                    if (write(fd, resp, resplen) != resplen) {
                        /* loopback buffers are large; a short write means a dead peer */
                        close(fd);
                        inlen[fd] = 0;
                        goto next;
                    }
                    int used = (int)(end + 4 - inbuf[fd]);
                    memmove(inbuf[fd], inbuf[fd] + used, inlen[fd] - used + 1);
                    inlen[fd] -= used;
                }
                if (inlen[fd] >= (int)sizeof(inbuf[fd]) - 1) {
                    close(fd);
                    break;
                }
            }
        next:;
        }
    }
}
