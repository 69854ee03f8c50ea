/*
 * The subscriber swarm: N subscribers on raw non-blocking sockets, one epoll loop, one process.
 *
 * It must never be the bottleneck of a benchmark, so it is C: every WebSocket frame and
 * every msgpack value is parsed (or, in SSE mode, every `data:` line), and each
 * subscriber's offsets are checked (consecutive, no gap, no duplicate). Latency is
 * taken against the `ts` field of the event data: seconds of CLOCK_MONOTONIC, the
 * clock Python's time.monotonic() reads, set by the emitter just before it emits.
 *
 * Protocol spoken (the same for tokenfan and every peer in bench/peers/):
 *   ws:  GET PATH with an Upgrade, then a masked binary frame {"t":"sub","id":1,"ch":CH};
 *        the server answers {"t":"ok",...,"o":TOP} and then sends {"t":"ev",...,"o":N} frames.
 *   sse: GET PATH?ch=CH; the server answers 200 text/event-stream, then a line
 *        `data: {"t":"ok","o":TOP}` and one `data: {"t":"ev",...,"o":N,...}` line per event.
 *
 * Usage: swarm HOST PORT[,PORT...] MODE PATH SUBS CHANNELS PREFIX TOKENS TIMEOUT_S SLOW_SHARE SLOW_MS RCVBUF [CHURN]
 *   subscriber i subscribes to channel PREFIX<i % CHANNELS>; TOKENS events are expected on each.
 *   CHURN (per second): while the stream runs, that many subscribers a second leave and are
 *   replaced by a new subscriber to the same channel, who expects everything after its ok.
 *   It prints "READY n" once every subscriber is subscribed, runs until every subscriber
 *   has its TOKENS events, TIMEOUT_S passes, or a line arrives on stdin, then prints one
 *   JSON object with the counts and latency quantiles.
 * Bounded: every loop ends by the deadline; only the given host is contacted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    int mode_sse;
    unsigned char *buf;
    size_t len, cap;
    uint64_t next;        /* offset the next event must carry */
    uint64_t start;       /* top offset its ok reported */
    uint64_t delivered, lost, ooo, dups;
    int closed, slow, paused, got_ok;
    double resume_at;
} sub_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double *lat = NULL;
static size_t nlat = 0, caplat = 0;
/* The same, for subscribers that never pause: what slow readers cost everyone else. */
static double *hlat = NULL;
static size_t nhlat = 0, caphlat = 0;
static uint64_t disconnected = 0;

static void push_sample(double **arr, size_t *n, size_t *cap, double ms) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1 << 20;
        *arr = realloc(*arr, *cap * sizeof(double));
        if (!*arr) { perror("realloc"); exit(2); }
    }
    (*arr)[(*n)++] = ms;
}

/* ---- minimal msgpack reader ------------------------------------------------ */

typedef struct { const unsigned char *p, *end; } rd_t;

static int need(rd_t *r, size_t n) { return (size_t)(r->end - r->p) >= n; }
static uint64_t be(const unsigned char *p, int n) { uint64_t v = 0; for (int i = 0; i < n; i++) v = (v << 8) | p[i]; return v; }

