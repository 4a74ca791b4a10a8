/*
 * Portions and fork lineage: which file and offset hold each page of a
 * process's view of a region.
 *
 * After fork() the child keeps the parent's data as of the fork; its own
 * writes go to its own portion. A page is "materialized" in a child's
 * portion once that portion holds it; until then the child's view of the
 * page is its parent's, read through the parent's chain. The pager keeps
 * this true by copying a page into every child that still inherits it
 * before the parent's portion changes (claim 2), so reading through the
 * chain always yields the data as of each fork.
 *
 * The invariant copy_in relies on: a child's portion reads as zero at every
 * page not materialized in it. copy_in copies only the data segments its
 * sources hold and writes nothing for their holes or past their end, so
 * those pages of the destination must read as zero already. It holds
 * because layout.PortionAllocator.allocate places a child's portion either
 * past the end of the store and of every portion in use or kept, or in the
 * slot of an exited child's portion that it has just discarded (punched to a
 * hole; an encrypted store drops the slot's catalog records too), and
 * because a child's portion is written only at pages that are materialized
 * by then: by copy_in here, or by its own write-back, which completes the
 * portion first. (A root portion is the user's data and is never copied
 * into.) Without it a 1 GiB region over a 4 KiB file would write 1 GiB of
 * zeros at every fork.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int up_portion_chain_live(const struct up_portion *p)
{
    for (; p; p = p->parent)
        if (!p->live)
            return 0;
    return 1;
}

int up_portion_init(struct up_portion *p, uint64_t npages, struct up_portion *parent)
{
    if (parent && !up_portion_chain_live(parent)) {
        errno = EBADF;
        return -1;
    }
    if (parent && parent->npages != npages) {
        errno = EINVAL;
        return -1;
    }
    struct up_bits *materialized = NULL;
    if (parent && !(materialized = up_bits_new(npages)))
        return -1;
    memset(p, 0, sizeof(*p));
    p->fd = -1;
    p->map_fd = -1;
    p->npages = npages;
    p->parent = parent;
    p->materialized = materialized;
    p->live = 1;
    return 0;
}

void up_portion_release(struct up_portion *p)
{
    up_portion_unmap(p);
    p->live = 0;
    up_bits_free(p->materialized);
    p->materialized = NULL;
    p->materialized_pages = 0;
}

/* Whether p holds page idx itself. */
static int holds(const struct up_portion *p, uint64_t idx)
{
    return !p->parent || (p->placed && up_bits_test(p->materialized, idx));
}

const struct up_portion *up_portion_source(const struct up_portion *p, uint64_t idx)
{
    while (!holds(p, idx))
        p = p->parent;
    return p;
}

/* The portion of p's chain (p included) that holds page from, its depth in
 * *depth, and in *run_end the end of the run of pages [from, end) that it
 * holds too, with no portion nearer p holding any of them. The chain must be
 * live. Costs O(depth) set walks, not O(pages). */
static const struct up_portion *source_run(const struct up_portion *p, uint64_t from, uint64_t end,
                                           uint64_t *run_end, int *depth)
{
    uint64_t limit = end;
    for (*depth = 0; p->parent; p = p->parent, (*depth)++) {
        if (!p->placed)
            continue; /* holds nothing */
        if (up_bits_test(p->materialized, from)) {
            *run_end = up_bits_next_clear(p->materialized, from, limit);
            return p;
        }
        /* Pages from its next materialized one on are held here or nearer. */
        limit = up_bits_next_set(p->materialized, from, limit);
    }
    *run_end = limit;
    return p; /* the root holds every page */
}

int up_portion_source_run(const struct up_portion *p, uint64_t from, uint64_t end, uint64_t *run_end)
{
    if (!up_portion_chain_live(p)) {
        errno = EBADF;
        return -1;
    }
    if (from >= end || end > p->npages) {
        errno = EINVAL;
        return -1;
    }
    int depth;
    source_run(p, from, end, run_end, &depth);
    return depth;
}

/* Copies len bytes from (src_fd, src_off) to (dst_fd, dst_off), or fewer
 * if the source ends sooner (the rest reads as zero in both). */
