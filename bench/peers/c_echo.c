/*
 * c_echo: an epoll echo server in C, the floor of the benchmark: what the
 * kernel's socket path costs per message with next to no user-space work.
 *
 *   c_echo --bind 127.0.0.1:9876 [--workers N] [--backlog N]
 *   c_echo --bind unix:/tmp/echo.sock
 *
 * Binds once, then forks N-1 children that share the listening socket; each
 * process runs its own level-triggered epoll loop and registers the listener
 * with EPOLLEXCLUSIVE so one worker is woken per new connection. Reads up to
 * 64 KiB and writes it back; what the kernel does not take is kept and the
 * connection stops reading until it is written (backpressure).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUFSZ 65536

struct conn {
    int fd;
    char *pending; /* bytes the kernel did not take yet */
    size_t plen, poff;
};

static int g_tcp;

static int listen_on(const char *addr, int backlog) {
    int fd;
    if (strncmp(addr, "unix:", 5) == 0 || addr[0] == '/') {
        const char *path = addr[0] == '/' ? addr : addr + 5;
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof un.sun_path) {
            fprintf(stderr, "c_echo: socket path too long\n");
            exit(2);
        }
        strcpy(un.sun_path, path);
        unlink(path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&un, sizeof un) < 0) {
            perror("c_echo: bind");
            exit(2);
        }
    } else {
        char host[256];
        const char *colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof host) {
            fprintf(stderr, "c_echo: expected HOST:PORT or unix:PATH\n");
            exit(2);
        }
        const char *h = addr;
        size_t hl = (size_t)(colon - addr);
        if (h[0] == '[' && hl >= 2) {
            h++;
            hl -= 2;
        }
        memcpy(host, h, hl);
        host[hl] = 0;
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
        if (getaddrinfo(hl ? host : NULL, colon + 1, &hints, &res) != 0) {
            fprintf(stderr, "c_echo: cannot resolve %s\n", addr);
            exit(2);
        }
        fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
            perror("c_echo: bind");
            exit(2);
        }
        freeaddrinfo(res);
        g_tcp = 1;
    }
    if (listen(fd, backlog) < 0) {
        perror("c_echo: listen");
        exit(2);
    }
    return fd;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

/* Write pending bytes; 1 when all written, 0 when the kernel is full, -1 on error. */
static int flush_pending(struct conn *c) {
    while (c->poff < c->plen) {
        ssize_t w = send(c->fd, c->pending + c->poff, c->plen - c->poff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN ? 0 : -1;
        }
        c->poff += (size_t)w;
    }
    c->plen = c->poff = 0;
    return 1;
}

static void on_readable(int ep, struct conn *c, char *buf) {
    for (int rounds = 0; rounds < 16; rounds++) {
        ssize_t r = recv(c->fd, buf, BUFSZ, 0);
        if (r == 0) goto gone;
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return;
            goto gone;
        }
        ssize_t w = send(c->fd, buf, (size_t)r, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN) goto gone;
            w = 0;
        }
        if (w < r) { /* keep the rest, wait for EPOLLOUT, stop reading */
            c->pending = malloc((size_t)(r - w));
            memcpy(c->pending, buf + w, (size_t)(r - w));
            c->plen = (size_t)(r - w);
            c->poff = 0;
            struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
            return;
        }
        if (r < BUFSZ) return;
    }
    return;
gone:
    drop(ep, c);
}

static void on_writable(int ep, struct conn *c) {
    int rc = flush_pending(c);
    if (rc < 0) {
        drop(ep, c);
        return;
    }
    if (rc == 1) {
        free(c->pending);
        c->pending = NULL;
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
    }
}

static void serve(int lfd) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e) < 0) {
        perror("c_echo: epoll_ctl");
        exit(2);
    }
    char *buf = malloc(BUFSZ);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (int k = 0; k < 64; k++) { /* a capped accept burst */
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    if (g_tcp) {
                        int one = 1;
                        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    }
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            if (c->plen) on_writable(ep, c);
            else on_readable(ep, c, buf);
        }
    }
}

int main(int argc, char **argv) {
    static struct option lo[] = {{"bind", required_argument, 0, 'b'},
                                 {"workers", required_argument, 0, 'w'},
                                 {"backlog", required_argument, 0, 'l'},
                                 {0, 0, 0, 0}};
    const char *addr = "127.0.0.1:9876";
    int workers = 1, backlog = 2048, ch;
    while ((ch = getopt_long(argc, argv, "b:w:", lo, NULL)) != -1) {
        switch (ch) {
        case 'b': addr = optarg; break;
        case 'w': workers = atoi(optarg); break;
        case 'l': backlog = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: c_echo --bind ADDR [--workers N] [--backlog N]\n");
            return 2;
        }
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = listen_on(addr, backlog);
    for (int i = 1; i < workers; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            serve(lfd);
        }
    }
    serve(lfd);
    return 0;
}
