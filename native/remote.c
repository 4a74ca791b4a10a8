/*
 * The remote fault path: a missing page whose portion lives on one Redis
 * server (stores/redis.py) is asked for here, in the turn of the loop that
 * read its fault, and placed in the client when its reply is parsed, with
 * no Python in between. Python's part is the reader callback that calls
 * up_remote_drain, and whatever is handed back to it.
 *
 * Protocol facts this relies on (RESP2, which Redis speaks to a connection
 * that did not ask for RESP3 with HELLO):
 * - a connection's replies come in the order of its commands, so a FIFO of
 *   requests matches them, and commands are pipelined without waiting;
 * - HGET answers a bulk string "$<n>\r\n<n bytes>\r\n", "$-1\r\n" for a
 *   field or key that does not exist, or an error "-<text>\r\n".
 * Each page costs two commands: HGET of its chunk's field, then HGET of the
 * pseudo file's id in its meta key (after the page, so that a server that
 * lost its memory before the read is seen: an empty server must never read
 * as zeros). The layout is redis.py's: chunk c of 16 pages is the hash
 * "up:NAME:c", page i of it the field "i".
 *
 * Anything but a page of 4096 bytes or a hole, each with the right id, goes
 * back to Python, which fetches the page again through the fetch path
 * (fetch.py) and retries, fails or reports it by that path's rules: an
 * error reply, a value of another length, a lost id, a page whose source
 * portion changed while it was in flight (copied into a forked child's own
 * portion), and every request in flight when the connection fails or a
 * reply is late (up_remote_fail). A request never holds its region alive:
 * up_fill_release forgets the requests of a fill that goes.
 */
#include "uffd_native.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define PAGES_PER_CHUNK 16
#define MAX_REQUESTS 4096            /* in flight on one connection */
#define MAX_UNSENT (1u << 20)        /* bytes of commands the socket did not take yet */
#define IN_BYTES (256u << 10)        /* room for the replies of 60 pages at least */

struct request {
    struct up_fill *f;               /* NULL: forgotten (its fill went) */
    const struct up_portion *src;    /* the portion the page was read from */
    uint64_t address;
    uint64_t flags;
    int uffd;
    int64_t sent_ns;
};

struct up_remote {
    int fd;                          /* -1: not attached (faults go to Python) */
    int failed;                      /* its requests are being handed back */
    uint8_t *prefix;                 /* "up:NAME:" */
    size_t prefix_len;
    uint8_t *marker;                 /* the packed HGET of the id */
    size_t marker_len;
    uint8_t *id;
    size_t id_len;
    struct request *reqs;            /* a ring of MAX_REQUESTS */
    uint32_t head, count;
    uint8_t *out;                    /* commands not taken by the socket yet */
    size_t out_len, out_cap;
    uint8_t *in;                     /* replies not parsed yet */
    size_t in_len;
    uint64_t requests, placed, handed_back;
    struct up_remote *next;          /* every live one, for up_remote_forget_fill */
};

