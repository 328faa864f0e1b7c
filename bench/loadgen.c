/*
 * loadgen: a load generator for stream socket servers (TCP or Unix socket).
 *
 *   loadgen --addr 127.0.0.1:9876 --mode pingpong -c 50 -s 64 -d 5 -w 1
 *   loadgen --addr unix:/tmp/echo.sock --mode pipeline -p 16 -c 50 -s 4096
 *   loadgen --addr 127.0.0.1:9876 --mode connect -c 50
 *   loadgen --addr 127.0.0.1:9876 --mode broadcast -c 100 -k 10 -s 64
 *   loadgen --addr 127.0.0.1:9876 --mode idle -c 10000 -d 600
 *   loadgen_tls --tls --addr 127.0.0.1:9443 --mode connect -c 50
 *
 * Modes
 *   pingpong   every connection keeps one message in flight.
 *   pipeline   every connection keeps P messages in flight (-p P).
 *   connect    every connection slot loops: connect, send one message, read it
 *              back, close. Reports connections per second and failures.
 *   broadcast  C clients connect; the first K (-k) send newline-terminated
 *              messages carrying "sender seq send-time"; every client reads
 *              every line. Each message is expected by all C clients (the
 *              sender included); a sender sends its next message once its own
 *              came back (P in flight with -p). Latency is delivery latency.
 *   idle       open C connections (one round trip each to prove the server
 *              took them), print "# phase idle-ready", then hold them until
 *              the duration passes or SIGTERM/SIGINT arrives.
 *
 * The echo modes expect a raw byte echo: a message is complete when S bytes
 * came back. Every message is S-1 bytes of 'x' and a newline, so servers that
 * frame by line echo it unchanged too.
 *
 * Timing: the run starts with the warm-up (-w), then the measured window
 * (-d). Only messages completed inside the window count (for broadcast: only
 * messages sent inside the window, whenever they are delivered). stdout gets
 * "# phase measure" when the window opens and "# phase done" when it closes,
 * so a driver can sample server CPU time around exactly that window; a human
 * summary (unless -q) and, last, one JSON line with every figure.
 *
 * Errors are counted, never hidden: connect failures, resets, short reads
 * (the peer closed with a message in flight), closes between messages,
 * protocol errors (more bytes back than were sent, a malformed or over-long
 * line) and other socket errors. A connection that fails after it was
 * established is reconnected; one whose connect failed stays down (in
 * connect mode, the slot tries again).
 *
 * WebSocket (--ws; the echo modes): every connection first sends an HTTP
 * upgrade request and reads the 101 answer; every message is then one masked
 * binary frame of S payload bytes (the mask key is zero, which a server must
 * accept and which leaves the payload as it is), and is complete when the
 * unmasked binary frame of S bytes came back. With --tls too: wss.
 *
 * TLS (--tls, in a build with -DLOADGEN_TLS linked with -lssl -lcrypto): every
 * connection runs a non-blocking handshake (SSL_connect's WANT_READ and
 * WANT_WRITE drive epoll) before its traffic starts; the certificate is not
 * verified and sessions are not resumed, so every connection pays a full
 * handshake. In connect mode a cycle is connect, handshake, one round trip,
 * close_notify, close: conn/s is handshakes per second. A failed handshake
 * counts as a "tls" error and, like a failed connect, leaves the connection
 * down. The JSON line names the protocol and cipher of the first handshake.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

enum mode { M_PINGPONG, M_PIPELINE, M_CONNECT, M_BROADCAST, M_IDLE };
static const char *mode_names[] = {"pingpong", "pipeline", "connect", "broadcast", "idle"};

enum state { ST_NONE, ST_CONNECTING, ST_HANDSHAKE, ST_WS, ST_ACTIVE, ST_IDLE, ST_DEAD };

/* ---- options and shared run state ---- */

static struct {
    enum mode mode;
    const char *addr;
    int conns, size, pipeline, threads, senders, concurrency, quiet, tls, ws;
    double duration, warmup, drain;
} opt = {M_PINGPONG, NULL, 50, 64, 1, 1, 1, 256, 0, 0, 0, 5.0, 1.0, 3.0};
/* Bytes of one message on the wire, out and back: S, or with --ws the frames. */
static uint64_t g_out, g_in;

static struct sockaddr_storage g_sa;
static socklen_t g_salen;
static int g_family;
static int g_spread_sources; /* TCP to 127.x: use many loopback source addresses */
static __thread unsigned g_source_rr;

static uint64_t t_start, t_measure, t_end, t_drain_end;
static atomic_int g_stop;               /* set by SIGTERM/SIGINT */
static atomic_ullong g_sent_window;     /* broadcast: messages sent in the window */
static atomic_ullong g_delivered_window;
static atomic_int g_idle_ready;         /* idle: threads that finished connecting */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int in_window(uint64_t t) { return t >= t_measure && t < t_end; }

/* ---- latency histogram: log-linear, 64 sub-buckets per power of two ---- */

#define HBUCKETS 3840

static int hidx(uint64_t v) {
    if (v < 128) return (int)v;
    int e = 63 - __builtin_clzll(v);
    int shift = e - 6;
    return shift * 64 + (int)(v >> shift);
}

static uint64_t hval(int idx) {
    if (idx < 128) return (uint64_t)idx;
    int shift = idx / 64 - 1;
    uint64_t m = (uint64_t)(idx % 64 + 64);
    return (m << shift) + ((1ull << shift) - 1) / 2;
}