/* Skip one value; 0 on success, -1 if incomplete or invalid. */
static int mp_skip(rd_t *r, int depth) {
    if (depth > 64 || !need(r, 1)) return -1;
    unsigned char c = *r->p++;
    uint64_t n = 0;
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) return 0;
    if ((c & 0xe0) == 0xa0) { n = c & 0x1f; goto bytes; }
    if ((c & 0xf0) == 0x90) { n = c & 0x0f; goto array; }
    if ((c & 0xf0) == 0x80) { n = (c & 0x0f) * 2ull; goto array; }
    switch (c) {
    case 0xcc: case 0xd0: n = 1; goto bytes;
    case 0xcd: case 0xd1: n = 2; goto bytes;
    case 0xca: case 0xce: case 0xd2: n = 4; goto bytes;
    case 0xcb: case 0xcf: case 0xd3: n = 8; goto bytes;
    case 0xc4: case 0xd9: if (!need(r, 1)) return -1; n = be(r->p, 1); r->p += 1; goto bytes;
    case 0xc5: case 0xda: if (!need(r, 2)) return -1; n = be(r->p, 2); r->p += 2; goto bytes;
    case 0xc6: case 0xdb: if (!need(r, 4)) return -1; n = be(r->p, 4); r->p += 4; goto bytes;
    case 0xdc: if (!need(r, 2)) return -1; n = be(r->p, 2); r->p += 2; goto array;
    case 0xdd: if (!need(r, 4)) return -1; n = be(r->p, 4); r->p += 4; goto array;
    case 0xde: if (!need(r, 2)) return -1; n = be(r->p, 2) * 2; r->p += 2; goto array;
    case 0xdf: if (!need(r, 4)) return -1; n = be(r->p, 4) * 2; r->p += 4; goto array;
    case 0xd4: n = 2; goto bytes;
    case 0xd5: n = 3; goto bytes;
    case 0xd6: n = 5; goto bytes;
    case 0xd7: n = 9; goto bytes;
    case 0xd8: n = 17; goto bytes;
    case 0xc7: if (!need(r, 1)) return -1; n = be(r->p, 1) + 1; r->p += 1; goto bytes;
    case 0xc8: if (!need(r, 2)) return -1; n = be(r->p, 2) + 1; r->p += 2; goto bytes;
    case 0xc9: if (!need(r, 4)) return -1; n = be(r->p, 4) + 1; r->p += 4; goto bytes;
    default: return -1;
    }
bytes:
    if (!need(r, n)) return -1;
    r->p += n;
    return 0;
array:
    for (uint64_t i = 0; i < n; i++) if (mp_skip(r, depth + 1)) return -1;
    return 0;
}

static int mp_str(rd_t *r, const unsigned char **s, uint32_t *n) {
    if (!need(r, 1)) return -1;
    unsigned char c = *r->p;
    if ((c & 0xe0) == 0xa0) { *n = c & 0x1f; r->p += 1; }
    else if (c == 0xd9 && need(r, 2)) { *n = r->p[1]; r->p += 2; }
    else if (c == 0xda && need(r, 3)) { *n = (uint32_t)be(r->p + 1, 2); r->p += 3; }
    else return -1;
    if (!need(r, *n)) return -1;
    *s = r->p;
    r->p += *n;
    return 0;
}

static int mp_map(rd_t *r, uint32_t *n) {
    if (!need(r, 1)) return -1;
    unsigned char c = *r->p;
    if ((c & 0xf0) == 0x80) { *n = c & 0x0f; r->p += 1; return 0; }
    if (c == 0xde && need(r, 3)) { *n = (uint32_t)be(r->p + 1, 2); r->p += 3; return 0; }
    return -1;
}

static int mp_uint(rd_t *r, uint64_t *v) {
    if (!need(r, 1)) return -1;
    unsigned char c = *r->p;
    if (c <= 0x7f) { *v = c; r->p += 1; return 0; }
    int n = c == 0xcc ? 1 : c == 0xcd ? 2 : c == 0xce ? 4 : c == 0xcf ? 8 : 0;
    if (!n || !need(r, 1 + n)) return -1;
    *v = be(r->p + 1, n);
    r->p += 1 + n;
    return 0;
}

static int mp_float(rd_t *r, double *v) {
    if (!need(r, 1)) return -1;
    unsigned char c = *r->p;
    if (c == 0xcb && need(r, 9)) { uint64_t b = be(r->p + 1, 8); memcpy(v, &b, 8); r->p += 9; return 0; }
    if (c == 0xca && need(r, 5)) { uint32_t b = (uint32_t)be(r->p + 1, 4); float f; memcpy(&f, &b, 4); *v = f; r->p += 5; return 0; }
    return mp_skip(r, 0) ? -1 : 1;
}

#define KEY(s, n, lit) ((n) == sizeof(lit) - 1 && memcmp((s), (lit), (n)) == 0)

/* ---- event accounting ------------------------------------------------------- */

