/*
 * The fault hot path: read fault messages, fill pages from a file descriptor.
 *
 * Kernel facts this relies on:
 * - read() on a uffd returns pending page faults before events; while an
 *   event is unread every UFFDIO_* ioctl fails with EAGAIN. So the first
 *   event read ends a batch: the caller applies it before more faults.
 * - UFFDIO_COPY/ZEROPAGE wake every thread waiting on the range, so a second
 *   message for a page already filled needs only a wake (or nothing); EEXIST
 *   means someone else filled it.
 * - ESRCH: the process is gone; ENOENT: the mapping changed under the copy.
 * - A fault message with FLAG_WP is a write to a page mapped write-protected
 *   (synchronous dirty tracking): clearing the protection wakes the writer.
 */
#include "uffd_native.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static inline uint64_t page_index(const struct up_fill *f, uint64_t addr)
{
    return (addr - f->base) / UP_PAGE_SIZE;
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the vDSO's: tens of ns, no syscall */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int all_zero(const uint8_t *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)p;
    size_t i;
    for (i = 0; i < n / 8; i++)
        if (w[i])
            return 0;
    for (i *= 8; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

int up_fill_live(const struct up_fill *f)
{
    return f->live && up_portion_chain_live(f->portion);
}

void up_fill_mark_resident(struct up_fill *f, uint64_t first, uint64_t stop)
{
    if (f->dropped)
        up_bits_clear_range(f->dropped, first, stop);
    up_bits_set_range(f->resident, first, stop);
    f->resident_pages = up_bits_count(f->resident);
    if (f->resident_pages > f->resident_peak)
        f->resident_peak = f->resident_pages;
}

static int mark_dirty(struct up_fill *f, uint64_t idx)
{
    if (!f->dirty)
        return 0;
    if (up_bits_set_range(f->dirty, idx, idx + 1) < 0)
        return -1;
    f->dirty_pages = up_bits_count(f->dirty);
    return 0;
}

/* Maps buf (n bytes of data, the rest zeros) at the missing page addr. A
 * read maps it write-protected when writes are tracked, so that the first
 * write is seen; a write maps it writable and dirty at once (else it would
 * cost a second round trip, MISSING then WP). */
static int place_page(int uffd, struct up_fill *f, uint64_t addr, uint64_t idx, int write, uint8_t *buf, size_t n)
{
    int zero = n == 0 || all_zero(buf, n);
    int64_t done;
    int rc;
    /* Room for the page's bits first: once it is mapped, they must be set. */
    if (up_bits_prepare(f->resident, idx) < 0 || (write && f->dirty && up_bits_prepare(f->dirty, idx) < 0))
        return -errno;
    /* The shared zero page costs the client no memory until it writes. It
     * cannot be mapped write-protected, so it serves holes only where a write
     * to it needs no fault to be seen: no tracking, or WP_ASYNC (whose scan
     * sees the copy-on-write page as written). */
    if (zero && !write && f->tracking != UP_TRACK_SYNC_WP) {
        rc = up_uffd_zeropage(uffd, addr, UP_PAGE_SIZE, 0, &done);
        if (rc == 0)
            f->zero_fills++;
    } else {
        if (zero)
            memset(buf, 0, UP_PAGE_SIZE);
        else if (n < UP_PAGE_SIZE)
            memset(buf + n, 0, UP_PAGE_SIZE - n);
        uint64_t mode = (!write && f->tracking != UP_TRACK_NONE) ? UFFDIO_COPY_MODE_WP : 0;
        rc = up_uffd_copy(uffd, addr, buf, UP_PAGE_SIZE, mode, &done);
        if (rc == 0 && zero)
            f->zero_fills++;
        else if (rc == 0)
            f->copies++;
    }
    if (rc < 0) {
        if (errno != EEXIST)
            return -errno;
        /* Someone else filled it: make sure the faulting thread is awake. */
        if (up_uffd_wake(uffd, addr, UP_PAGE_SIZE) < 0 && errno != ESRCH)
            return -errno;
    }
    up_fill_mark_resident(f, idx, idx + 1);
    if (write)
        mark_dirty(f, idx);
    return 0;
}

static __thread uint8_t page_buf[UP_PAGE_SIZE] __attribute__((aligned(UP_PAGE_SIZE)));

/* Reads and opens an encrypted page into page_buf (see aead.c); returns
 * the bytes of data (0: it reads as zero) or -1 with errno (EBADMSG: it
 * does not authenticate, and page_buf holds nothing of it). */
static ssize_t read_sealed(const struct up_portion *src, uint64_t idx)
{
    return up_aead_read_page(src->aead, src->store_id, src->offset / UP_PAGE_SIZE + idx,
                             src->offset + idx * UP_PAGE_SIZE, page_buf);
}

/* A page of a store without a descriptor: asked for by remote.c if the
 * store has a connection there and read-ahead would open no window (a
 * window is fetched by Python, in batches, with the fault: see faults.py,
 * which feeds the detector itself then); else -EOPNOTSUPP, for Python. */
static int ask_remote(int uffd, struct up_fill *f, const struct up_portion *src, uint64_t addr, uint64_t idx,
                      int write, int read_ahead)
{
    if (!src->remote)
        return -EOPNOTSUPP;
    int advised = read_ahead && f->ra_max && !(write && f->tracking == UP_TRACK_SYNC_WP);
    if (advised && up_fill_peek_window(f, idx))
        return -EOPNOTSUPP;
    int rc = up_remote_request(src->remote, uffd, f, src, addr, write ? UFFD_PAGEFAULT_FLAG_WRITE : 0);
    if (rc == -EINPROGRESS && advised) {
        struct up_ra w;
        up_fill_advise(f, addr, &w); /* fed as Python would have: it opens no window */
    }
    return rc;
}

/* Fills a missing page from where the portion chain holds it (and the
 * window read-ahead advises, if read_ahead). */
static int fill_missing(int uffd, struct up_fill *f, uint64_t addr, uint64_t idx, int write, int read_ahead)
{
    const struct up_portion *src = up_portion_source(f->portion, idx);
    if (src->fd < 0)
        return ask_remote(uffd, f, src, addr, idx, write, read_ahead);
    ssize_t n = src->aead ? read_sealed(src, idx)
                          : pread(src->fd, page_buf, UP_PAGE_SIZE, (off_t)(src->offset + idx * UP_PAGE_SIZE));
    if (n < 0)
        return -errno;
    int rc = place_page(uffd, f, addr, idx, write, page_buf, (size_t)n);
    if (f->time_faults)
        f->woken_at = now_ns(); /* the read-ahead below is not this fault's wait */
    /* The faulting thread is awake already. A write with synchronous
     * tracking is not read ahead: its neighbours, filled write-protected,
     * would each cost a WP fault where a missing fault costs the same. */
    if (rc == 0 && read_ahead && !(write && f->tracking == UP_TRACK_SYNC_WP))
        up_fill_read_ahead(uffd, f, idx);
    return rc;
}

/* The first write to a page filled write-protected (synchronous tracking). */
static int unprotect_written(int uffd, struct up_fill *f, uint64_t addr, uint64_t idx)
{
    if (mark_dirty(f, idx) < 0)
        return -errno; /* the writer stays blocked; the fault is retried */
    if (up_uffd_writeprotect(uffd, addr, UP_PAGE_SIZE, 0) < 0)
        return -errno;
    return 0;
}

int up_fill_fault(int uffd, struct up_fill *f, uint64_t address, uint64_t flags)
{
    uint64_t addr = address & ~(uint64_t)(UP_PAGE_SIZE - 1);
    if (!up_fill_live(f))
        return -EBADF;
    if (addr < f->base || addr >= f->base + f->len)
        return -EFAULT;
    uint64_t idx = page_index(f, addr);
    if (f->evicting && up_bits_test(f->evicting, idx))
        return -EBUSY; /* the agent is dropping it: the fault waits until it is gone */
    if (flags & UFFD_PAGEFAULT_FLAG_WP) {
        if (f->dropped && up_bits_test(f->dropped, idx)) {
            /* Dropped by page-out since the write faulted: the writer faults
             * again, as a missing page, and gets it from the store. (Not
             * "not resident": a forked child's inherited pages are present
             * without being resident in its own fill state.) */
            if (up_uffd_wake(uffd, addr, UP_PAGE_SIZE) < 0 && errno != ESRCH)
                return -errno;
            return 0;
        }
        return unprotect_written(uffd, f, addr, idx);
    }
    if (f->resident_limit && f->resident_pages >= f->resident_limit && !up_bits_test(f->resident, idx))
        return -EBUSY; /* over the cap by a window already: wait for page-out to catch up */
    if (up_bits_test(f->resident, idx)) {
        /* Usually a second fault on a page filled meanwhile: the copy finds
         * it present (EEXIST) and only wakes. But a page filled while a
         * MADV_DONTNEED was under way (its REMOVE event read, its zap not
         * yet done) is gone although marked resident: filled again here,
         * never woken into the same fault forever. */
        f->duplicates++;
        return fill_missing(uffd, f, addr, idx, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0, 0);
    }
    return fill_missing(uffd, f, addr, idx, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0, 1);
}

int up_fill_take_victims(struct up_fill *f, uint64_t want, struct up_run *runs, int max_runs)
{
    if (!up_fill_live(f)) {
        errno = EBADF;
        return -1;
    }
    if (f->tracking == UP_TRACK_NONE) {
        errno = EINVAL; /* nothing would tell a written page from a clean one */
        return -1;
    }
    uint64_t npages = f->len / UP_PAGE_SIZE;
    if (!f->evicting && !(f->evicting = up_bits_new(npages)))
        return -1;
    int n = 0;
    uint64_t taken = 0, pos = f->evict_hand < npages ? f->evict_hand : 0, scanned = 0;
    while (taken < want && n < max_runs && scanned < npages) {
        /* The next resident page from pos, wrapping once around the range. */
        uint64_t next = up_bits_next_set(f->resident, pos, npages);
        if (next >= npages) {
            scanned += npages - pos;
            pos = 0;
            continue;
        }
        scanned += next - pos;
        pos = next;
        uint64_t end = up_bits_next_clear(f->resident, pos, npages);
        /* Async tracking keeps no dirty set: the agent's move-out passes over written pages. */
        uint64_t dirty = f->dirty ? up_bits_next_set(f->dirty, pos, end) : end;
        uint64_t busy = up_bits_next_set(f->evicting, pos, end);
        uint64_t stop = dirty < busy ? dirty : busy;
        if (stop - pos > want - taken)
            stop = pos + (want - taken);
        if (stop > pos) {
            if (up_bits_prepare(f->evicting, pos) < 0 || up_bits_prepare(f->evicting, stop - 1) < 0)
                return n ? n : -1;
            up_bits_set_range(f->evicting, pos, stop);
            runs[n].addr = f->base + pos * UP_PAGE_SIZE;
            runs[n].store_offset = 0;
            runs[n].len = (stop - pos) * UP_PAGE_SIZE;
            n++;
            taken += stop - pos;
        }
        uint64_t skip = stop > pos ? stop : pos + 1; /* past the run, or past a dirty or busy page */
        scanned += skip - pos;
        pos = skip < npages ? skip : 0;
    }
    f->evict_hand = pos;
    return n;
}

int up_fill_end_eviction(struct up_fill *f, uint64_t address, uint64_t len, int dropped)
{
    if (!f->live) {
        errno = EBADF;
        return -1;
    }
    if (!f->evicting || address < f->base || len > f->base + f->len - address)
        return 0;
    uint64_t first = page_index(f, address), stop = first + len / UP_PAGE_SIZE;
    if (dropped) {
        if (!f->dropped && !(f->dropped = up_bits_new(f->len / UP_PAGE_SIZE)))
            return -1;
        if (up_bits_prepare(f->dropped, first) < 0 || up_bits_prepare(f->dropped, stop - 1) < 0)
            return -1;
        up_bits_set_range(f->dropped, first, stop); /* before the evicting bits go: a held WP fault sees one */
        f->evictions += stop - first;
        /* A drop's REMOVE event cleared them already; a move-out queues none. */
        up_bits_clear_range(f->resident, first, stop);
        f->resident_pages = up_bits_count(f->resident);
    }
    up_bits_clear_range(f->evicting, first, stop);
    return 0;
}

int up_fill_place(int uffd, struct up_fill *f, uint64_t address, uint64_t flags, const uint8_t *data, uint64_t n)
{
    uint64_t addr = address & ~(uint64_t)(UP_PAGE_SIZE - 1);
    if (!up_fill_live(f))
        return -EBADF;
    if (addr < f->base || addr >= f->base + f->len || n > UP_PAGE_SIZE)
        return -EFAULT;
    uint64_t idx = page_index(f, addr);
    if (f->evicting && up_bits_test(f->evicting, idx))
        return -EBUSY;
    if (up_bits_test(f->resident, idx))
        f->duplicates++; /* and copied again all the same: see up_fill_fault */
    memcpy(page_buf, data, n); /* place_page pads it with zeros */
    return place_page(uffd, f, addr, idx, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0, page_buf, n);
}

int up_fill_forget(struct up_fill *f, uint64_t start, uint64_t end)
{
    if (!f->live) {
        errno = EBADF;
        return -1;
    }
    if (start < f->base)
        start = f->base;
    if (end > f->base + f->len)
        end = f->base + f->len;
    if (start >= end)
        return 0;
    uint64_t first = page_index(f, start), stop = page_index(f, end + UP_PAGE_SIZE - 1);
    int rc = 0;
    if (up_bits_clear_range(f->resident, first, stop) < 0)
        rc = -1;
    if (f->dirty && up_bits_clear_range(f->dirty, first, stop) < 0)
        rc = -1;
    f->resident_pages = up_bits_count(f->resident);
    if (f->dirty)
        f->dirty_pages = up_bits_count(f->dirty);
    return rc;
}

int up_fill_is_dirty(const struct up_fill *f, uint64_t addr)
{
    if (!f->live || !f->dirty || addr < f->base || addr >= f->base + f->len)
        return 0;
    return up_bits_test(f->dirty, page_index(f, addr));
}

int up_fill_mark_dirty(struct up_fill *f, uint64_t first, uint64_t count)
{
    if (!f->live) {
        errno = EBADF;
        return -1;
    }
    if (!f->dirty || !count)
        return 0;
    if (up_bits_set_range(f->dirty, first, first + count) < 0)
        return -1;
    f->dirty_pages = up_bits_count(f->dirty);
    return 0;
}

int up_fill_inherit_dirty(struct up_fill *f, const struct up_fill *parent)
{
    if (!f->live || !parent->live) {
        errno = EBADF;
        return -1;
    }
    if (!f->dirty || !parent->dirty)
        return 0;
    int64_t rc = up_bits_or_into(f->dirty, parent->dirty);
    f->dirty_pages = up_bits_count(f->dirty);
    return rc < 0 ? -1 : 0;
}

int up_fill_init(struct up_fill *f, uint64_t base, uint64_t len, struct up_portion *portion, int tracking)
{
    if (!up_portion_chain_live(portion)) {
        errno = EBADF;
        return -1;
    }
    if (len % UP_PAGE_SIZE || len / UP_PAGE_SIZE != portion->npages) {
        errno = EINVAL;
        return -1;
    }
    struct up_bits *resident = up_bits_new(len / UP_PAGE_SIZE), *dirty = NULL;
    if (!resident)
        return -1;
    if (tracking == UP_TRACK_SYNC_WP && !(dirty = up_bits_new(len / UP_PAGE_SIZE))) {
        up_bits_free(resident);
        return -1;
    }
    memset(f, 0, sizeof(*f));
    f->base = base;
    f->len = len;
    f->portion = portion;
    f->tracking = tracking;
    f->resident = resident;
    f->dirty = dirty;
    f->live = 1;
    return 0;
}

void up_fill_release(struct up_fill *f)
{
    if (f->live)
        up_remote_forget_fill(f);
    f->live = 0;
    up_bits_free(f->resident);
    up_bits_free(f->dirty);
    up_bits_free(f->evicting);
    up_bits_free(f->dropped);
    f->resident = f->dirty = f->evicting = f->dropped = NULL;
}

#define LATENCY_BUCKETS (sizeof(((struct up_fill *)0)->latency_buckets) / sizeof(uint64_t))

void up_fill_time_fault(struct up_fill *f, int64_t ns)
{
    if (!f->time_faults)
        return;
    if (ns < 0)
        ns = 0;
    uint64_t us = (uint64_t)ns / 1000;
    /* Powers of two: a bucket is one clz away, never a search. */
    uint64_t k = us ? 64 - (uint64_t)__builtin_clzll(us) : 0;
    f->latency_buckets[k < LATENCY_BUCKETS ? k : LATENCY_BUCKETS - 1]++;
    f->latency_ns_sum += (uint64_t)ns;
}

static void defer(struct up_msg *deferred, int *n, const struct uffd_msg *m, int status)
{
    up_msg_flatten(m, &deferred[*n]);
    deferred[*n].status = status;
    (*n)++;
}

int up_serve(int uffd, struct up_fill *f, struct up_msg *deferred, int max_deferred, int *n_deferred)
{
    struct uffd_msg msgs[BATCH];
    int served = 0;
    *n_deferred = 0;
    if (!up_fill_live(f)) {
        errno = EBADF;
        return -1;
    }
    for (;;) {
        /* Never read more than can be handed back: a message read is gone. */
        int room = max_deferred - *n_deferred;
        if (room <= 0)
            return served;
        int want = room < BATCH ? room : BATCH;
        int n = up_uffd_read_raw(uffd, msgs, want);
        if (n < 0)
            return served ? served : -1;
        if (n == 0)
            return served;
        int64_t read_at = f->time_faults ? now_ns() : 0;
        int event_seen = 0;
        for (int i = 0; i < n; i++) {
            const struct uffd_msg *m = &msgs[i];
            if (m->event != UFFD_EVENT_PAGEFAULT) {
                defer(deferred, n_deferred, m, 0);
                event_seen = 1;
                continue;
            }
            uint64_t flags = m->arg.pagefault.flags;
            f->faults++;
            if (flags & UFFD_PAGEFAULT_FLAG_WP)
                f->wp_faults++;
            else if (flags & UFFD_PAGEFAULT_FLAG_WRITE)
                f->write_faults++;
            if (event_seen) {
                defer(deferred, n_deferred, m, 0);
                continue;
            }
            if (f->defer_missing && !(flags & UFFD_PAGEFAULT_FLAG_WP)) {
                defer(deferred, n_deferred, m, 0);
                continue;
            }
            f->woken_at = 0;
            int rc = up_fill_fault(uffd, f, m->arg.pagefault.address, flags);
            if (rc == 0) {
                served++;
                if (f->time_faults)
                    up_fill_time_fault(f, (f->woken_at ? f->woken_at : now_ns()) - read_at);
            } else if (rc != -ESRCH && rc != -EINPROGRESS) /* -EINPROGRESS: remote.c asked for it */
                defer(deferred, n_deferred, m, rc);
        }
        /* A short read found the queue empty (userfaultfd_read_iter reads on,
         * without blocking, until -EAGAIN or the buffer is full): reading again
         * would cost a syscall to learn -EAGAIN. A message queued since is
         * not lost: the caller's epoll is level-triggered. */
        if (event_seen || n < want)
            return served;
    }
}
