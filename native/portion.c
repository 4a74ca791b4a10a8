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
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

const struct up_portion *up_portion_source(const struct up_portion *p, uint64_t idx)
{
    while (p->parent && (p->fd < 0 || !bit_test(p->materialized, idx)))
        p = p->parent;
    return p;
}

static int write_zeros(int fd, uint64_t offset, uint64_t len)
{
    static const uint8_t zeros[UP_PAGE_SIZE];
    while (len) {
        size_t chunk = len < UP_PAGE_SIZE ? (size_t)len : UP_PAGE_SIZE;
        ssize_t w = pwrite(fd, zeros, chunk, (off_t)offset);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        offset += (uint64_t)w;
        len -= (uint64_t)w;
    }
    return 0;
}

/* Copies len bytes from (src_fd, src_off) to (dst_fd, dst_off); what the
 * source lacks (past its end) is written as zeros. */
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
            return write_zeros(dst_fd, dst_off, len);
        src_off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

int up_portion_copy_in(struct up_portion *p, uint64_t first, uint64_t npages, uint64_t *copied)
{
    *copied = 0;
    if (p->fd < 0 || !p->parent) {
        errno = EINVAL;
        return -1;
    }
    uint64_t end = first + npages, i = first;
    while (i < end) {
        if (bit_test(p->materialized, i)) {
            i++;
            continue;
        }
        /* One copy per run of pages that come from one source contiguously. */
        const struct up_portion *src = up_portion_source(p->parent, i);
        uint64_t run = i;
        while (run < end && !bit_test(p->materialized, run) && up_portion_source(p->parent, run) == src)
            run++;
        uint64_t len = (run - i) * UP_PAGE_SIZE;
        int rc = src->fd < 0 ? (errno = EOPNOTSUPP, -1)
                             : copy_range(src->fd, src->offset + i * UP_PAGE_SIZE, p->fd,
                                          p->offset + i * UP_PAGE_SIZE, len);
        if (rc < 0)
            return -1;
        for (uint64_t j = i; j < run; j++)
            bit_set(p->materialized, j);
        p->materialized_pages += run - i;
        *copied += run - i;
        i = run;
    }
    return 0;
}

int up_portion_has(const struct up_portion *p, uint64_t idx)
{
    return !p->parent || (p->fd >= 0 && bit_test(p->materialized, idx));
}

void up_portion_mark(struct up_portion *p, uint64_t first, uint64_t npages)
{
    if (!p->materialized)
        return;
    for (uint64_t i = first; i < first + npages; i++) {
        if (!bit_test(p->materialized, i)) {
            bit_set(p->materialized, i);
            p->materialized_pages++;
        }
    }
}

uint64_t up_portion_missing(const struct up_portion *p, uint64_t npages)
{
    /* Counted as bits are set: the pager asks on every flush and fork, and
     * a 1 TiB region's bitmap has 2^28 bits. */
    return p->materialized ? npages - p->materialized_pages : 0;
}