struct stats {
    uint64_t msgs, bytes, connects;
    uint64_t err_connect, err_reset, err_short, err_closed, err_protocol, err_other, err_tls;
    uint64_t sent, delivered, out_of_order;
    uint64_t nlat, max_ns;
    uint64_t hist[HBUCKETS];
};

static void record(struct stats *s, uint64_t ns) {
    s->hist[hidx(ns)]++;
    s->nlat++;
    if (ns > s->max_ns) s->max_ns = ns;
}

static double percentile_us(const struct stats *s, double q) {
    if (s->nlat == 0) return 0.0;
    uint64_t rank = (uint64_t)(q * (double)s->nlat);
    if (rank >= s->nlat) rank = s->nlat - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HBUCKETS; i++) {
        seen += s->hist[i];
        if (seen > rank) {
            uint64_t v = hval(i);
            return (double)(v > s->max_ns ? s->max_ns : v) / 1000.0;
        }
    }
    return (double)s->max_ns / 1000.0;
}

/* ---- connections ---- */

struct conn {
    int fd, id, state, want_out;
    uint64_t wleft, wpos;   /* bytes queued to write; position in the stream */
    uint64_t racc;          /* bytes of the current reply received */
    int inflight;
    uint64_t *ts;           /* ring of send times, capacity pipeline */
    int ts_head, ts_tail;
    uint64_t t_begin;       /* connect/idle: when this cycle began */
    /* broadcast */
    char *lbuf;
    int llen;
    int64_t *last_seq;      /* per sender */
    uint64_t seq;
    char *wbuf;             /* a sender's own ring of in-flight lines */
    char hs[512];           /* --ws: the upgrade answer read so far */
    int hs_len;
#ifdef LOADGEN_TLS
    SSL *ssl;               /* NULL on a plain connection */
#endif
};

struct thr {
    int index, ep, nconns;
    struct conn *conns;
    char *sbuf;             /* the message repeated: writes come from here */
    size_t sbuf_len;
    char *rbuf;
    size_t rbuf_len;
    int pending;            /* idle: connects in progress */
    int cursor;             /* idle: where to look for the next slot to open */
    int established;
    struct stats st;
};

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void set_events(struct thr *t, struct conn *c, uint32_t ev, int op) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(t->ep, op, c->fd, &e) < 0) die("epoll_ctl");
}

static void close_conn(struct conn *c) {
#ifdef LOADGEN_TLS
    SSL_free(c->ssl);
    c->ssl = NULL;
#endif
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = ST_NONE;
    c->want_out = 0;
    c->wleft = c->wpos = c->racc = 0;
    c->inflight = c->ts_head = c->ts_tail = 0;
    c->llen = 0;
    c->hs_len = 0;
}

/* ---- plain or TLS I/O: send() and recv(), or SSL_write() and SSL_read() ---- */

#ifdef LOADGEN_TLS
static SSL_CTX *g_tls_ctx;
static char g_tls_info[128]; /* protocol and cipher of the first handshake */
static atomic_int g_tls_info_set;

/* An SSL call that returned r <= 0, in send()/recv() terms: -1 with errno
 * EAGAIN while the record layer waits for the socket (either way: the caller
 * watches both directions while it has output), EPROTO for a TLS failure;
 * 0 at the peer's close_notify or EOF. */
static ssize_t tls_result(struct conn *c, int r) {
    int saved = errno;
    int e = SSL_get_error(c->ssl, r);
    ERR_clear_error();
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE: errno = EAGAIN; return -1;
    case SSL_ERROR_ZERO_RETURN: return 0;
    case SSL_ERROR_SYSCALL: errno = saved ? saved : ECONNRESET; return -1;
    default: errno = EPROTO; return -1;
    }
}
#endif

static ssize_t io_send(struct conn *c, const char *buf, size_t n) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        int w = SSL_write(c->ssl, buf, (int)n);
        return w > 0 ? w : tls_result(c, w);
    }
#endif
    return send(c->fd, buf, n, MSG_NOSIGNAL);
}

static ssize_t io_recv(struct conn *c, char *buf, size_t n) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        int r = SSL_read(c->ssl, buf, (int)n);
        return r > 0 ? r : tls_result(c, r);
    }
#endif
    return recv(c->fd, buf, n, 0);
}

/* Bytes the TLS layer read from the socket and has not returned: epoll cannot see them. */
static int io_buffered(struct conn *c) {
#ifdef LOADGEN_TLS
    if (c->ssl) return SSL_has_pending(c->ssl);
#endif
    (void)c;
    return 0;
}

/* Close the TLS session with a close_notify, as a client that is done does. */
static void io_shutdown(struct conn *c) {
#ifdef LOADGEN_TLS
    if (c->ssl) SSL_shutdown(c->ssl);
#endif
    (void)c;
}

static void count_error(struct thr *t, int err) {
    if (err == ECONNRESET || err == EPIPE) t->st.err_reset++;
    else if (err == EPROTO) t->st.err_tls++;
    else t->st.err_other++;
}

/* Open a connection. TCP connects without blocking; a Unix-socket connect
 * completes (or fails) at once, except that a full listen backlog would give
 * EAGAIN, so it blocks with a send timeout as a bound. Returns -1 on failure
 * (counted). */