static void on_event(sub_t *s, uint64_t o, uint64_t o0, double ts, double t) {
    if (o0 == s->next) {
        s->delivered += o - o0 + 1;
        s->next = o + 1;
    } else if (o0 > s->next) {
        s->lost += o0 - s->next;
        s->delivered += o - o0 + 1;
        s->next = o + 1;
    } else if (o < s->next) {
        s->dups++;
    } else {
        s->ooo++;
    }
    if (ts > 0) {
        push_sample(&lat, &nlat, &caplat, (t - ts) * 1000.0);
        if (!s->slow) push_sample(&hlat, &nhlat, &caphlat, (t - ts) * 1000.0);
    }
}

/* Parse one msgpack frame (a map); return bytes used, 0 if incomplete, -1 if invalid. */
static long parse_frame(sub_t *s, const unsigned char *p, size_t len, double t) {
    rd_t r = {p, p + len};
    uint32_t n;
    if (mp_map(&r, &n)) return need(&r, 1) ? -1 : 0;
    char type[8] = {0};
    uint64_t o = 0, o0 = UINT64_MAX;
    double ts = 0;
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *k; uint32_t kn;
        if (mp_str(&r, &k, &kn)) return -1;
        if (KEY(k, kn, "t")) {
            const unsigned char *v; uint32_t vn;
            if (mp_str(&r, &v, &vn)) return -1;
            memcpy(type, v, vn < 7 ? vn : 7);
        } else if (KEY(k, kn, "o")) {
            if (mp_uint(&r, &o)) return -1;
        } else if (KEY(k, kn, "o0")) {
            if (mp_uint(&r, &o0)) return -1;
        } else if (KEY(k, kn, "d") && need(&r, 1) && (((*r.p) & 0xf0) == 0x80 || *r.p == 0xde)) {
            uint32_t dn;
            if (mp_map(&r, &dn)) return -1;
            for (uint32_t j = 0; j < dn; j++) {
                const unsigned char *dk; uint32_t dkn;
                if (mp_str(&r, &dk, &dkn)) { if (mp_skip(&r, 1) || mp_skip(&r, 1)) return -1; continue; }
                if (KEY(dk, dkn, "ts")) { if (mp_float(&r, &ts) < 0) return -1; }
                else if (mp_skip(&r, 1)) return -1;
            }
        } else if (mp_skip(&r, 0)) return -1;
    }
    if (!strcmp(type, "ev")) on_event(s, o, o0 == UINT64_MAX ? o : o0, ts, t);
    else if (!strcmp(type, "ok") && !s->got_ok) { s->got_ok = 1; s->next = o + 1; s->start = o; }
    return r.p - p;
}

/* ---- sockets ------------------------------------------------------------------ */

static const char *host;
/* PORT may list several ports (comma-separated: brokers of one cluster); subscribers take
   them in turn. */
static int ports[64], nports, next_port;

static void masked_frame(unsigned char opcode, const unsigned char *payload, size_t n, unsigned char *out, size_t *outlen) {
    size_t h = 0;
    out[h++] = 0x80 | opcode;
    if (n < 126) out[h++] = 0x80 | n;
    else { out[h++] = 0x80 | 126; out[h++] = n >> 8; out[h++] = n & 0xff; }
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    memcpy(out + h, mask, 4); h += 4;
    for (size_t i = 0; i < n; i++) out[h + i] = payload[i] ^ mask[i % 4];
    *outlen = h + n;
}

static void send_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EAGAIN || errno == EINTR) { usleep(100); continue; } return; }
        p += w; n -= w;
    }
}

