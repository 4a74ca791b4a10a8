/*
 * The client's page-out agent: a thread that takes out of this process the
 * pages the pager names, since only this process may.
 *
 * Kernel facts this relies on:
 * - MADV_DONTNEED must be called by the process that owns the memory:
 *   process_madvise() refuses it for another process, and MADV_PAGEOUT
 *   would swap (or, without swap, do nothing) instead of dropping.
 * - MADV_DONTNEED on a range registered with a uffd that has
 *   UFFD_FEATURE_EVENT_REMOVE queues a REMOVE event and blocks until the
 *   pager reads it; the next access to a dropped page is a MISSING fault,
 *   which the pager fills from the store.
 * - UFFDIO_MOVE (mm/userfaultfd.c move_pages) works only in the uffd's own
 *   mm (userfaultfd_move: EINVAL from any other process), hence here. It
 *   moves a page atomically under the page-table lock, into a range
 *   registered with the same uffd, to a destination pte that is none: an
 *   access to the source after it is a MISSING fault. It refuses a page not
 *   exclusive to this process (shared with a forked child: EBUSY), and the
 *   moved pte is writable, dirty and without its uffd-wp bit. With
 *   UFFD_FEATURE_WP_ASYNC a write to a protected page costs no fault (the
 *   kernel clears the pte's uffd-wp bit), so nothing can hold it: a
 *   move-out decides clean or written after the move, by comparing the
 *   moved page with a copy taken while PAGEMAP_SCAN (fs/proc/task_mmu.c)
 *   still reported the page unwritten since its last write-protect.
 * - Reading /proc/self/mem never waits on a userfault: its GUP passes no
 *   FAULT_FLAG_ALLOW_RETRY, so handle_userfault() fails a missing page
 *   (EIO) instead of waiting for the pager, which holds faults on the
 *   pages we work on until we answer.
 * - A thread does not survive fork(): the child starts with no agent
 *   (pthread_atfork resets this state), and gets a new one when it claims
 *   its regions. A move-out holds off fork() (pthread_atfork) until it is
 *   done: a child forked while a page is out would see it missing, and
 *   read the store's older bytes where its parent had written.
 *
 * The agent never takes the GIL, so a Python thread stuck in a fault does
 * not stop it. It works only on ranges inside regions the library allowed
 * (up_agent_allow), whatever the pager asks.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ALLOWED 4096
#define SCRATCH_LEN ((uint64_t)UP_AGENT_MOVE_MAX * UP_PAGE_SIZE)

struct allowed_range {
    uint64_t start, end;
    int uffd;         /* a dup of the region's uffd (move-out), or -1 */
    uint64_t scratch; /* SCRATCH_LEN bytes registered with it, where pages are moved out to; 0 without */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* Held by a move-out from its first move to its last put-back, and by
 * fork()'s prepare handler: no fork sees a page out. */
static pthread_mutex_t moving = PTHREAD_MUTEX_INITIALIZER;
static struct allowed_range allowed[MAX_ALLOWED];
static int n_allowed;
static int agent_fd = -1;
static int atfork_installed;

static void before_fork(void)
{
    pthread_mutex_lock(&moving);
}

static void in_parent(void)
{
    pthread_mutex_unlock(&moving);
}

static void in_child(void)
{
    /* The parent's thread is not here; its socket and uffds are the
     * parent's (a uffd acts on the parent's memory), its scratch ranges
     * are not mapped here (MADV_DONTFORK). */
    pthread_mutex_init(&lock, NULL);
    pthread_mutex_init(&moving, NULL);
    if (agent_fd >= 0)
        close(agent_fd);
    agent_fd = -1;
    for (int i = 0; i < n_allowed; i++)
        if (allowed[i].uffd >= 0)
            close(allowed[i].uffd);
    n_allowed = 0;
}