static int open_conn(struct thr *t, struct conn *c) {
    int fd;
    if (g_family == AF_UNIX) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) goto fail_errno;
        struct timeval tv = {5, 0};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&g_sa, g_salen) < 0) {
            close(fd);
            goto fail;
        }
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        c->fd = fd;
        c->state = ST_ACTIVE;
        return 0;
    }
    fd = socket(g_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) goto fail_errno;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_family == AF_INET && g_spread_sources) {
        /* Connection churn on loopback leaves a TIME_WAIT per closed
         * connection on this side; spreading the source address over
         * 127.0.0.0/8 keeps the kernel's search for a free port short. The
         * port is still chosen at connect() time (IP_BIND_ADDRESS_NO_PORT). */
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + 1u + (uint32_t)(g_source_rr++ % 64));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        bind(fd, (struct sockaddr *)&src, sizeof src);
    }
    c->fd = fd;
    if (connect(fd, (struct sockaddr *)&g_sa, g_salen) == 0) {
        c->state = ST_ACTIVE;
        return 0;
    }
    if (errno == EINPROGRESS) {
        c->state = ST_CONNECTING;
        set_events(t, c, EPOLLOUT, EPOLL_CTL_ADD);
        return 0;
    }
    close(fd);
    c->fd = -1;
fail:
    t->st.err_connect++;
    c->state = ST_DEAD;
    return -1;
fail_errno:
    if (errno == EMFILE || errno == ENFILE) die("socket");
    goto fail;
}

/* Queue n messages on c: their send time is now. */
static void queue_msgs(struct conn *c, int n, uint64_t now) {
    for (int i = 0; i < n; i++) {
        c->ts[c->ts_tail] = now;
        c->ts_tail = (c->ts_tail + 1) % opt.pipeline;
        c->inflight++;
    }
    c->wleft += (uint64_t)n * g_out;
}

/* Queue one broadcast line (S bytes). A sender's ring holds P lines and at
 * most P are in flight; everything queued is whole lines, so a line never
 * wraps and never overwrites bytes still to be written. */
static void queue_line(struct thr *t, struct conn *c, uint64_t now) {
    size_t s = (size_t)opt.size;
    char *p = c->wbuf + (c->wpos + c->wleft) % (s * (size_t)opt.pipeline);
    int n = snprintf(p, s, "%d %llu %llu ", c->id, (unsigned long long)c->seq,
                     (unsigned long long)now);
    memset(p + n, 'x', s - 1 - (size_t)n);
    p[s - 1] = '\n';
    c->seq++;
    c->inflight++;
    c->wleft += s;
    if (in_window(now)) {
        t->st.sent++;
        atomic_fetch_add_explicit(&g_sent_window, 1, memory_order_relaxed);
    }
}

/* Write what is queued; returns -1 if the connection failed (and was closed). */
static int do_write(struct thr *t, struct conn *c) {
    const char *buf = t->sbuf;
    size_t len = t->sbuf_len;
    uint64_t period = g_out; /* the echo stream repeats every message */
    if (c->wbuf) {
        buf = c->wbuf;
        len = (size_t)opt.size * (size_t)opt.pipeline;
        period = len;
    }
    while (c->wleft > 0) {
        size_t off = (size_t)(c->wpos % period);
        size_t n = len - off;
        if (n > c->wleft) n = (size_t)c->wleft;
        ssize_t w = io_send(c, buf + off, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                if (!c->want_out) {
                    c->want_out = 1;
                    set_events(t, c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
                }
                return 0;
            }
            count_error(t, errno);
            return -1;
        }
        c->wleft -= (uint64_t)w;
        c->wpos += (uint64_t)w;
    }
    if (c->want_out) {
        c->want_out = 0;
        set_events(t, c, EPOLLIN, EPOLL_CTL_MOD);
    }
    return 0;
}

/* The connection is established: register it and start its traffic. */
static int start_traffic(struct thr *t, struct conn *c, uint64_t now, int registered) {
    c->state = ST_ACTIVE;
    if (registered) set_events(t, c, EPOLLIN, EPOLL_CTL_MOD);
    else set_events(t, c, EPOLLIN, EPOLL_CTL_ADD);
    switch (opt.mode) {
    case M_PINGPONG:
    case M_PIPELINE:
        if (now < t_end) queue_msgs(c, opt.pipeline, now);
        break;
    case M_CONNECT:
    case M_IDLE:
        queue_msgs(c, 1, now);
        break;
    case M_BROADCAST:
        if (c->id < opt.senders && now < t_end)
            for (int i = 0; i < opt.pipeline; i++) queue_line(t, c, now);
        break;
    }
    return do_write(t, c);
}

#ifdef LOADGEN_TLS
/* One step of the handshake; its traffic starts once it is done. A failed
 * handshake closes the connection like a failed connect (-1). */
static int tls_handshake(struct thr *t, struct conn *c, uint64_t now, int registered) {
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        if (!atomic_exchange(&g_tls_info_set, 1))
            snprintf(g_tls_info, sizeof g_tls_info, "%s %s", SSL_get_version(c->ssl),
                     SSL_get_cipher_name(c->ssl));
        return transport_ready(t, c, now, registered);
    }
    uint32_t ev = 0;
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ: ev = EPOLLIN; break;
    case SSL_ERROR_WANT_WRITE: ev = EPOLLOUT; break;
    }
    if (ev == 0) {
        ERR_clear_error();
        t->st.err_tls++;
        close_conn(c);
        c->state = ST_DEAD;
        return -1;
    }
    set_events(t, c, ev, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
    return 0;
}
#endif

