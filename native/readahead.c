/*
 * Read-ahead: which pages to fill beyond a missing fault (an adaptive
 * detector per range), and filling them from the store's descriptor in
 * runs, one UFFDIO_COPY per run.
 *
 * Kernel facts this relies on:
 * - UFFDIO_COPY of a range installs its pages in order and, unless
 *   DONTWAKE, wakes the threads waiting on any page of it when it returns;
 *   a page already present stops it with EEXIST, and uffdio_copy.copy says
 *   how far it got. So the faulting page is filled alone first (its thread
 *   runs on while the window is copied), and a thread that faults inside
 *   the window meanwhile is woken by the window's copy.
 * - The source is read with copy_from_user (mm/userfaultfd.c): a source
 *   that is a MAP_SHARED mapping of the store file is copied straight from
 *   the page cache, with no pread into a buffer first. A source page past
 *   the file's end (the file shrank under the mapping) makes the copy fail
 *   with EFAULT: a fault the kernel takes on a user address it copies from
 *   is fixed up, it never raises SIGBUS in the pager.
 *
 * - SEEK_DATA / SEEK_HOLE find a file's holes, and UFFDIO_ZEROPAGE maps the
 *   shared zero page over a range at no cost in memory: holes in a window
 *   (and pages past the file's end) are mapped so, as a fault would (not
 *   under synchronous tracking, which needs every page write-protected:
 *   there they are copied from zeros, write-protected).
 *
 * The detector: a missing fault next to the previous one (forward or
 * backward), at the same distance as the previous two (a stride of up to
 * RA_STRIDE_MAX pages), or at the edge of the last window (the reader went
 * through it: a hit) opens a window of RA_FIRST pages or doubles it, up to
 * ra_max; any other fault closes it, so random faults pay a few compares.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define RA_FIRST 8
#define RA_STRIDE_MAX 64
#define RUN_MAX 256 /* pages per UFFDIO_COPY (and per buffer) */

static int64_t abs64(int64_t v)
{
    return v < 0 ? -v : v;
}

/* The window: as many pages as fit in the range from idx on, by step. */
static void advise(struct up_fill *f, uint64_t idx, struct up_ra *w)
{
    uint64_t npages = f->len / UP_PAGE_SIZE;
    w->count = 0;
    w->step = 1;
    if (!f->ra_max)
        return;
    int64_t step = 1;
    uint32_t window;
    if (f->ra_fixed) {
        window = f->ra_max;
    } else {
        int64_t d = f->ra_seen ? (int64_t)(idx - f->ra_last) : 0;
        int hit = f->ra_window && idx == f->ra_edge;
        int next_to = d == 1 || d == -1;
        int strided = d != 0 && d == f->ra_delta && abs64(d) <= RA_STRIDE_MAX;
        if (hit) {
            f->read_ahead_hits++;
            step = f->ra_step;
        } else if (next_to || strided) {
            step = d;
        }
        if (hit || next_to || strided)
            f->ra_window = !f->ra_window ? RA_FIRST : f->ra_window * 2;
        else
            f->ra_window = 0;
        if (f->ra_window > f->ra_max)
            f->ra_window = f->ra_max;
        f->ra_seen = 1;
        f->ra_delta = d;
        f->ra_last = idx;
        f->ra_step = step;
        window = f->ra_window;
    }
    if (!window)
        return;
    if (f->resident_limit) { /* no further than the cap allows */
        uint64_t room_left = f->resident_limit > f->resident_pages ? f->resident_limit - f->resident_pages : 0;
        if (window > room_left)
            window = (uint32_t)room_left;
        if (!window)
            return;
    }
    /* Pages left in the range by step: forward npages - 1 - idx, backward idx. */
    uint64_t room = step > 0 ? (npages - 1 - idx) / (uint64_t)step : idx / (uint64_t)(-step);
    uint64_t count = window < room ? window : room;
    if (!count)
        return;
    w->first = idx + (uint64_t)step;
    w->count = count;
    w->step = step;
    f->ra_edge = idx + (uint64_t)((int64_t)(count + 1) * step);
}