/* The allowed range that holds [start, start + len), copied to *out. */
static int find_allowed(uint64_t start, uint64_t len, struct allowed_range *out)
{
    int ok = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_allowed && !ok; i++) {
        ok = start >= allowed[i].start && len <= allowed[i].end - start && start < allowed[i].end;
        if (ok && out)
            *out = allowed[i];
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

static void pause_briefly(void)
{
    struct timespec ts = {0, 100 * 1000}; /* the pager reads the event that stopped us meanwhile */
    nanosleep(&ts, NULL);
}

/* UFFDIO_MOVE of len bytes, retried while an event is unread (EAGAIN) and
 * the region is still allowed (its close does not wait for a pager that
 * stopped reading its uffd). *done: the bytes moved, from the start. 0, or
 * -1 with errno (for the page at *done). */
static int move_pages(const struct allowed_range *r, uint64_t dst, uint64_t src, uint64_t len, uint64_t *done)
{
    *done = 0;
    for (;;) {
        int64_t moved;
        int rc = up_uffd_move(r->uffd, dst + *done, src + *done, len - *done, 0, &moved);
        *done += (uint64_t)moved;
        if (rc == 0 || *done == len)
            return 0;
        if (errno != EAGAIN || !find_allowed(r->start, r->end - r->start, NULL))
            return -1;
        pause_briefly();
    }
}

static int move_page(const struct allowed_range *r, uint64_t dst, uint64_t src)
{
    uint64_t done;
    return move_pages(r, dst, src, UP_PAGE_SIZE, &done);
}

/* A page found written after its move goes back where it was: missing
 * there, its faults held by the pager. Moved back (or copied, should the
 * move refuse) it has no uffd-wp bit, so the next write-back's scan sees
 * it written and stores it. Should it have been filled meanwhile (a pager
 * that took over knows nothing of this move-out), the bytes are written
 * into the present page, which marks it written all the same. */
static void put_back(const struct allowed_range *r, uint64_t addr, uint64_t out)
{
    if (move_page(r, addr, out) == 0)
        return;
    for (;;) {
        int64_t done;
        if (errno == EEXIST) {
            memcpy((void *)(uintptr_t)addr, (const void *)(uintptr_t)out, UP_PAGE_SIZE);
            return;
        }
        if (errno != EAGAIN && errno != EBUSY)
            return; /* no other error leaves the page anywhere but out: see move_page */
        if (!find_allowed(r->start, r->end - r->start, NULL))
            return; /* the region is being closed */
        if (up_uffd_copy(r->uffd, addr, (const void *)(uintptr_t)out, UP_PAGE_SIZE, 0, &done) == 0)
            return;
        if (errno == EAGAIN)
            pause_briefly();
    }
}

/* Which pages of [start, start + len) are present and unwritten since
 * their last write-protect (or the shared zero page, which a write would
 * replace): *mask, bit k for page k. 0, or -1 if the scan failed. */
static int unwritten_pages(int pagemap_fd, uint64_t start, uint64_t len, uint64_t *mask)
{
    struct page_region vec[UP_AGENT_MOVE_MAX];
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .start = start,
        .end = start + len,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = UP_AGENT_MOVE_MAX,
        .category_mask = PAGE_IS_PRESENT,
        .return_mask = PAGE_IS_PRESENT | PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
    };
    int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (got < 0)
        return -1;
    *mask = 0;
    for (int i = 0; i < got; i++) {
        if ((vec[i].categories & PAGE_IS_WRITTEN) && !(vec[i].categories & PAGE_IS_PFNZERO))
            continue;
        for (uint64_t a = vec[i].start; a < vec[i].end; a += UP_PAGE_SIZE)
            *mask |= (uint64_t)1 << ((a - start) / UP_PAGE_SIZE);
    }
    return 0;
}

static uint8_t before[SCRATCH_LEN]; /* the agent's thread only, one move-out at a time */

/* Takes the unwritten pages of [start, start + len) out of the region:
 * each is copied while a scan after the copy still calls it unwritten (so
 * the copy holds what the store holds), moved out to the scratch range
 * (from then on a fault on it waits in the pager), and compared there:
 * unchanged, it is dropped; changed, a write came between the scan and
 * the move, and the page goes back. Returns the mask of the pages dropped;
 * *err: 0 or the errno that stopped it early. */