static const char WS_REQUEST[] =
    "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/* --ws: the transport is up; send the upgrade request (it fits any fresh
 * socket buffer) and wait for the answer. */
static int ws_begin(struct thr *t, struct conn *c, int registered) {
    ssize_t w = io_send(c, WS_REQUEST, sizeof WS_REQUEST - 1);
    if (w != (ssize_t)(sizeof WS_REQUEST - 1)) {
        count_error(t, w < 0 ? errno : EPROTO);
        return -1;
    }
    c->state = ST_WS;
    c->hs_len = 0;
    set_events(t, c, EPOLLIN, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
    return 0;
}

/* --ws: read the upgrade answer; the traffic starts after its blank line. */
static int ws_answer(struct thr *t, struct conn *c, uint64_t now) {
    for (;;) {
        ssize_t r = io_recv(c, c->hs + c->hs_len, sizeof c->hs - 1 - (size_t)c->hs_len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return 0;
        if (r <= 0) {
            count_error(t, r < 0 ? errno : ECONNRESET);
            return -1;
        }
        c->hs_len += (int)r;
        c->hs[c->hs_len] = 0;
        char *end = strstr(c->hs, "\r\n\r\n");
        if (end) {
            /* Nothing may follow the answer: the server speaks only when asked. */
            if (strncmp(c->hs, "HTTP/1.1 101", 12) != 0 || end + 4 != c->hs + c->hs_len) {
                t->st.err_protocol++;
                return -1;
            }
            return start_traffic(t, c, now, 1);
        }
        if (c->hs_len >= (int)sizeof c->hs - 1) {
            t->st.err_protocol++;
            return -1;
        }
    }
}

/* Over TLS the handshake is done: the upgrade (--ws), else the traffic. */
static int transport_ready(struct thr *t, struct conn *c, uint64_t now, int registered) {
    if (opt.ws) return ws_begin(t, c, registered);
    return start_traffic(t, c, now, registered);
}

/* The socket is connected: over TLS the handshake starts, else the traffic. */
static int connected(struct thr *t, struct conn *c, uint64_t now, int registered) {
#ifdef LOADGEN_TLS
    if (g_tls_ctx) {
        c->ssl = SSL_new(g_tls_ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) die("SSL_new");
        SSL_set_connect_state(c->ssl);
        c->state = ST_HANDSHAKE;
        return tls_handshake(t, c, now, registered);
    }
#endif
    return transport_ready(t, c, now, registered);
}

static int finish_connect(struct thr *t, struct conn *c, uint64_t now) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
        t->st.err_connect++;
        close_conn(c);
        c->state = ST_DEAD;
        return -1;
    }
    return connected(t, c, now, 1);
}

/* Begin (or restart) a connection; used by every mode. */
static void begin(struct thr *t, struct conn *c, uint64_t now) {
    c->t_begin = now;
    if (open_conn(t, c) < 0) return;
    if (c->state == ST_ACTIVE && connected(t, c, now, 0) < 0) {
        close_conn(c);
        c->state = ST_DEAD;
    }
}

/* One echo reply (S bytes) completed on c. */
static void echo_complete(struct thr *t, struct conn *c, uint64_t now) {
    uint64_t sent = c->ts[c->ts_head];
    c->ts_head = (c->ts_head + 1) % opt.pipeline;
    c->inflight--;
    if (in_window(now)) {
        t->st.msgs++;
        t->st.bytes += (uint64_t)opt.size;
        record(&t->st, now - sent);
    }
}

/* Handle a complete broadcast line. */
static void line_complete(struct thr *t, struct conn *c, const char *line, int len,
                          uint64_t now) {
    char *end;
    long sender = strtol(line, &end, 10);
    unsigned long long seq = strtoull(end, &end, 10);
    unsigned long long sent = strtoull(end, &end, 10);
    if (len != opt.size || sender < 0 || sender >= opt.senders || *end != ' ') {
        t->st.err_protocol++;
        return;
    }
    if ((int64_t)seq <= c->last_seq[sender]) t->st.out_of_order++;
    c->last_seq[sender] = (int64_t)seq;
    if (sender == c->id && c->inflight > 0) {
        c->inflight--;
        if (now < t_end) queue_line(t, c, now);
    }
    if (in_window(sent)) {
        t->st.delivered++;
        t->st.bytes += (uint64_t)opt.size;
        atomic_fetch_add_explicit(&g_delivered_window, 1, memory_order_relaxed);
        record(&t->st, now - sent);
    }
}

static void consume_lines(struct thr *t, struct conn *c, const char *buf, size_t n,
                          uint64_t now) {
    int cap = opt.size * 2;
    while (n > 0) {
        const char *nl = memchr(buf, '\n', n);
        size_t take = nl ? (size_t)(nl - buf) + 1 : n;
        if (c->llen + (int)take > cap) { /* an over-long line: count, drop */
            t->st.err_protocol++;
            c->llen = 0;
        } else {
            memcpy(c->lbuf + c->llen, buf, take);
            c->llen += (int)take;
        }
        if (nl) {
            line_complete(t, c, c->lbuf, c->llen, now);
            c->llen = 0;
        }
        buf += take;
        n -= take;
    }
}