static int open_sub(sub_t *s, int mode_sse, const char *path, const char *channel, int rcvbuf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int port = ports[next_port++ % nports];
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
    char req[1024];
    unsigned char frame[600];
    size_t fl = 0;
    int n;
    if (mode_sse) {
        n = snprintf(req, sizeof req, "GET %s?ch=%s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n\r\n",
                     path, channel, host, port);
        send_all(fd, req, n);
    } else {
        n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dG9rZW5mYW4tYmVuY2ghIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port);
        unsigned char payload[512];
        size_t cl = strlen(channel), pl = 0;
        /* {"t":"sub","id":1,"ch":CHANNEL} */
        payload[pl++] = 0x83;
        payload[pl++] = 0xa1; payload[pl++] = 't';
        payload[pl++] = 0xa3; memcpy(payload + pl, "sub", 3); pl += 3;
        payload[pl++] = 0xa2; memcpy(payload + pl, "id", 2); pl += 2;
        payload[pl++] = 0x01;
        payload[pl++] = 0xa2; memcpy(payload + pl, "ch", 2); pl += 2;
        payload[pl++] = 0xd9; payload[pl++] = (unsigned char)cl; memcpy(payload + pl, channel, cl); pl += cl;
        masked_frame(0x2, payload, pl, frame, &fl);
        send_all(fd, req, n);  /* the sub frame follows the 101: some servers drop early data */
    }
    /* Read the HTTP head, blocking (bounded by a receive timeout). */
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    s->cap = 65536;
    s->buf = malloc(s->cap);
    s->len = 0;
    for (;;) {
        ssize_t r = recv(fd, s->buf + s->len, s->cap - s->len, 0);
        if (r <= 0) { close(fd); return -1; }
        s->len += r;
        unsigned char *end = memmem(s->buf, s->len, "\r\n\r\n", 4);
        if (end) {
            int ok = memmem(s->buf, end - s->buf, mode_sse ? " 200" : " 101", 4) != NULL;
            size_t head = end + 4 - s->buf;
            memmove(s->buf, s->buf + head, s->len - head);
            s->len -= head;
            if (!ok) { close(fd); return -1; }
            if (fl) send_all(fd, frame, fl);
            break;
        }
        if (s->len == s->cap) { close(fd); return -1; }
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    s->fd = fd;
    s->mode_sse = mode_sse;
    s->next = 1;
    return 0;
}

static void grow(sub_t *s, size_t extra) {
    if (s->len + extra <= s->cap) return;
    while (s->len + extra > s->cap) s->cap *= 2;
    s->buf = realloc(s->buf, s->cap);
    if (!s->buf) { perror("realloc"); exit(2); }
}

static void drop(int ep, sub_t *s) {
    if (s->closed) return;
    s->closed = 1;
    disconnected++;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
}