uint64_t up_fill_peek_window(struct up_fill *f, uint64_t idx)
{
    struct up_fill seen = *f; /* what advise changes, restored below */
    struct up_ra w;
    advise(f, idx, &w);
    f->ra_seen = seen.ra_seen;
    f->ra_last = seen.ra_last;
    f->ra_delta = seen.ra_delta;
    f->ra_window = seen.ra_window;
    f->ra_step = seen.ra_step;
    f->ra_edge = seen.ra_edge;
    f->read_ahead_hits = seen.read_ahead_hits;
    return w.count;
}

int up_fill_advise(struct up_fill *f, uint64_t address, struct up_ra *w)
{
    w->count = 0;
    if (!up_fill_live(f)) {
        errno = EBADF;
        return -1;
    }
    if (address < f->base || address >= f->base + f->len) {
        errno = EFAULT;
        return -1;
    }
    advise(f, (address - f->base) / UP_PAGE_SIZE, w);
    return 0;
}

int up_fill_is_resident(const struct up_fill *f, uint64_t address)
{
    if (!f->live || address < f->base || address >= f->base + f->len)
        return 0;
    return up_bits_test(f->resident, (address - f->base) / UP_PAGE_SIZE);
}

void up_portion_unmap(struct up_portion *p)
{
    if (p->map)
        munmap((void *)p->map, p->npages * UP_PAGE_SIZE);
    p->map = NULL;
    p->map_fd = -1;
}

/* The portion's file, mapped read-only (NULL if it cannot be: the pages are
 * then read with pread). A failure is not retried for the same fd. */
static const uint8_t *source_map(struct up_portion *p)
{
    if (p->map_fd == p->fd)
        return p->map;
    up_portion_unmap(p);
    p->map_fd = p->fd;
    void *m = mmap(NULL, p->npages * UP_PAGE_SIZE, PROT_READ, MAP_SHARED, p->fd, (off_t)p->offset);
    p->map = m == MAP_FAILED ? NULL : m;
    return p->map;
}

/* Where a run is copied through when it cannot come from the mapping: an
 * encrypted store's pages (opened here), or a run past the file's end. One
 * per thread, made on first use, never freed (the loop's thread lives as
 * long as the pager). */
static __thread uint8_t *run_buf;

/* The bytes of pages [idx, idx + *n) of portion src, for UFFDIO_COPY: in
 * the mapping, or in run_buf. *n shrinks to the pages before one that
 * cannot be read (an encrypted page that does not authenticate: its own
 * fault poisons it). NULL if none can. */
static const uint8_t *run_source(struct up_portion *src, uint64_t idx, uint64_t *n)
{
    uint64_t off = src->offset + idx * UP_PAGE_SIZE, len = *n * UP_PAGE_SIZE;
    if (!src->aead) {
        struct stat st;
        const uint8_t *map = source_map(src);
        if (map && fstat(src->fd, &st) == 0 && (uint64_t)st.st_size >= off + len)
            return map + idx * UP_PAGE_SIZE;
    }
    if (!run_buf && posix_memalign((void **)&run_buf, UP_PAGE_SIZE, RUN_MAX * UP_PAGE_SIZE) != 0) {
        run_buf = NULL;
        return NULL;
    }
    if (!src->aead) {
        ssize_t got = pread(src->fd, run_buf, len, (off_t)off);
        if (got < 0)
            return NULL;
        memset(run_buf + got, 0, len - (size_t)got); /* past the file's end: zeros */
        return run_buf;
    }
    for (uint64_t i = 0; i < *n; i++) {
        uint8_t *page = run_buf + i * UP_PAGE_SIZE;
        int64_t got = up_aead_read_page(src->aead, src->store_id, src->offset / UP_PAGE_SIZE + idx + i,
                                        off + i * UP_PAGE_SIZE, page);
        if (got < 0) {
            int err = errno;
            *n = i;
            errno = err; /* EBADMSG: page idx + i does not authenticate */
            return i ? run_buf : NULL;
        }
        if (got == 0)
            memset(page, 0, UP_PAGE_SIZE);
    }
    return run_buf;
}

