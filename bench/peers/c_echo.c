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
#include "c_peer.h"

#define BUFSZ 65536

struct conn {
    int fd;
    char *pending; /* bytes the kernel did not take yet */
    size_t plen, poff;
};

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

static void on_accept(int ep, int fd, void *arg) {
    (void)arg;
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

static void on_event(int ep, void *conn, char *buf) {
    struct conn *c = conn;
    if (c->plen) on_writable(ep, c);
    else on_readable(ep, c, buf);
}

int main(int argc, char **argv) {
    struct peer_opts o = {.prog = "c_echo"};
    peer_parse(&o, argc, argv, 0);
    int lfd = peer_listen(&o);
    peer_prefork(o.workers);
    peer_serve(&o, lfd, BUFSZ, on_accept, on_event, NULL);
    return 0;
}