static int copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len)
{
    while (len) {
        off_t in = (off_t)src_off, out = (off_t)dst_off;
        ssize_t n = copy_file_range(src_fd, &in, dst_fd, &out, (size_t)len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return 0;
        src_off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Copies the data segments of [src_off, src_off+len) of src_fd, bounded by
 * its size, to the same distances from dst_off in dst_fd. Holes and what is
 * past the source's end are not written: the destination reads as zero
 * there already (the invariant above). */
static int copy_data(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len)
{
    struct stat st;
    if (fstat(src_fd, &st) < 0)
        return -1;
    uint64_t stop = src_off + len, pos = src_off;
    if (stop > (uint64_t)st.st_size)
        stop = (uint64_t)st.st_size;
    while (pos < stop) {
        off_t data = lseek(src_fd, (off_t)pos, SEEK_DATA);
        if (data < 0)
            return errno == ENXIO ? 0 : -1; /* no data from pos on */
        if ((uint64_t)data >= stop)
            return 0;
        off_t hole = lseek(src_fd, data, SEEK_HOLE);
        if (hole < 0)
            return -1;
        uint64_t seg_end = (uint64_t)hole < stop ? (uint64_t)hole : stop;
        if (copy_range(src_fd, (uint64_t)data, dst_fd, dst_off + ((uint64_t)data - src_off), seg_end - (uint64_t)data) < 0)
            return -1;
        pos = seg_end;
    }
    return 0;
}

int up_portion_copy_in(struct up_portion *p, uint64_t first, uint64_t npages, uint64_t *copied)
{
    *copied = 0;
    if (!up_portion_chain_live(p)) {
        errno = EBADF;
        return -1;
    }
    if (!p->placed || !p->parent || first > p->npages || npages > p->npages - first) {
        errno = EINVAL;
        return -1;
    }
    if (p->fd < 0) {
        errno = EOPNOTSUPP; /* a remote store: copied through Python */
        return -1;
    }
    uint64_t end = first + npages, i = first;
    int rc = 0;
    while ((i = up_bits_next_clear(p->materialized, i, end)) < end) {
        /* One copy per run of pages that one source holds contiguously. */
        uint64_t run_end;
        int depth;
        const struct up_portion *src = source_run(p, i, end, &run_end, &depth);
        if (src->fd < 0) {
            errno = EOPNOTSUPP;
            rc = -1;
            break;
        }
        if (copy_data(src->fd, src->offset + i * UP_PAGE_SIZE, p->fd, p->offset + i * UP_PAGE_SIZE,
                      (run_end - i) * UP_PAGE_SIZE) < 0 ||
            up_bits_set_range(p->materialized, i, run_end) < 0) {
            rc = -1;
            break;
        }
        *copied += run_end - i;
        i = run_end;
    }
    p->materialized_pages = up_bits_count(p->materialized);
    return rc;
}

int up_portion_has(const struct up_portion *p, uint64_t idx)
{
    return p->live && idx < p->npages && holds(p, idx);
}

int up_portion_mark(struct up_portion *p, uint64_t first, uint64_t npages)
{
    if (!p->live) {
        errno = EBADF;
        return -1;
    }
    if (!p->materialized)
        return 0; /* a root portion holds every page */
    if (up_bits_set_range(p->materialized, first, first + npages) < 0)
        return -1;
    p->materialized_pages = up_bits_count(p->materialized);
    return 0;
}

uint64_t up_portion_missing(const struct up_portion *p)
{
    return p->live && p->materialized ? p->npages - p->materialized_pages : 0;
}

uint64_t up_portion_next_missing(const struct up_portion *p, uint64_t from, uint64_t end)
{
    if (end > p->npages)
        end = p->npages;
    if (!p->live || !p->parent || from >= end)
        return end;
    if (!p->placed)
        return from;
    return up_bits_next_clear(p->materialized, from, end);
}

uint64_t up_portion_next_held(const struct up_portion *p, uint64_t from, uint64_t end)
{
    if (end > p->npages)
        end = p->npages;
    if (!p->live || from >= end)
        return end;
    if (!p->parent)
        return from;
    if (!p->placed)
        return end;
    return up_bits_next_set(p->materialized, from, end);
}

uint64_t up_portion_next_stored(const struct up_portion *p, uint64_t from, uint64_t end)
{
    if (end > p->npages)
        end = p->npages;
    if (!p->live || from >= end)
        return end;
    if (p->fd < 0)
        return from; /* not placed, or remote: it may hold any page */
    if (p->aead)
        return up_aead_next_stored(p->aead, p->offset / UP_PAGE_SIZE, from, end);
    off_t data = lseek(p->fd, (off_t)(p->offset + from * UP_PAGE_SIZE), SEEK_DATA);
    if (data < 0)
        return errno == ENXIO ? end : from;
    uint64_t page = ((uint64_t)data - p->offset) / UP_PAGE_SIZE;
    return page < end ? page : end;
}