/* Copies pages [idx, idx + n) of src into the client; returns the pages
 * filled (fewer than n: errno says why the next one was not), or -1 if
 * none was. */
static int64_t copy_run(int uffd, struct up_fill *f, struct up_portion *src, uint64_t idx, uint64_t n)
{
    const uint8_t *from = run_source(src, idx, &n);
    if (!from)
        return -1;
    if (up_bits_prepare(f->resident, idx) < 0 || up_bits_prepare(f->resident, idx + n - 1) < 0)
        return -1;
    uint64_t mode = f->tracking != UP_TRACK_NONE ? UFFDIO_COPY_MODE_WP : 0;
    int64_t done = 0;
    int rc = up_uffd_copy(uffd, f->base + idx * UP_PAGE_SIZE, from, n * UP_PAGE_SIZE, mode, &done);
    uint64_t copied = done > 0 ? (uint64_t)done / UP_PAGE_SIZE : 0;
    if (copied) {
        up_fill_mark_resident(f, idx, idx + copied);
        f->copies += copied;
        f->read_ahead_pages += copied;
    }
    if (rc < 0 && !copied)
        return -1;
    if (rc == 0 && copied < n)
        errno = EBADMSG; /* run_source stopped before a page that does not authenticate */
    return (int64_t)copied;
}

/* Whether filling may go on past a page it could not fill: one that does
 * not authenticate (its own fault poisons it), or one present already
 * (EEXIST). Anything else (an event unread, the process gone) stops it. */
static int skippable(int err)
{
    return err == EBADMSG || err == EEXIST;
}

static const uint8_t zeros[RUN_MAX * UP_PAGE_SIZE] __attribute__((aligned(UP_PAGE_SIZE)));

/* Maps pages [idx, idx + n) as zeros; the pages done, or -1. */
static int64_t zero_run(int uffd, struct up_fill *f, uint64_t idx, uint64_t n)
{
    if (up_bits_prepare(f->resident, idx) < 0 || up_bits_prepare(f->resident, idx + n - 1) < 0)
        return -1;
    int64_t done = 0;
    int rc = f->tracking == UP_TRACK_SYNC_WP
                 ? up_uffd_copy(uffd, f->base + idx * UP_PAGE_SIZE, zeros, n * UP_PAGE_SIZE, UFFDIO_COPY_MODE_WP,
                                &done)
                 : up_uffd_zeropage(uffd, f->base + idx * UP_PAGE_SIZE, n * UP_PAGE_SIZE, 0, &done);
    uint64_t zeroed = done > 0 ? (uint64_t)done / UP_PAGE_SIZE : 0;
    if (zeroed) {
        up_fill_mark_resident(f, idx, idx + zeroed);
        f->zero_fills += zeroed;
        f->read_ahead_pages += zeroed;
    }
    return rc < 0 ? -1 : (int64_t)zeroed;
}

/* Fills pages [pos, end) of a plain portion (src holds them all): its
 * data in runs copied from the file, its holes (and what is past the
 * file's end) as zeros. The pages done, or -1 once it must stop. */
static int64_t fill_plain(int uffd, struct up_fill *f, struct up_portion *src, uint64_t pos, uint64_t end)
{
    int64_t filled = 0;
    while (pos < end) {
        off_t at = (off_t)(src->offset + pos * UP_PAGE_SIZE);
        off_t data = lseek(src->fd, at, SEEK_DATA);
        uint64_t data_page = data < 0 ? (errno == ENXIO ? end : pos) : (uint64_t)(data - (off_t)src->offset) / UP_PAGE_SIZE;
        uint64_t n;
        int64_t got;
        if (data_page > pos) {
            n = (data_page < end ? data_page : end) - pos;
            if (n > RUN_MAX)
                n = RUN_MAX;
            got = zero_run(uffd, f, pos, n);
        } else {
            off_t hole = data < 0 ? -1 : lseek(src->fd, at, SEEK_HOLE);
            uint64_t hole_page = hole < 0 ? end : ((uint64_t)(hole - (off_t)src->offset) + UP_PAGE_SIZE - 1) / UP_PAGE_SIZE;
            n = (hole_page < end ? hole_page : end) - pos;
            if (n == 0)
                n = 1;
            if (n > RUN_MAX)
                n = RUN_MAX;
            got = copy_run(uffd, f, src, pos, n);
        }
        if (got < 0)
            return filled ? filled : -1;
        filled += got;
        if ((uint64_t)got < n)
            return filled;
        pos += n;
    }
    return filled;
}

