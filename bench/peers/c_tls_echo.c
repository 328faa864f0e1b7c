/*
 * c_tls_echo: the TLS echo floor: an epoll echo server in C on OpenSSL.
 *
 *   c_tls_echo --bind 127.0.0.1:9443 --tls-cert cert.pem --tls-key key.pem [--workers N]
 *
 * The process model of c_echo (bind once, fork N-1 workers, an EPOLLEXCLUSIVE
 * listener, level-triggered epoll). Each connection runs a non-blocking
 * handshake driven by epoll (SSL_ERROR_WANT_READ / WANT_WRITE), then reads
 * records and writes their bytes back. A write the socket cannot take is kept
 * and retried with the same bytes once the socket is ready; the connection
 * reads nothing meanwhile. OpenSSL's defaults otherwise: TLS 1.3, its cipher
 * order, two session tickets per handshake. Read-ahead is on, so one recv()
 * can bring several records; SSL_has_pending() says when OpenSSL holds bytes
 * that epoll cannot see.
 *
 *   cc -O2 -o c_tls_echo c_tls_echo.c -lssl -lcrypto
 */
#include "c_peer.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

#define BUFSZ 16384 /* one TLS record's plaintext at most */

struct conn {
    int fd;
    SSL *ssl;
    int ready;     /* the handshake is done */
    uint32_t events;
    char *pending; /* bytes SSL_write did not finish */
    size_t plen;
};

static SSL_CTX *server_context(const struct peer_opts *o) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        fprintf(stderr, "%s: cannot load %s and %s:\n", o->prog, o->cert, o->key);
        ERR_print_errors_fp(stderr);
        exit(2);
    }
    /* A retried SSL_write may pass the kept bytes from a new address. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    return ctx;
}

static void watch(int ep, struct conn *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event e = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
    c->events = events;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    SSL_free(c->ssl);
    close(c->fd);
    free(c->pending);
    free(c);
}

/* After a failed SSL call: 1 when it waits for the socket (now watched for
 * what it needs), 0 when the connection is over. */
static int wait_for_socket(int ep, struct conn *c, int rc) {
    switch (SSL_get_error(c->ssl, rc)) {
    case SSL_ERROR_WANT_READ: watch(ep, c, EPOLLIN); return 1;
    case SSL_ERROR_WANT_WRITE: watch(ep, c, EPOLLOUT); return 1;
    case SSL_ERROR_ZERO_RETURN: SSL_shutdown(c->ssl); return 0; /* answer close_notify */
    default: ERR_clear_error(); return 0;
    }
}

/* Write n bytes; 1 when all are written, 0 when the rest is kept for later,
 * -1 on error. buf is c->pending itself on a retry. */
static int write_all(int ep, struct conn *c, const char *buf, size_t n) {
    int retry = buf == c->pending;
    while (n > 0) {
        int w = SSL_write(c->ssl, buf, (int)n);
        if (w <= 0) {
            if (!wait_for_socket(ep, c, w)) return -1;
            if (retry) {
                memmove(c->pending, buf, n);
            } else {
                c->pending = malloc(n);
                memcpy(c->pending, buf, n);
            }
            c->plen = n;
            return 0;
        }
        buf += w;
        n -= (size_t)w;
    }
    free(c->pending);
    c->pending = NULL;
    c->plen = 0;
    return 1;
}

static void on_event(int ep, void *conn, char *buf) {
    struct conn *c = conn;
    if (!c->ready) {
        int rc = SSL_do_handshake(c->ssl);
        if (rc != 1) {
            if (!wait_for_socket(ep, c, rc)) drop(ep, c);
            return;
        }
        c->ready = 1;
    }
    if (c->plen) {
        int rc = write_all(ep, c, c->pending, c->plen);
        if (rc < 0) drop(ep, c);
        if (rc != 1) return;
    }
    watch(ep, c, EPOLLIN);
    do {
        int r = SSL_read(c->ssl, buf, BUFSZ);
        if (r <= 0) {
            if (!wait_for_socket(ep, c, r)) drop(ep, c);
            return;
        }
        int rc = write_all(ep, c, buf, (size_t)r);
        if (rc < 0) drop(ep, c);
        if (rc != 1) return;
    } while (SSL_has_pending(c->ssl));
}

static void on_accept(int ep, int fd, void *ctx) {
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, fd);
    SSL_set_accept_state(c->ssl);
    c->events = EPOLLIN; /* the ClientHello */
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

int main(int argc, char **argv) {
    struct peer_opts o = {.prog = "c_tls_echo"};
    peer_parse(&o, argc, argv, 1);
    SSL_CTX *ctx = server_context(&o); /* a bad certificate fails before binding */
    int lfd = peer_listen(&o);
    peer_prefork(o.workers);
    peer_serve(&o, lfd, BUFSZ, on_accept, on_event, ctx);
    return 0;
}