/* All on the pager's event-loop thread: no lock. */
static struct up_remote *remotes;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Appends a bulk string "$<n>\r\n<bytes>\r\n" at p; returns the end. */
static uint8_t *put_bulk(uint8_t *p, const uint8_t *a, size_t an, const uint8_t *b, size_t bn)
{
    p += sprintf((char *)p, "$%zu\r\n", an + bn);
    memcpy(p, a, an);
    memcpy(p + an, b, bn);
    p += an + bn;
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

struct up_remote *up_remote_new(const uint8_t *prefix, uint64_t prefix_len, const uint8_t *id, uint64_t id_len)
{
    struct up_remote *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->fd = -1;
    r->prefix = malloc(prefix_len);
    r->id = malloc(id_len ? id_len : 1);
    r->marker = malloc(prefix_len + 64);
    r->reqs = calloc(MAX_REQUESTS, sizeof(*r->reqs));
    r->in = malloc(IN_BYTES);
    if (!r->prefix || !r->id || !r->marker || !r->reqs || !r->in) {
        up_remote_free(r);
        errno = ENOMEM;
        return NULL;
    }
    memcpy(r->prefix, prefix, prefix_len);
    r->prefix_len = prefix_len;
    memcpy(r->id, id, id_len);
    r->id_len = id_len;
    uint8_t *p = r->marker;
    p += sprintf((char *)p, "*3\r\n$4\r\nHGET\r\n");
    p = put_bulk(p, prefix, prefix_len, (const uint8_t *)"meta", 4);
    p = put_bulk(p, (const uint8_t *)"id", 2, NULL, 0);
    r->marker_len = (size_t)(p - r->marker);
    r->next = remotes;
    remotes = r;
    return r;
}

void up_remote_free(struct up_remote *r)
{
    if (!r)
        return;
    for (struct up_remote **at = &remotes; *at; at = &(*at)->next)
        if (*at == r) {
            *at = r->next;
            break;
        }
    free(r->prefix);
    free(r->id);
    free(r->marker);
    free(r->reqs);
    free(r->out);
    free(r->in);
    free(r);
}

int up_remote_attach(struct up_remote *r, int fd)
{
    if (r->fd >= 0 || r->count) {
        errno = EBUSY; /* detach (after every request was handed back) first */
        return -1;
    }
    r->fd = fd;
    r->failed = 0;
    r->head = 0;
    r->out_len = r->in_len = 0;
    return 0;
}

int up_remote_detach(struct up_remote *r)
{
    if (r->count) {
        errno = EBUSY; /* up_remote_fail, then drain until none is left */
        return -1;
    }
    r->fd = -1;
    r->failed = 0;
    r->out_len = r->in_len = 0;
    return 0;
}

void up_remote_fail(struct up_remote *r)
{
    if (r->fd >= 0)
        r->failed = 1;
}

int64_t up_remote_oldest_ns(const struct up_remote *r)
{
    return r->count ? r->reqs[r->head].sent_ns : 0;
}

void up_remote_counters(const struct up_remote *r, uint64_t *out)
{
    out[0] = r->requests;
    out[1] = r->placed;
    out[2] = r->handed_back;
    out[3] = r->count;
    out[4] = r->fd >= 0;
}

void up_remote_forget_fill(const struct up_fill *f)
{
    for (struct up_remote *r = remotes; r; r = r->next)
        for (uint32_t i = 0; i < r->count; i++) {
            struct request *q = &r->reqs[(r->head + i) % MAX_REQUESTS];
            if (q->f == f)
                q->f = NULL;
        }
}

/* Writes what the socket takes of the commands not sent yet. */
static void flush_out(struct up_remote *r)
{
    size_t sent = 0;
    while (sent < r->out_len) {
        ssize_t n = send(r->fd, r->out + sent, r->out_len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            r->failed = 1; /* the socket is readable now (an error): the drain hands the requests back */
        break;
    }
    memmove(r->out, r->out + sent, r->out_len - sent);
    r->out_len -= sent;
}

int up_remote_request(struct up_remote *r, int uffd, struct up_fill *f, const struct up_portion *src,
                      uint64_t address, uint64_t flags)
{
    if (r->fd < 0 || r->failed || r->count == MAX_REQUESTS)
        return -EOPNOTSUPP;
    uint64_t idx = (address - f->base) / UP_PAGE_SIZE;
    uint64_t offset = src->offset + idx * UP_PAGE_SIZE;
    size_t need = r->out_len + r->prefix_len + r->marker_len + 96;
    if (need > MAX_UNSENT)
        return -EOPNOTSUPP;
    if (need > r->out_cap) {
        size_t cap = r->out_cap ? r->out_cap : 4096;
        while (cap < need)
            cap *= 2;
        uint8_t *out = realloc(r->out, cap);
        if (!out)
            return -EOPNOTSUPP;
        r->out = out;
        r->out_cap = cap;
    }
    char chunk[24], field[4];
    int chunk_len = snprintf(chunk, sizeof(chunk), "%llu", (unsigned long long)(offset / (PAGES_PER_CHUNK * UP_PAGE_SIZE)));
    int field_len = snprintf(field, sizeof(field), "%u", (unsigned)(offset / UP_PAGE_SIZE % PAGES_PER_CHUNK));
    uint8_t *p = r->out + r->out_len;
    memcpy(p, "*3\r\n$4\r\nHGET\r\n", 14);
    p = put_bulk(p + 14, r->prefix, r->prefix_len, (const uint8_t *)chunk, (size_t)chunk_len);
    p = put_bulk(p, (const uint8_t *)field, (size_t)field_len, NULL, 0);
    memcpy(p, r->marker, r->marker_len);
    r->out_len = (size_t)(p + r->marker_len - r->out);
    struct request *q = &r->reqs[(r->head + r->count) % MAX_REQUESTS];
    *q = (struct request){.f = f, .src = src, .address = address, .flags = flags, .uffd = uffd, .sent_ns = now_ns()};
    r->count++;
    r->requests++;
    flush_out(r);
    return -EINPROGRESS;
}

/* One reply at in[0, len): its bytes consumed, 0 if it is not all there
 * yet, -1 if it is nothing an HGET answers (the stream cannot be trusted).
 * *kind: '$' a bulk string (*data, *n), 'n' nil, '-' an error. */
static ssize_t parse_reply(const uint8_t *in, size_t len, int *kind, const uint8_t **data, size_t *n)
{
    if (len < 3)
        return 0;
    const uint8_t *eol = memchr(in, '\n', len);
    if (!eol)
        return len > 4096 ? -1 : 0; /* no line of a reply to HGET is that long */
    size_t head = (size_t)(eol - in) + 1;
    if (head < 3 || eol[-1] != '\r')
        return -1;
    if (in[0] == '-') {
        *kind = '-';
        return (ssize_t)head;
    }
    if (in[0] != '$')
        return -1;
    if (head == 5 && in[1] == '-' && in[2] == '1') {
        *kind = 'n';
        return (ssize_t)head;
    }
    size_t value = 0;
    for (const uint8_t *d = in + 1; d < eol - 1; d++) {
        if (*d < '0' || *d > '9' || value > (64u << 20))
            return -1;
        value = value * 10 + (size_t)(*d - '0');
    }
    if (len < head + value + 2)
        return 0;
    if (in[head + value] != '\r' || in[head + value + 1] != '\n')
        return -1;
    *kind = '$';
    *data = in + head;
    *n = value;
    return (ssize_t)(head + value + 2);
}

/* What becomes of the page of q, whose two replies were (vkind, value, vn)
 * and (mkind, id, idn): 0 placed or dropped, else the rc to hand back. */
static int settle(struct up_remote *r, const struct request *q, int vkind, const uint8_t *value, size_t vn,
                  int mkind, const uint8_t *id, size_t idn)
{
    struct up_fill *f = q->f;
    if (!f || !up_fill_live(f))
        return 0; /* its region went */
    if (mkind != '$' || idn != r->id_len || memcmp(id, r->id, idn) != 0)
        return -EOPNOTSUPP; /* the server lost the pseudo file: the fetch path says so */
    if (vkind == '-' || (vkind == '$' && vn != UP_PAGE_SIZE))
        return -EOPNOTSUPP;
    if (q->address < f->base || q->address >= f->base + f->len)
        return -EOPNOTSUPP; /* moved (REMAP) while in flight */
    uint64_t idx = (q->address - f->base) / UP_PAGE_SIZE;
    if (up_portion_source(f->portion, idx) != q->src)
        return -EOPNOTSUPP; /* copied into a child's own portion meanwhile: read it there */
    int rc = up_fill_place(q->uffd, f, q->address, q->flags, vkind == '$' ? value : (const uint8_t *)"", vkind == '$' ? vn : 0);
    if (rc == 0) {
        r->placed++;
        f->fetched++;
        if (f->time_faults)
            up_fill_time_fault(f, now_ns() - q->sent_ns);
    }
    return rc == -ESRCH ? 0 : rc;
}

static int hand_back(struct up_remote *r, const struct request *q, int rc, struct up_remote_result *out, int *n)
{
    if (!q->f || !q->f->live)
        return 0;
    out[*n] = (struct up_remote_result){.owner = q->f->owner, .address = q->address, .flags = q->flags, .rc = rc};
    (*n)++;
    r->handed_back++;
    return 1;
}

static void pop(struct up_remote *r)
{
    r->head = (r->head + 1) % MAX_REQUESTS;
    r->count--;
}

int up_remote_drain(struct up_remote *r, struct up_remote_result *out, int max, int *state)
{
    int n = 0;
    *state = UP_REMOTE_OK;
    if (r->fd < 0) {
        *state = UP_REMOTE_DETACH;
        return 0;
    }
    if (!r->failed) {
        if (r->out_len)
            flush_out(r);
        /* Full: the replies parsed below make room; the rest waits (level-triggered). */
        ssize_t got = r->in_len < IN_BYTES ? recv(r->fd, r->in + r->in_len, IN_BYTES - r->in_len, MSG_DONTWAIT) : -2;
        if (got > 0)
            r->in_len += (size_t)got;
        else if (got == 0 || (got == -1 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            r->failed = 1; /* closed by the server, or broken */
    }
    size_t pos = 0;
    while (!r->failed && r->count && n < max) {
        int vkind, mkind;
        const uint8_t *value = NULL, *id = NULL;
        size_t vn = 0, idn = 0;
        ssize_t a = parse_reply(r->in + pos, r->in_len - pos, &vkind, &value, &vn);
        ssize_t b = a > 0 ? parse_reply(r->in + pos + a, r->in_len - pos - (size_t)a, &mkind, &id, &idn) : a;
        if (a < 0 || b < 0) {
            r->failed = 1;
            break;
        }
        if (b == 0)
            break;
        struct request q = r->reqs[r->head];
        pop(r);
        pos += (size_t)(a + b);
        int rc = settle(r, &q, vkind, value, vn, mkind, id, idn);
        if (rc)
            hand_back(r, &q, rc, out, &n);
    }
    memmove(r->in, r->in + pos, r->in_len - pos);
    r->in_len -= pos;
    if (!r->failed && !r->count && r->in_len)
        r->failed = 1; /* a reply nothing asked for */
    if (r->failed) {
        while (r->count && n < max) {
            hand_back(r, &r->reqs[r->head], -EOPNOTSUPP, out, &n);
            pop(r);
        }
        *state = r->count ? UP_REMOTE_MORE : UP_REMOTE_DETACH;
        return n;
    }
    if (n == max)
        *state = UP_REMOTE_MORE;
    return n;
}