/* Fills pages [pos, end) of portion src, which holds them all: a plain
 * one in runs at its holes, an encrypted one page by page. Goes on past a
 * page that cannot be filled if skippable. The pages filled, or -1 once it
 * must stop with none. */
static int64_t fill_from(int uffd, struct up_fill *f, struct up_portion *src, uint64_t pos, uint64_t end)
{
    int64_t filled = 0;
    while (pos < end) {
        uint64_t n = end - pos;
        if (src->aead && n > RUN_MAX)
            n = RUN_MAX;
        int64_t got = src->aead ? copy_run(uffd, f, src, pos, n) : fill_plain(uffd, f, src, pos, pos + n);
        if (got < 0 && !skippable(errno))
            return filled ? filled : -1;
        if (got < 0)
            got = 0;
        filled += got;
        if ((uint64_t)got < n && !skippable(errno))
            return filled;
        pos += (uint64_t)got < n ? (uint64_t)got + 1 : n; /* past the page it could not fill */
    }
    return filled;
}

int64_t up_fill_ahead(int uffd, struct up_fill *f, uint64_t first, uint64_t count, int64_t step)
{
    if (!up_fill_live(f)) {
        errno = EBADF;
        return -1;
    }
    if (f->defer_missing)
        return 0; /* fork_policy="on-access": every fill goes through the policy first */
    uint64_t npages = f->len / UP_PAGE_SIZE;
    int64_t filled = 0;
    if (step == 1 || step == -1) {
        uint64_t lo = step > 0 ? first : first - (count - 1), hi = lo + count;
        if (lo >= npages || count == 0 || hi > npages || hi < lo)
            return 0;
        uint64_t pos = lo;
        while ((pos = up_bits_next_clear(f->resident, pos, hi)) < hi) {
            uint64_t run_end = up_bits_next_set(f->resident, pos, hi), src_end;
            if (f->evicting) { /* never fill a page the agent is dropping */
                if (up_bits_test(f->evicting, pos)) {
                    pos++;
                    continue;
                }
                run_end = up_bits_next_set(f->evicting, pos, run_end);
            }
            if (up_portion_source_run(f->portion, pos, run_end, &src_end) < 0)
                break;
            struct up_portion *src = (struct up_portion *)up_portion_source(f->portion, pos);
            if (src->fd < 0) { /* fetched by Python, if at all */
                pos = src_end;
                continue;
            }
            int64_t got = fill_from(uffd, f, src, pos, src_end);
            if (got < 0)
                break;
            filled += got;
            if ((uint64_t)got < src_end - pos)
                break; /* an event unread, the process gone: stop */
            pos = src_end;
        }
        return filled;
    }
    for (uint64_t k = 0; k < count; k++) {
        uint64_t idx = first + (uint64_t)((int64_t)k * step);
        if (idx >= npages)
            break;
        if (up_bits_test(f->resident, idx) || (f->evicting && up_bits_test(f->evicting, idx)))
            continue;
        struct up_portion *src = (struct up_portion *)up_portion_source(f->portion, idx);
        if (src->fd < 0)
            continue;
        int64_t got = fill_from(uffd, f, src, idx, idx + 1); /* a hole as the zero page, as in a run */
        if (got <= 0 && !skippable(errno))
            break;
        filled += got > 0 ? got : 0;
    }
    return filled;
}

void up_fill_read_ahead(int uffd, struct up_fill *f, uint64_t idx)
{
    struct up_ra w;
    if (f->defer_missing || !f->ra_max)
        return; /* fork policy work comes first (on-access) */
    advise(f, idx, &w);
    if (w.count)
        up_fill_ahead(uffd, f, w.first, w.count, w.step);
}
