/*
 * Finding dirty pages and copying them out of the client into the store.
 *
 * Kernel facts this relies on:
 * - With UFFD_FEATURE_WP_ASYNC, a write to a write-protected page is
 *   resolved by the kernel without a message: it just clears the pte's
 *   uffd-wp bit. PAGEMAP_SCAN reports such pages as PAGE_IS_WRITTEN, and with
 *   PM_SCAN_WP_MATCHING write-protects them again in the same page-table
 *   walk, so a write racing the scan is either seen now or next time.
 * - A pte that is not present also reads as "written" (it has no uffd-wp
 *   bit); requiring PAGE_IS_PRESENT skips those without arming every
 *   unpopulated pte (which would allocate page tables for the whole range).
 *   The shared zero page (PAGE_IS_PFNZERO) is present but never written.
 * - process_vm_readv of a page that is not present would itself raise a
 *   userfault: only pages known to be present are read.
 */
#define _GNU_SOURCE /* process_vm_readv */
#include "uffd_native.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define IOV_BATCH 1024 /* UIO_MAXIOV */

int up_collect_dirty(int uffd, struct up_fill *f, struct up_run *runs, int max_runs, uint64_t *cursor)
{
    if (!f->live || !up_portion_chain_live(f->portion)) {
        errno = EBADF;
        return -1;
    }
    uint64_t npages = f->len / UP_PAGE_SIZE;
    uint64_t i = *cursor;
    int n = 0;
    if (!f->dirty)
        return 0;
    while (n < max_runs) {
        /* Runs of dirty pages, found leaf by leaf and word by word. */
        uint64_t first = up_bits_next_set(f->dirty, i, npages);
        if (first >= npages) {
            i = npages;
            break;
        }
        uint64_t stop = up_bits_next_clear(f->dirty, first, npages);
        uint64_t addr = f->base + first * UP_PAGE_SIZE, len = (stop - first) * UP_PAGE_SIZE;
        /* Protect first, then clear: a write in between faults and is
         * recorded again once this returns. */
        if ((up_uffd_writeprotect(uffd, addr, len, UFFDIO_WRITEPROTECT_MODE_WP) < 0 && errno != ESRCH) ||
            up_bits_clear_range(f->dirty, first, stop) < 0) {
            i = first; /* still dirty: taken next time */
            break;
        }
        runs[n++] = (struct up_run){.addr = addr, .store_offset = f->portion->offset + first * UP_PAGE_SIZE, .len = len};
        i = stop;
    }
    f->dirty_pages = up_bits_count(f->dirty);
    *cursor = i;
    return n;
}

int up_scan_written(int pagemap_fd, struct up_fill *f, int protect, struct up_run *runs, int max_runs,
                    uint64_t *cursor, uint64_t end)
{
    struct page_region vec[256];
    if (!f->live || !up_portion_chain_live(f->portion)) {
        errno = EBADF;
        return -1;
    }
    uint64_t start = *cursor > f->base ? *cursor : f->base;
    if (end > f->base + f->len)
        end = f->base + f->len;
    int n = 0;
    while (start < end && n < max_runs) {
        int room = max_runs - n < 256 ? max_runs - n : 256;
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = protect ? (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) : 0,
            .start = start,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = (uint64_t)room,
            .category_inverted = PAGE_IS_PFNZERO,
            .category_mask = PAGE_IS_PRESENT | PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
            .return_mask = PAGE_IS_WRITTEN,
        };
        int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (got < 0)
            return -1;
        for (int k = 0; k < got; k++)
            runs[n++] = (struct up_run){
                .addr = vec[k].start,
                .store_offset = f->portion->offset + (vec[k].start - f->base),
                .len = vec[k].end - vec[k].start,
            };
        start = arg.walk_end;
        if (got < room && start >= end)
            break;
    }
    *cursor = start;
    return n;
}

int64_t up_scan_resident(int pagemap_fd, struct up_fill *f)
{
    struct page_region vec[256];
    if (!f->live) {
        errno = EBADF;
        return -1;
    }
    uint64_t start = f->base, end = f->base + f->len;
    int64_t marked = 0;
    while (start < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .start = start,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = 256,
            .category_mask = PAGE_IS_PRESENT,
            .return_mask = PAGE_IS_PRESENT,
        };
        int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (got < 0)
            return -1;
        for (int k = 0; k < got; k++) {
            up_fill_mark_resident(f, (vec[k].start - f->base) / UP_PAGE_SIZE, (vec[k].end - f->base) / UP_PAGE_SIZE);
            marked += (int64_t)((vec[k].end - vec[k].start) / UP_PAGE_SIZE);
        }
        if (arg.walk_end <= start)
            break;
        start = arg.walk_end;
    }
    return marked;
}

int64_t up_read_remote(int pid, const struct up_run *runs, int n, uint8_t *buf)
{
    struct iovec local[IOV_BATCH], remote[IOV_BATCH];
    int64_t total = 0;
    for (int i = 0; i < n; i += IOV_BATCH) {
        int m = n - i < IOV_BATCH ? n - i : IOV_BATCH;
        int64_t want = 0;
        for (int k = 0; k < m; k++) {
            local[k] = (struct iovec){buf + total + want, runs[i + k].len};
            remote[k] = (struct iovec){(void *)(uintptr_t)runs[i + k].addr, runs[i + k].len};
            want += (int64_t)runs[i + k].len;
        }
        ssize_t got = process_vm_readv(pid, local, (unsigned long)m, remote, (unsigned long)m, 0);
        if (got < 0)
            return -1;
        if (got != want) {
            /* Partial reads stop at a remote iovec boundary: the rest is gone. */
            errno = EFAULT;
            return -1;
        }
        total += got;
    }
    return total;
}

int64_t up_pwrite_runs(int fd, const struct up_run *runs, int n, const uint8_t *buf)
{
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        uint64_t done = 0;
        while (done < runs[i].len) {
            ssize_t w = pwrite(fd, buf + total + done, runs[i].len - done, (off_t)(runs[i].store_offset + done));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            done += (uint64_t)w;
        }
        total += (int64_t)runs[i].len;
    }
    return total;
}
