/*
 * c_peer.h: what the C peer servers share: the command line, binding, the
 * prefork, and the epoll loop with its listener (EPOLLEXCLUSIVE: one worker
 * is woken per new connection).
 *
 *   PROG --bind HOST:PORT|unix:PATH [--workers N] [--backlog N]
 *        [--tls-cert PEM --tls-key PEM]      (servers that speak TLS)
 */
#ifndef C_PEER_H
#define C_PEER_H

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
#include <unistd.h>

struct peer_opts {
    const char *prog, *addr, *cert, *key;
    int workers, backlog, tcp;
};

static void peer_usage(const struct peer_opts *o, int tls) {
    fprintf(stderr, "usage: %s --bind ADDR [--workers N] [--backlog N]%s\n", o->prog,
            tls ? " --tls-cert PEM --tls-key PEM" : "");
    exit(2);
}

/* Parse the command line; with tls, --tls-cert and --tls-key are required. */
static void peer_parse(struct peer_opts *o, int argc, char **argv, int tls) {
    static struct option lo[] = {{"bind", required_argument, 0, 'b'},
                                 {"workers", required_argument, 0, 'w'},
                                 {"backlog", required_argument, 0, 'l'},
                                 {"tls-cert", required_argument, 0, 'c'},
                                 {"cert", required_argument, 0, 'c'},
                                 {"tls-key", required_argument, 0, 'k'},
                                 {"key", required_argument, 0, 'k'},
                                 {0, 0, 0, 0}};
    o->addr = "127.0.0.1:9876";
    o->workers = 1;
    o->backlog = 2048;
    int ch;
    while ((ch = getopt_long(argc, argv, "b:w:", lo, NULL)) != -1) {
        switch (ch) {
        case 'b': o->addr = optarg; break;
        case 'w': o->workers = atoi(optarg); break;
        case 'l': o->backlog = atoi(optarg); break;
        case 'c': o->cert = optarg; break;
        case 'k': o->key = optarg; break;
        default: peer_usage(o, tls);
        }
    }
    if (o->workers < 1 || (tls && (!o->cert || !o->key)) || (!tls && (o->cert || o->key)))
        peer_usage(o, tls);
}

/* A non-blocking listening socket on HOST:PORT or unix:PATH; sets o->tcp. */
static int peer_listen(struct peer_opts *o) {
    const char *addr = o->addr;
    int fd;
    if (strncmp(addr, "unix:", 5) == 0 || addr[0] == '/') {
        const char *path = addr[0] == '/' ? addr : addr + 5;
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof un.sun_path) {
            fprintf(stderr, "%s: socket path too long\n", o->prog);
            exit(2);
        }
        strcpy(un.sun_path, path);
        unlink(path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&un, sizeof un) < 0) {
            perror("bind");
            exit(2);
        }
    } else {
        char host[256];
        const char *colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof host) {
            fprintf(stderr, "%s: expected HOST:PORT or unix:PATH\n", o->prog);
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
            fprintf(stderr, "%s: cannot resolve %s\n", o->prog, addr);
            exit(2);
        }
        fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
            perror("bind");
            exit(2);
        }
        freeaddrinfo(res);
        o->tcp = 1;
    }
    if (listen(fd, o->backlog) < 0) {
        perror("listen");
        exit(2);
    }
    return fd;
}

/* Raise the open-file limit, ignore SIGPIPE, and fork workers-1 children that
 * share the listening socket; every process returns and serves. A child asks
 * for SIGTERM when its parent dies, so a killed server leaves no workers. */
static void peer_prefork(int workers) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < workers; i++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            return;
        }
    }
}

/* A worker's level-triggered epoll loop, forever. The listener is registered
 * with EPOLLEXCLUSIVE and data.ptr NULL; each wakeup on it accepts a capped
 * burst of connections (non-blocking, TCP_NODELAY on TCP) and hands each to
 * on_accept, which registers it with its own data.ptr. Every other event goes
 * to on_event with that pointer and a buffer of bufsz bytes. */
static void peer_serve(const struct peer_opts *o, int lfd, size_t bufsz,
                       void (*on_accept)(int ep, int fd, void *arg),
                       void (*on_event)(int ep, void *conn, char *buf), void *arg) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e) < 0) {
        perror("epoll_ctl");
        exit(2);
    }
    char *buf = malloc(bufsz);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr != NULL) {
                on_event(ep, evs[i].data.ptr, buf);
                continue;
            }
            for (int k = 0; k < 64; k++) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                if (o->tcp) {
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                }
                on_accept(ep, fd, arg);
            }
        }
    }
}

#endif