static uint64_t move_out(const struct allowed_range *r, int mem_fd, int pagemap_fd, uint64_t start, uint64_t len,
                         int64_t *err)
{
    int n = (int)(len / UP_PAGE_SIZE);
    uint64_t readable = 0, moved = 0, dropped = 0;
    if (pread(mem_fd, before, len, (off_t)start) == (ssize_t)len) {
        readable = n == 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1);
    } else {
        for (int k = 0; k < n; k++) /* a missing page fails the read of a run: page by page */
            if (pread(mem_fd, before + k * UP_PAGE_SIZE, UP_PAGE_SIZE, (off_t)(start + k * UP_PAGE_SIZE)) ==
                UP_PAGE_SIZE)
                readable |= (uint64_t)1 << k;
    }
    uint64_t unwritten;
    if (unwritten_pages(pagemap_fd, start, len, &unwritten) < 0) {
        *err = errno;
        return 0;
    }
    uint64_t candidates = readable & unwritten;
    pthread_mutex_lock(&moving);
    for (int k = 0; k < n;) { /* one move a run of candidates */
        if (!(candidates >> k & 1)) {
            k++;
            continue;
        }
        int stop = k;
        while (stop < n && candidates >> stop & 1)
            stop++;
        uint64_t done;
        int rc = move_pages(r, r->scratch + k * UP_PAGE_SIZE, start + k * UP_PAGE_SIZE,
                            (uint64_t)(stop - k) * UP_PAGE_SIZE, &done);
        int got = (int)(done / UP_PAGE_SIZE);
        for (int j = k; j < k + got; j++)
            moved |= (uint64_t)1 << j;
        if (rc == 0) {
            k = stop;
        } else if (errno == EBUSY || errno == ENOENT) {
            k += got + 1; /* EBUSY: shared with a forked child; ENOENT: gone meanwhile. Kept, both. */
        } else {
            *err = errno;
            break;
        }
    }
    for (int k = 0; k < n; k++) {
        if (!(moved >> k & 1))
            continue;
        uint64_t out = r->scratch + k * UP_PAGE_SIZE;
        if (memcmp((const void *)(uintptr_t)out, before + k * UP_PAGE_SIZE, UP_PAGE_SIZE) == 0)
            dropped |= (uint64_t)1 << k;
        else
            put_back(r, start + k * UP_PAGE_SIZE, out);
    }
    /* Free the scratch pages. Unregistered meanwhile: MADV_DONTNEED of a
     * registered range would queue a REMOVE event and wait for the pager,
     * which may be closing the region and reading no more. */
    if (moved) {
        uint64_t ioctls;
        if (up_uffd_unregister(r->uffd, r->scratch, SCRATCH_LEN) < 0 ||
            madvise((void *)(uintptr_t)r->scratch, SCRATCH_LEN, MADV_DONTNEED) < 0 ||
            up_uffd_register(r->uffd, r->scratch, SCRATCH_LEN, UFFDIO_REGISTER_MODE_MISSING, &ioctls) < 0)
            *err = errno; /* a later move-out finds the scratch unusable, and moves nothing */
    }
    pthread_mutex_unlock(&moving); /* and up_agent_forget may take the scratch range away */
    return dropped;
}

static void *serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    int mem_fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    int pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    struct up_agent_request req;
    for (;;) {
        ssize_t n = recv(fd, &req, sizeof(req), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof(req))
            break; /* the pager is gone (0), or sent garbage: stop serving it */
        struct up_agent_reply rep = {.seq = req.seq, .err = 0, .dropped = 0};
        struct allowed_range r;
        if (req.start % UP_PAGE_SIZE || req.len % UP_PAGE_SIZE || !req.len || !find_allowed(req.start, req.len, &r))
            rep.err = EINVAL;
        else if (req.kind == UP_AGENT_DROP) {
            if (madvise((void *)(uintptr_t)req.start, req.len, MADV_DONTNEED) < 0)
                rep.err = errno;
        } else if (req.kind == UP_AGENT_MOVE_OUT && r.uffd >= 0 && req.len <= SCRATCH_LEN) {
            if (mem_fd < 0 || pagemap_fd < 0)
                rep.err = EBADF;
            else
                rep.dropped = move_out(&r, mem_fd, pagemap_fd, req.start, req.len, &rep.err);
        } else
            rep.err = EINVAL;
        while (send(fd, &rep, sizeof(rep), MSG_NOSIGNAL) < 0 && errno == EINTR)
            ;
    }
    pthread_mutex_lock(&lock);
    if (agent_fd == fd)
        agent_fd = -1;
    pthread_mutex_unlock(&lock);
    close(fd);
    if (mem_fd >= 0)
        close(mem_fd);
    if (pagemap_fd >= 0)
        close(pagemap_fd);
    return NULL;
}