/* A reply completed in connect/idle mode. */
static void cycle_complete(struct thr *t, struct conn *c, uint64_t now) {
    c->inflight = 0;
    if (opt.mode == M_CONNECT) {
        if (in_window(now)) {
            t->st.connects++;
            t->st.msgs++;
            t->st.bytes += (uint64_t)opt.size;
            record(&t->st, now - c->t_begin);
        }
        io_shutdown(c);
        close_conn(c);
        if (now < t_end) begin(t, c, now);
        return;
    }
    /* idle: keep it open, stop watching it */
    epoll_ctl(t->ep, EPOLL_CTL_DEL, c->fd, NULL);
    c->state = ST_IDLE;
    t->pending--;
    t->established++;
}

/* Read what is there; returns -1 if the connection ended (and was closed). */
static int do_read(struct thr *t, struct conn *c, uint64_t now) {
    for (;;) {
        ssize_t r = io_recv(c, t->rbuf, t->rbuf_len);
        if (r > 0) {
            if (opt.mode == M_BROADCAST) {
                consume_lines(t, c, t->rbuf, (size_t)r, now);
            } else {
                c->racc += (uint64_t)r;
                while (c->racc >= g_in && c->inflight > 0) {
                    c->racc -= g_in;
                    if (opt.mode == M_CONNECT || opt.mode == M_IDLE) {
                        cycle_complete(t, c, now);
                        return c->state == ST_IDLE ? 0 : -2;
                    }
                    echo_complete(t, c, now);
                    if (now < t_end) queue_msgs(c, 1, now);
                }
                if (c->racc >= g_in) { /* more came back than was sent */
                    t->st.err_protocol++;
                    c->racc = 0;
                }
            }
            if ((size_t)r < t->rbuf_len && !io_buffered(c)) break;
            continue;
        }
        if (r == 0) {
            if (c->inflight > 0 || c->racc > 0 || c->llen > 0) t->st.err_short++;
            else t->st.err_closed++; /* closed by the server between messages */
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        count_error(t, errno);
        return -1;
    }
    if (c->wleft > 0) return do_write(t, c);
    return 0;
}

/* After a failure: an idle slot is opened again later, a connect slot is
 * retried by the loop, an established connection reconnects at once while
 * the run goes on. A connect that failed leaves the connection dead. */
static void fail_and_retry(struct thr *t, struct conn *c, uint64_t now) {
    int connect_failed = c->state == ST_DEAD;
    close_conn(c);
    if (opt.mode == M_IDLE) {
        t->pending--;
        return;
    }
    if (connect_failed) {
        c->state = ST_DEAD;
        return;
    }
    if (now < t_end) begin(t, c, now);
}

static void handle_event(struct thr *t, struct conn *c, uint32_t ev) {
    uint64_t now = now_ns();
    if (c->state == ST_CONNECTING) {
        if (finish_connect(t, c, now) < 0) fail_and_retry(t, c, now);
        return;
    }
#ifdef LOADGEN_TLS
    if (c->state == ST_HANDSHAKE) {
        if (tls_handshake(t, c, now, 1) < 0) fail_and_retry(t, c, now);
        return;
    }
#endif
    if (c->state == ST_WS) {
        if (ws_answer(t, c, now) < 0) fail_and_retry(t, c, now);
        return;
    }
    if (c->state != ST_ACTIVE) return;
    int rc = 0;
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) rc = do_read(t, c, now);
    if (rc == -2) return; /* a connect cycle ended and restarted */
    if (rc == 0 && (ev & EPOLLOUT) && c->wleft > 0) rc = do_write(t, c);
    if (rc < 0) fail_and_retry(t, c, now);
}

static int epoll_timeout_ms(uint64_t now, uint64_t until) {
    if (now >= until) return 0;
    uint64_t ms = (until - now) / 1000000ull + 1;
    return ms > 50 ? 50 : (int)ms;
}

static int broadcast_drained(void) {
    unsigned long long sent = atomic_load(&g_sent_window);
    unsigned long long got = atomic_load(&g_delivered_window);
    return got >= sent * (unsigned long long)opt.conns;
}

static void *thread_main(void *arg) {
    struct thr *t = arg;
    struct epoll_event evs[256];
    uint64_t now = now_ns();
    if (opt.mode == M_IDLE) {
        while (t->established < t->nconns && !atomic_load(&g_stop)) {
            while (t->pending < opt.concurrency && t->established + t->pending < t->nconns) {
                struct conn *c = &t->conns[t->cursor];
                t->cursor = (t->cursor + 1) % t->nconns;
                if (c->state != ST_NONE && c->state != ST_DEAD) continue;
                t->pending++;
                begin(t, c, now_ns());
                if (c->state == ST_DEAD || c->state == ST_NONE) {
                    t->pending--;
                    c->state = ST_NONE;
                    break;
                }
            }
            now = now_ns();
            if (now >= t_end) break;
            int n = epoll_wait(t->ep, evs, 256, 50);
            for (int i = 0; i < n; i++) handle_event(t, evs[i].data.ptr, evs[i].events);
        }
        atomic_fetch_add(&g_idle_ready, 1);
        return NULL;
    }
    for (int i = 0; i < t->nconns; i++) begin(t, &t->conns[i], now);
    for (;;) {
        now = now_ns();
        if (atomic_load(&g_stop)) break;
        uint64_t until = t_end;
        if (now >= t_end) {
            if (opt.mode != M_BROADCAST || now >= t_drain_end || broadcast_drained()) break;
            until = t_drain_end;
        }
        int n = epoll_wait(t->ep, evs, 256, epoll_timeout_ms(now, until));
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) handle_event(t, evs[i].data.ptr, evs[i].events);
        /* connect mode: a slot whose connect failed retries here */
        if (opt.mode == M_CONNECT) {
            uint64_t t2 = now_ns();
            for (int i = 0; i < t->nconns && t2 < t_end; i++)
                if (t->conns[i].state == ST_DEAD) begin(t, &t->conns[i], t2);
        }
    }
    return NULL;
}