/* Consume what is buffered: whole WebSocket frames, or whole SSE lines. */
static void consume(int ep, sub_t *s, double t) {
    size_t pos = 0;
    if (s->mode_sse) {
        for (;;) {
            unsigned char *nl = memchr(s->buf + pos, '\n', s->len - pos);
            if (!nl) break;
            size_t n = nl - (s->buf + pos);
            if (n > 6 && memcmp(s->buf + pos, "data: ", 6) == 0) {
                char line[4096];
                size_t m = n < sizeof line - 1 ? n : sizeof line - 1;
                memcpy(line, s->buf + pos, m);
                line[m] = 0;
                char *q;
                uint64_t o = 0, o0;
                double ts = 0;
                if ((q = strstr(line, "\"o\":"))) o = strtoull(q + 4, NULL, 10);
                o0 = o;
                if ((q = strstr(line, "\"o0\":"))) o0 = strtoull(q + 5, NULL, 10);
                if ((q = strstr(line, "\"ts\":"))) ts = strtod(q + 5, NULL);
                if (strstr(line, "\"t\":\"ev\"") || strstr(line, "\"t\": \"ev\"")) on_event(s, o, o0, ts, t);
                else if (!s->got_ok) { s->got_ok = 1; s->next = o + 1; s->start = o; }
            }
            pos += n + 1;
        }
    } else {
        while (s->len - pos >= 2) {
            unsigned char *f = s->buf + pos;
            uint64_t n = f[1] & 0x7f;
            size_t h = 2;
            if (n == 126) { if (s->len - pos < 4) break; n = be(f + 2, 2); h = 4; }
            else if (n == 127) { if (s->len - pos < 10) break; n = be(f + 2, 8); h = 10; }
            if (s->len - pos < h + n) break;
            int opcode = f[0] & 0x0f;
            if (opcode == 2) {
                size_t at = 0;
                while (at < n) {
                    long used = parse_frame(s, f + h + at, n - at, t);
                    if (used <= 0) { fprintf(stderr, "swarm: bad msgpack from server\n"); drop(ep, s); return; }
                    at += used;
                }
            } else if (opcode == 8) {
                drop(ep, s);
                return;
            } else if (opcode == 9) {
                unsigned char pong[140]; size_t pl;
                masked_frame(0xA, f + h, n < 125 ? n : 125, pong, &pl);
                send_all(s->fd, pong, pl);
            }
            pos += h + n;
        }
    }
    memmove(s->buf, s->buf + pos, s->len - pos);
    s->len -= pos;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 13 && argc != 14) {
        fprintf(stderr, "usage: swarm HOST PORT[,PORT...] MODE PATH SUBS CHANNELS PREFIX TOKENS TIMEOUT_S SLOW_SHARE SLOW_MS RCVBUF [CHURN]\n");
        return 2;
    }
    host = argv[1];
    for (char *p = argv[2]; *p && nports < 64; nports++) {
        ports[nports] = (int)strtol(p, &p, 10);
        if (*p == ',') p++;
    }
    if (nports < 1) { fprintf(stderr, "swarm: PORT must be a port or a comma-separated list\n"); return 2; }
    int sse = strcmp(argv[3], "sse") == 0;
    const char *path = argv[4];
    int nsubs = atoi(argv[5]), nch = atoi(argv[6]);
    const char *prefix = argv[7];
    uint64_t tokens = strtoull(argv[8], NULL, 10);
    double timeout = atof(argv[9]), slow_share = atof(argv[10]), slow_ms = atof(argv[11]);
    int rcvbuf = atoi(argv[12]);
    double churn = argc == 14 ? atof(argv[13]) : 0;
    uint64_t left_delivered = 0, left_lost = 0, left_ooo = 0, left_dups = 0, churned = 0;
    if (nsubs < 1 || nch < 1) { fprintf(stderr, "swarm: SUBS and CHANNELS must be positive\n"); return 2; }

    sub_t *subs = calloc(nsubs, sizeof(sub_t));
    int ep = epoll_create1(0);
    int slow_every = slow_share > 0 ? (int)(1.0 / slow_share + 0.5) : 0;
    double connect_deadline = now_s() + timeout;
    for (int i = 0; i < nsubs; i++) {
        char ch[256];
        snprintf(ch, sizeof ch, "%s%d", prefix, i % nch);
        int tries = 0;
        while (open_sub(&subs[i], sse, path, ch, rcvbuf) < 0) {
            if (++tries > 50 || now_s() > connect_deadline) { fprintf(stderr, "swarm: cannot connect subscriber %d\n", i); return 1; }
            usleep(20000);
        }
        subs[i].slow = slow_every > 0 && i % slow_every == 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev);
        consume(ep, &subs[i], now_s());  /* the ok may have come with the handshake reply */
    }
    /* Wait until every subscriber has its ok (the server's answer to sub). */
    int ready = 0;
    while (ready < nsubs && now_s() < connect_deadline) {
        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            sub_t *s = &subs[evs[k].data.u32];
            grow(s, 65536);
            ssize_t r = recv(s->fd, s->buf + s->len, s->cap - s->len, 0);
            if (r > 0) { s->len += r; consume(ep, s, now_s()); }
            else if (r == 0 || (errno != EAGAIN && errno != EINTR)) drop(ep, s);
        }
        ready = 0;
        for (int i = 0; i < nsubs; i++) ready += subs[i].got_ok || subs[i].closed;
    }
    for (int i = 0; i < nsubs; i++) {
        if (!subs[i].got_ok) { fprintf(stderr, "swarm: subscriber %d got no ok\n", i); return 1; }
    }
    printf("READY %d\n", nsubs);
    fflush(stdout);
    struct epoll_event in = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &in);

    double deadline = now_s() + timeout;
    double next_churn = churn > 0 ? now_s() + 1.0 / churn : 0;
    int churn_index = 0;
    int stop = 0;
    while (!stop && now_s() < deadline) {
        struct epoll_event evs[512];
        int n = epoll_wait(ep, evs, 512, 5);
        double t = now_s();
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u32 == UINT32_MAX) { stop = 1; continue; }
            sub_t *s = &subs[evs[k].data.u32];
            if (s->closed || s->paused) continue;
            for (;;) {
                grow(s, 65536);
                ssize_t r = recv(s->fd, s->buf + s->len, s->cap - s->len, 0);
                if (r > 0) { s->len += r; if ((size_t)r < 65536) break; continue; }
                if (r == 0 || (errno != EAGAIN && errno != EINTR)) { drop(ep, s); }
                break;
            }
            if (!s->closed) consume(ep, s, t);
            if (!s->closed && s->slow && s->delivered > 0 && s->resume_at == 0) {
                /* A slow subscriber stops reading for a while after its first event. */
                s->paused = 1;
                s->resume_at = t + slow_ms / 1000.0;
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
            }
        }
        if (churn > 0 && t >= next_churn) {
            /* One subscriber leaves; a new one takes its place on the same channel. */
            next_churn += 1.0 / churn;
            int j = churn_index++ % nsubs;
            sub_t *s = &subs[j];
            if (!s->closed && !s->paused && !s->slow && s->delivered > 0 && s->next <= tokens) {
                left_delivered += s->delivered; left_lost += s->lost; left_ooo += s->ooo; left_dups += s->dups;
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                close(s->fd);
                free(s->buf);
                memset(s, 0, sizeof *s);
                char ch[256];
                snprintf(ch, sizeof ch, "%s%d", prefix, j % nch);
                if (open_sub(s, sse, path, ch, rcvbuf) < 0) { fprintf(stderr, "swarm: churn reconnect failed\n"); return 1; }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)j};
                epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
                consume(ep, s, now_s());
                churned++;
            }
        }
        int done = 1;
        for (int i = 0; i < nsubs; i++) {
            sub_t *s = &subs[i];
            if (s->paused && t >= s->resume_at) {
                s->paused = 0;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                if (!s->closed) epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
            }
            if (!s->closed && (!s->got_ok || s->next <= tokens)) done = 0;
        }
        if (done && tokens > 0) stop = 1;
    }
    /* What each subscription should have got: everything after its ok, to the end; a
       subscription that left should have got what it got (its gaps are counted as lost). */
    uint64_t delivered = left_delivered, lost = left_lost, ooo = left_ooo, dups = left_dups;
    uint64_t expected = left_delivered + left_lost;
    for (int i = 0; i < nsubs; i++) {
        delivered += subs[i].delivered; lost += subs[i].lost; ooo += subs[i].ooo; dups += subs[i].dups;
        expected += tokens > subs[i].start ? tokens - subs[i].start : 0;
    }
    qsort(lat, nlat, sizeof(double), cmp_double);
