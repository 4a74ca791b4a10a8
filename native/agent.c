/*
 * The client's page-out agent: a thread that drops the pages the pager
 * names, with MADV_DONTNEED in this process.
 *
 * Kernel facts this relies on:
 * - MADV_DONTNEED must be called by the process that owns the memory:
 *   process_madvise() refuses it for another process, and MADV_PAGEOUT
 *   would swap (or, without swap, do nothing) instead of dropping.
 * - MADV_DONTNEED on a range registered with a uffd that has
 *   UFFD_FEATURE_EVENT_REMOVE queues a REMOVE event and blocks until the
 *   pager reads it; the next access to a dropped page is a MISSING fault,
 *   which the pager fills from the store.
 * - A thread does not survive fork(): the child starts with no agent
 *   (pthread_atfork resets this state), and gets a new one when it claims
 *   its regions.
 *
 * The agent never takes the GIL, so a Python thread stuck in a fault does
 * not stop it. It drops only ranges inside regions the library allowed
 * (up_agent_allow), whatever the pager asks.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_ALLOWED 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    uint64_t start, end;
} allowed[MAX_ALLOWED];
static int n_allowed;
static int agent_fd = -1;
static int atfork_installed;

static void in_child(void)
{
    /* The parent's thread is not here; its socket is the parent's. */
    pthread_mutex_init(&lock, NULL);
    if (agent_fd >= 0)
        close(agent_fd);
    agent_fd = -1;
    n_allowed = 0;
}

static int is_allowed(uint64_t start, uint64_t len)
{
    int ok = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_allowed && !ok; i++)
        ok = start >= allowed[i].start && len <= allowed[i].end - start && start < allowed[i].end;
    pthread_mutex_unlock(&lock);
    return ok;
}

static void *serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    struct up_agent_request req;
    for (;;) {
        ssize_t n = recv(fd, &req, sizeof(req), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof(req))
            break; /* the pager is gone (0), or sent garbage: stop serving it */
        struct up_agent_reply rep = {.seq = req.seq, .err = 0};
        if (req.start % UP_PAGE_SIZE || req.len % UP_PAGE_SIZE || !req.len || !is_allowed(req.start, req.len))
            rep.err = EINVAL;
        else if (madvise((void *)(uintptr_t)req.start, req.len, MADV_DONTNEED) < 0)
            rep.err = errno;
        while (send(fd, &rep, sizeof(rep), MSG_NOSIGNAL) < 0 && errno == EINTR)
            ;
    }
    pthread_mutex_lock(&lock);
    if (agent_fd == fd)
        agent_fd = -1;
    pthread_mutex_unlock(&lock);
    close(fd);
    return NULL;
}

int up_agent_start(int fd)
{
    pthread_mutex_lock(&lock);
    if (!atfork_installed) {
        int rc = pthread_atfork(NULL, NULL, in_child);
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

int up_agent_allow(uint64_t start, uint64_t len)
{
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (n_allowed == MAX_ALLOWED) {
        errno = ENOSPC;
        rc = -1;
    } else {
        allowed[n_allowed].start = start;
        allowed[n_allowed].end = start + len;
        n_allowed++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

void up_agent_forget(uint64_t start)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_allowed; i++) {
        if (allowed[i].start == start) {
            allowed[i] = allowed[--n_allowed];
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}