/* ---- setup ---- */

static void parse_addr(const char *addr) {
    memset(&g_sa, 0, sizeof g_sa);
    if (strncmp(addr, "unix:", 5) == 0 || addr[0] == '/') {
        const char *path = addr[0] == '/' ? addr : addr + 5;
        struct sockaddr_un *un = (struct sockaddr_un *)&g_sa;
        if (strlen(path) >= sizeof un->sun_path) {
            fprintf(stderr, "loadgen: socket path too long: %s\n", path);
            exit(2);
        }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, path);
        g_salen = sizeof *un;
        g_family = AF_UNIX;
        return;
    }
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host) {
        fprintf(stderr, "loadgen: expected HOST:PORT or unix:PATH, got %s\n", addr);
        exit(2);
    }
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    memcpy(host, h, hl);
    host[hl] = 0;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: %s: %s\n", addr, gai_strerror(rc));
        exit(2);
    }
    memcpy(&g_sa, res->ai_addr, res->ai_addrlen);
    g_salen = res->ai_addrlen;
    g_family = res->ai_family;
    if (g_family == AF_INET &&
        (ntohl(((struct sockaddr_in *)res->ai_addr)->sin_addr.s_addr) >> 24) == 127)
        g_spread_sources = 1;
    freeaddrinfo(res);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void on_signal(int sig) {
    (void)sig;
    atomic_store(&g_stop, 1);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --addr HOST:PORT|unix:PATH [--mode pingpong|pipeline|connect|"
            "broadcast|idle]\n"
            "               [-c CONNS] [-s SIZE] [-p INFLIGHT] [-t THREADS] [-d SECONDS]\n"
            "               [-w WARMUP] [-k SENDERS] [--drain SECONDS] [--concurrency N] [-q]\n"
            "               [--tls]   (loadgen_tls: a build with -DLOADGEN_TLS)\n"
            "               [--ws]    (WebSocket: binary frames; not with broadcast)\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static struct option lo[] = {
        {"addr", required_argument, 0, 'a'},     {"mode", required_argument, 0, 'm'},
        {"connections", required_argument, 0, 'c'}, {"size", required_argument, 0, 's'},
        {"pipeline", required_argument, 0, 'p'}, {"threads", required_argument, 0, 't'},
        {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'w'},
        {"senders", required_argument, 0, 'k'},  {"drain", required_argument, 0, 'D'},
        {"concurrency", required_argument, 0, 'C'}, {"quiet", no_argument, 0, 'q'},
        {"tls", no_argument, 0, 'T'},            {"help", no_argument, 0, 'h'},
        {"ws", no_argument, 0, 'W'},
        {0, 0, 0, 0}};
    int ch, pipeline_set = 0;
    while ((ch = getopt_long(argc, argv, "a:m:c:s:p:t:d:w:k:qh", lo, NULL)) != -1) {
        switch (ch) {
        case 'a': opt.addr = optarg; break;
        case 'm': {
            int found = 0;
            for (int i = 0; i <= M_IDLE; i++)
                if (strcmp(optarg, mode_names[i]) == 0) { opt.mode = i; found = 1; }
            if (!found) usage();
            break;
        }
        case 'c': opt.conns = atoi(optarg); break;
        case 's': opt.size = atoi(optarg); break;
        case 'p': opt.pipeline = atoi(optarg); pipeline_set = 1; break;
        case 't': opt.threads = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'k': opt.senders = atoi(optarg); break;
        case 'D': opt.drain = atof(optarg); break;
        case 'C': opt.concurrency = atoi(optarg); break;
        case 'q': opt.quiet = 1; break;
        case 'T': opt.tls = 1; break;
        case 'W': opt.ws = 1; break;
        default: usage();
        }
    }
    if (!opt.addr && optind < argc) opt.addr = argv[optind];
    if (!opt.addr) usage();
    if (opt.mode == M_PIPELINE && !pipeline_set) opt.pipeline = 16;
    if (opt.mode == M_PINGPONG || opt.mode == M_CONNECT || opt.mode == M_IDLE) opt.pipeline = 1;
    if (opt.conns < 1 || opt.size < 1 || opt.pipeline < 1 || opt.threads < 1 ||
        opt.duration <= 0 || opt.warmup < 0 || opt.concurrency < 1) usage();
    if (opt.threads > opt.conns) opt.threads = opt.conns;
#ifndef LOADGEN_TLS
    if (opt.tls) {
        fprintf(stderr, "loadgen: built without TLS; --tls needs a build with -DLOADGEN_TLS "
                        "linked with -lssl -lcrypto (bench/build/loadgen_tls)\n");
        exit(2);
    }
#endif
    uint64_t head = opt.size < 126 ? 2 : opt.size < 65536 ? 4 : 10;
    g_out = opt.ws ? head + 4 + (uint64_t)opt.size : (uint64_t)opt.size;
    g_in = opt.ws ? head + (uint64_t)opt.size : (uint64_t)opt.size;
    if (opt.ws && opt.mode == M_BROADCAST) usage();
    if (opt.mode == M_BROADCAST) {
        if (opt.size < 48) {
            fprintf(stderr, "loadgen: broadcast messages need --size >= 48\n");
            exit(2);
        }
        if (opt.senders < 1 || opt.senders > opt.conns) usage();
    }
}