#define Q(q) (nlat ? lat[(size_t)((q) * (nlat - 1))] : -1.0)
    printf("{\"expected\": %llu, \"churned\": %llu, \"delivered\": %llu, \"lost_gaps\": %llu, \"out_of_order\": %llu, \"duplicates\": %llu, "
           "\"disconnected\": %llu, \"samples\": %zu, \"latency_ms\": {\"p50\": %.3f, \"p90\": %.3f, "
           "\"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f}, \"cdf\": [",
           (unsigned long long)expected, (unsigned long long)churned,
           (unsigned long long)delivered, (unsigned long long)lost, (unsigned long long)ooo,
           (unsigned long long)dups, (unsigned long long)disconnected, nlat,
           Q(0.5), Q(0.9), Q(0.99), Q(0.999), nlat ? lat[nlat - 1] : -1.0);
    for (int i = 0; i <= 200 && nlat; i++) printf("%s%.3f", i ? ", " : "", lat[(size_t)((nlat - 1) * (i / 200.0))]);
    qsort(hlat, nhlat, sizeof(double), cmp_double);
#define HQ(q) (nhlat ? hlat[(size_t)((q) * (nhlat - 1))] : -1.0)
    printf("], \"healthy_latency_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p999\": %.3f, "
           "\"max\": %.3f}}\n", HQ(0.5), HQ(0.9), HQ(0.99), HQ(0.999), nhlat ? hlat[nhlat - 1] : -1.0);
    fflush(stdout);
    for (int i = 0; i < nsubs; i++) if (!subs[i].closed) close(subs[i].fd);
    return 0;
}