int up_agent_start(int fd)
{
    pthread_mutex_lock(&lock);
    if (!atfork_installed) {
        int rc = pthread_atfork(before_fork, in_parent, in_child);
        if (rc != 0) {
            pthread_mutex_unlock(&lock);
            errno = rc;
            return -1;
        }
        atfork_installed = 1;
    }
    pthread_mutex_unlock(&lock);
    pthread_attr_t attr;
    pthread_t thread;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    /* Signals go to the program's own threads, never to the agent. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&thread, &attr, serve, (void *)(intptr_t)fd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    pthread_mutex_lock(&lock);
    agent_fd = fd;
    pthread_mutex_unlock(&lock);
    return 0;
}

/* The scratch range of a region whose pages are moved out: its own
 * anonymous mapping registered with the region's uffd (UFFDIO_MOVE's
 * destination must be), never inherited by a child. */
static uint64_t new_scratch(int uffd)
{
    void *p = mmap(NULL, SCRATCH_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    uint64_t ioctls;
    if (madvise(p, SCRATCH_LEN, MADV_DONTFORK) < 0 ||
        up_uffd_register(uffd, (uint64_t)(uintptr_t)p, SCRATCH_LEN, UFFDIO_REGISTER_MODE_MISSING, &ioctls) < 0) {
        int err = errno;
        munmap(p, SCRATCH_LEN);
        errno = err;
        return 0;
    }
    return (uint64_t)(uintptr_t)p;
}

int up_agent_allow(uint64_t start, uint64_t len, int uffd)
{
    struct allowed_range r = {.start = start, .end = start + len, .uffd = -1, .scratch = 0};
    if (uffd >= 0) {
        if ((r.uffd = fcntl(uffd, F_DUPFD_CLOEXEC, 0)) < 0)
            return -1;
        if (!(r.scratch = new_scratch(r.uffd))) {
            int err = errno;
            close(r.uffd);
            errno = err;
            return -1;
        }
    }
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (n_allowed == MAX_ALLOWED)
        rc = -1;
    else
        allowed[n_allowed++] = r;
    pthread_mutex_unlock(&lock);
    if (rc < 0) {
        if (r.uffd >= 0) {
            up_uffd_unregister(r.uffd, r.scratch, SCRATCH_LEN);
            munmap((void *)(uintptr_t)r.scratch, SCRATCH_LEN);
            close(r.uffd);
        }
        errno = ENOSPC;
    }
    return rc;
}

void up_agent_forget(uint64_t start)
{
    struct allowed_range gone = {.uffd = -1};
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_allowed; i++) {
        if (allowed[i].start == start) {
            gone = allowed[i];
            allowed[i] = allowed[--n_allowed];
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (gone.uffd < 0)
        return;
    /* A move-out under way uses the scratch range and the uffd until it
     * is done; no longer allowed, it stops waiting for its pager. */
    pthread_mutex_lock(&moving);
    pthread_mutex_unlock(&moving);
    /* Unregistered first: an munmap of a registered range waits for the
     * pager to read its UNMAP event. */
    up_uffd_unregister(gone.uffd, gone.scratch, SCRATCH_LEN);
    munmap((void *)(uintptr_t)gone.scratch, SCRATCH_LEN);
    close(gone.uffd);
}