#ifdef LOADGEN_TLS
/* A client context: no certificate verification, no session resumption (every
 * connection a full handshake), partial writes, read-ahead. */
static void setup_tls(void) {
    g_tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!g_tls_ctx) die("SSL_CTX_new");
    SSL_CTX_set_verify(g_tls_ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(g_tls_ctx, SSL_SESS_CACHE_OFF);
    /* A retried SSL_write passes the same bytes, possibly more of them. */
    SSL_CTX_set_mode(g_tls_ctx,
                     SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(g_tls_ctx, 1);
    SSL_CTX_set_options(g_tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
}
#endif

static void setup_thread(struct thr *t, int index) {
    memset(t, 0, sizeof *t);
    t->index = index;
    t->ep = epoll_create1(EPOLL_CLOEXEC);
    if (t->ep < 0) die("epoll_create1");
    t->nconns = opt.conns / opt.threads + (index < opt.conns % opt.threads);
    t->conns = calloc((size_t)t->nconns, sizeof *t->conns);
    size_t s = (size_t)opt.size;
    size_t m = (size_t)g_out; /* one message on the wire */
    size_t reps = (size_t)opt.pipeline + 65536 / m + 2;
    t->sbuf_len = m * reps;
    t->sbuf = malloc(t->sbuf_len);
    size_t head = m - s; /* --ws: the frame header, then the zero mask key */
    for (size_t r = 0; r < reps; r++) {
        char *p = t->sbuf + r * m;
        if (head) {
            p[0] = (char)0x82;
            if (s < 126) {
                p[1] = (char)(0x80 | s);
            } else if (s < 65536) {
                p[1] = (char)(0x80 | 126);
                p[2] = (char)(s >> 8);
                p[3] = (char)s;
            } else {
                p[1] = (char)(0x80 | 127);
                for (int k = 0; k < 8; k++) p[2 + k] = (char)((uint64_t)s >> (56 - 8 * k));
            }
            memset(p + head - 4, 0, 4);
        }
        for (size_t i = 0; i < s; i++) p[head + i] = (i == s - 1) ? '\n' : 'x';
    }
    t->rbuf_len = 65536;
    t->rbuf = malloc(t->rbuf_len);
    for (int i = 0; i < t->nconns; i++) {
        struct conn *c = &t->conns[i];
        c->fd = -1;
        c->id = index + i * opt.threads; /* round robin: senders spread over threads */
        c->ts = calloc((size_t)opt.pipeline, sizeof *c->ts);
        if (opt.mode == M_BROADCAST) {
            if (c->id < opt.senders) c->wbuf = malloc(s * (size_t)opt.pipeline);
            c->lbuf = malloc((size_t)opt.size * 2);
            c->last_seq = malloc(sizeof *c->last_seq * (size_t)opt.senders);
            for (int k = 0; k < opt.senders; k++) c->last_seq[k] = -1;
        }
    }
}

static void sleep_until(uint64_t when) {
    while (!atomic_load(&g_stop)) {
        uint64_t now = now_ns();
        if (now >= when) return;
        uint64_t d = when - now;
        if (d > 50000000ull) d = 50000000ull;
        struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void report(struct thr *ts, double loadgen_cpu) {
    static struct stats s;
    memset(&s, 0, sizeof s);
    for (int i = 0; i < opt.threads; i++) {
        struct stats *x = &ts[i].st;
        s.msgs += x->msgs; s.bytes += x->bytes; s.connects += x->connects;
        s.err_connect += x->err_connect; s.err_reset += x->err_reset;
        s.err_short += x->err_short; s.err_other += x->err_other;
        s.err_closed += x->err_closed; s.err_protocol += x->err_protocol;
        s.err_tls += x->err_tls;
        s.sent += x->sent; s.delivered += x->delivered; s.out_of_order += x->out_of_order;
        s.nlat += x->nlat;
        if (x->max_ns > s.max_ns) s.max_ns = x->max_ns;
        for (int b = 0; b < HBUCKETS; b++) s.hist[b] += x->hist[b];
    }
    if (opt.mode == M_BROADCAST) s.msgs = s.delivered;
    double d = opt.duration;
    double mps = (double)s.msgs / d, mbs = (double)s.bytes / d / 1e6;
    double p50 = percentile_us(&s, 0.50), p99 = percentile_us(&s, 0.99);
    double p999 = percentile_us(&s, 0.999), mx = (double)s.max_ns / 1000.0;
    uint64_t errors = s.err_connect + s.err_reset + s.err_short + s.err_closed +
                      s.err_protocol + s.err_other + s.err_tls;
    char tls[160] = "null"; /* the JSON value: "PROTOCOL CIPHER" of the first handshake */
#ifdef LOADGEN_TLS
    if (atomic_load(&g_tls_info_set)) snprintf(tls, sizeof tls, "\"%s\"", g_tls_info);
#endif
    unsigned long long expected = (unsigned long long)s.sent * (unsigned long long)opt.conns;
    long long missing = opt.mode == M_BROADCAST ? (long long)expected - (long long)s.delivered : 0;
    if (!opt.quiet) {
        printf("mode %s  addr %s  connections %d  size %d  in-flight %d  threads %d\n",
               mode_names[opt.mode], opt.addr, opt.conns, opt.size, opt.pipeline, opt.threads);
        printf("window %.2f s after %.2f s warm-up\n", d, opt.warmup);
        if (opt.mode == M_CONNECT)
            printf("connections %llu  %.1f conn/s\n", (unsigned long long)s.connects,
                   (double)s.connects / d);
        if (opt.mode == M_BROADCAST)
            printf("sent %llu (%.1f/s)  delivered %llu of %llu expected  missing %lld  "
                   "out-of-order %llu\n",
                   (unsigned long long)s.sent, (double)s.sent / d,
                   (unsigned long long)s.delivered, expected, missing,
                   (unsigned long long)s.out_of_order);
        printf("messages %llu  %.1f msg/s  %.2f MB/s\n", (unsigned long long)s.msgs, mps, mbs);
        printf("latency us  p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", p50, p99, p999, mx);
        printf("errors %llu  connect %llu  reset %llu  short-read %llu  closed %llu  "
               "protocol %llu  other %llu  tls %llu\n",
               (unsigned long long)errors, (unsigned long long)s.err_connect,
               (unsigned long long)s.err_reset, (unsigned long long)s.err_short,
               (unsigned long long)s.err_closed, (unsigned long long)s.err_protocol,
               (unsigned long long)s.err_other, (unsigned long long)s.err_tls);
        if (strcmp(tls, "null") != 0) printf("tls %s\n", tls);
    }
    printf("{\"mode\":\"%s\",\"addr\":\"%s\",\"connections\":%d,\"size\":%d,\"pipeline\":%d,"
           "\"threads\":%d,\"duration\":%.3f,\"warmup\":%.3f,\"messages\":%llu,"
           "\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f,\"connects\":%llu,\"conns_per_s\":%.1f,"
           "\"lat_us\":{\"p50\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f},"
           "\"errors\":{\"connect\":%llu,\"reset\":%llu,\"short_read\":%llu,\"closed\":%llu,"
           "\"protocol\":%llu,\"other\":%llu,\"tls\":%llu},"
           "\"errors_total\":%llu,\"senders\":%d,\"sent\":%llu,\"delivered\":%llu,"
           "\"expected\":%llu,\"missing\":%lld,\"out_of_order\":%llu,\"loadgen_cpu_s\":%.3f,"
           "\"tls\":%s}\n",
           mode_names[opt.mode], opt.addr, opt.conns, opt.size, opt.pipeline, opt.threads, d,
           opt.warmup, (unsigned long long)s.msgs, mps, mbs, (unsigned long long)s.connects,
           (double)s.connects / d, p50, p99, p999, mx, (unsigned long long)s.err_connect,
           (unsigned long long)s.err_reset, (unsigned long long)s.err_short,
           (unsigned long long)s.err_closed, (unsigned long long)s.err_protocol,
           (unsigned long long)s.err_other, (unsigned long long)s.err_tls,
           (unsigned long long)errors, opt.mode == M_BROADCAST ? opt.senders : 0,
           (unsigned long long)s.sent, (unsigned long long)s.delivered,
           opt.mode == M_BROADCAST ? expected : 0ull, missing, (unsigned long long)s.out_of_order,
           loadgen_cpu, tls);
    fflush(stdout);
}

static void idle_report(struct thr *ts) {
    int total = 0;
    uint64_t errors = 0;
    for (int i = 0; i < opt.threads; i++) {
        total += ts[i].established;
        errors += ts[i].st.err_connect + ts[i].st.err_reset + ts[i].st.err_short +
                  ts[i].st.err_closed + ts[i].st.err_protocol + ts[i].st.err_other +
                  ts[i].st.err_tls;
    }
    printf("# phase idle-ready {\"mode\":\"idle\",\"connections\":%d,\"established\":%d,"
           "\"errors_total\":%llu,\"setup_s\":%.3f}\n",
           opt.conns, total, (unsigned long long)errors,
           (double)(now_ns() - t_start) / 1e9);
    fflush(stdout);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    parse_addr(opt.addr);
    raise_nofile();
#ifdef LOADGEN_TLS
    if (opt.tls) setup_tls();
#endif
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct thr *ts = calloc((size_t)opt.threads, sizeof *ts);
    for (int i = 0; i < opt.threads; i++) setup_thread(&ts[i], i);
    pthread_t *tids = calloc((size_t)opt.threads, sizeof *tids);
    double cpu0 = cpu_seconds();
    t_start = now_ns();
    t_measure = t_start + (uint64_t)(opt.warmup * 1e9);
    t_end = t_measure + (uint64_t)(opt.duration * 1e9);
    t_drain_end = t_end + (uint64_t)(opt.drain * 1e9);
    if (opt.mode == M_IDLE) { /* the duration bounds both the setup and the hold */
        t_measure = t_start;
        t_end = t_start + (uint64_t)(opt.duration * 1e9);
    }
    for (int i = 0; i < opt.threads; i++)
        if (pthread_create(&tids[i], NULL, thread_main, &ts[i]) != 0) die("pthread_create");

    if (opt.mode == M_IDLE) {
        for (int i = 0; i < opt.threads; i++) pthread_join(tids[i], NULL);
        idle_report(ts);
        sleep_until(t_end);
        return 0;
    }
    sleep_until(t_measure);
    printf("# phase measure\n");
    fflush(stdout);
    for (int i = 0; i < opt.threads; i++) pthread_join(tids[i], NULL);
    printf("# phase done\n");
    fflush(stdout);
    report(ts, cpu_seconds() - cpu0);
    return 0;
}
