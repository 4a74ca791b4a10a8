/*
 * Benchmark helpers: the shared timing loop, and the C reference handler
 * that every uffd_pager figure is compared with. The reference is the
 * simplest correct handler: poll, read one message, pread the page,
 * UFFDIO_COPY it. It runs either as a thread of the faulting process or in a
 * forked process that runs only this C code (no Python after fork). Its
 * clustered form (read-ahead's floor) copies `cluster` pages from the
 * faulting one on, straight from a read-only mapping of the file, with one
 * UFFDIO_COPY.
 */
#include "uffd_native.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void up_touch_pages(uint64_t base, const uint64_t *offsets, int n, int write, int64_t *latency_ns)
{
    for (int i = 0; i < n; i++) {
        volatile char *p = (char *)(uintptr_t)(base + offsets[i]);
        int64_t t0 = now_ns();
        if (write)
            *p = (char)(i | 1);
        else
            (void)*p;
        latency_ns[i] = now_ns() - t0;
    }
}

struct up_ref {
    int uffd, file_fd, stop_pipe[2];
    uint64_t base, file_offset;
    uint64_t len, cluster;      /* clustered: the range's length, pages per copy (0: one page, by pread) */
    const uint8_t *map;         /* clustered: the file, mapped from file_offset over len */
    int64_t served;
    pthread_t thread;
    pid_t pid;
    int result_pipe[2];
};

/* Serves faults until stop_fd becomes readable; returns faults served. */
static int64_t ref_loop(struct up_ref *r)
{
    static __thread uint8_t buf[UP_PAGE_SIZE] __attribute__((aligned(UP_PAGE_SIZE)));
    struct pollfd pfd[2] = {{.fd = r->uffd, .events = POLLIN}, {.fd = r->stop_pipe[0], .events = POLLIN}};
    int64_t served = 0;
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (pfd[1].revents)
            return served;
        struct uffd_msg msg;
        if (read(r->uffd, &msg, sizeof(msg)) != sizeof(msg) || msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = msg.arg.pagefault.address & ~(uint64_t)(UP_PAGE_SIZE - 1);
        int64_t done;
        if (r->cluster) {
            uint64_t at = addr - r->base, n = r->cluster * UP_PAGE_SIZE;
            if (n > r->len - at)
                n = r->len - at;
            if (up_uffd_copy(r->uffd, addr, r->map + at, n, 0, &done) == 0)
                served++;
            else if (errno == EEXIST)
                up_uffd_wake(r->uffd, addr, UP_PAGE_SIZE);
            continue;
        }
        ssize_t n = pread(r->file_fd, buf, UP_PAGE_SIZE, (off_t)(r->file_offset + addr - r->base));
        if (n < UP_PAGE_SIZE)
            memset(buf + (n > 0 ? n : 0), 0, UP_PAGE_SIZE - (size_t)(n > 0 ? n : 0));
        if (up_uffd_copy(r->uffd, addr, buf, UP_PAGE_SIZE, 0, &done) == 0)
            served++;
        else if (errno == EEXIST)
            up_uffd_wake(r->uffd, addr, UP_PAGE_SIZE);
    }
}

static void *ref_thread(void *arg)
{
    struct up_ref *r = arg;
    r->served = ref_loop(r);
    return NULL;
}

static struct up_ref *ref_new(int uffd, int file_fd, uint64_t base, uint64_t file_offset)
{
    struct up_ref *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->uffd = uffd;
    r->file_fd = file_fd;
    r->base = base;
    r->file_offset = file_offset;
    r->pid = -1;
    r->result_pipe[0] = r->result_pipe[1] = -1;
    if (pipe(r->stop_pipe) < 0) {
        free(r);
        return NULL;
    }
    return r;
}

static void ref_free(struct up_ref *r)
{
    int saved = errno;
    if (r->map)
        munmap((void *)r->map, r->len);
    close(r->stop_pipe[0]);
    close(r->stop_pipe[1]);
    if (r->result_pipe[0] >= 0)
        close(r->result_pipe[0]);
    free(r);
    errno = saved;
}

struct up_ref *up_ref_start_thread(int uffd, int file_fd, uint64_t base, uint64_t file_offset)
{
    struct up_ref *r = ref_new(uffd, file_fd, base, file_offset);
    if (!r)
        return NULL;
    int rc = pthread_create(&r->thread, NULL, ref_thread, r);
    if (rc != 0) {
        ref_free(r);
        errno = rc;
        return NULL;
    }
    return r;
}

static struct up_ref *ref_start_process(struct up_ref *r)
{
    if (pipe(r->result_pipe) < 0) {
        ref_free(r);
        return NULL;
    }
    pid_t pid = fork();
    if (pid < 0) {
        ref_free(r);
        return NULL;
    }
    if (pid == 0) {
        /* Only async-signal-safe C from here on: the parent is a threaded
         * Python process. */
        int64_t served = ref_loop(r);
        if (write(r->result_pipe[1], &served, sizeof(served)) < 0)
            _exit(2);
        _exit(0);
    }
    close(r->result_pipe[1]);
    r->result_pipe[1] = -1;
    r->pid = pid;
    return r;
}

struct up_ref *up_ref_start_process(int uffd, int file_fd, uint64_t base, uint64_t file_offset)
{
    struct up_ref *r = ref_new(uffd, file_fd, base, file_offset);
    return r ? ref_start_process(r) : NULL;
}

struct up_ref *up_ref_start_cluster_process(int uffd, int file_fd, uint64_t base, uint64_t file_offset, uint64_t len,
                                            uint64_t cluster)
{
    struct up_ref *r = ref_new(uffd, file_fd, base, file_offset);
    if (!r)
        return NULL;
    void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, file_fd, (off_t)file_offset);
    if (map == MAP_FAILED) {
        ref_free(r);
        return NULL;
    }
    r->map = map;
    r->len = len;
    r->cluster = cluster ? cluster : 1;
    return ref_start_process(r);
}

int64_t up_ref_stop(struct up_ref *r)
{
    char c = 1;
    int64_t served = -1;
    if (write(r->stop_pipe[1], &c, 1) != 1)
        goto out;
    if (r->pid < 0) {
        pthread_join(r->thread, NULL);
        served = r->served;
    } else {
        if (read(r->result_pipe[0], &served, sizeof(served)) != sizeof(served))
            served = -1;
        waitpid(r->pid, NULL, 0);
    }
out:
    ref_free(r);
    return served;
}
