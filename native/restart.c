/*
 * The private pager's restarter: a thread of the client that waits on a
 * pidfd of the pager process the library started (Pager()) and, when it
 * dies, starts the next one, which takes every region over from its
 * durable state (takeover.py).
 *
 * Kernel and libc facts this relies on:
 * - A pidfd (pidfd_open, Linux 5.3) polls readable once its process has
 *   exited; waitid(P_PIDFD) (5.4) reaps our child through it. The pid is
 *   not freed before the reap, so the pidfd of a spawned child, opened
 *   right after the spawn, names that child even if it died at once.
 * - A thread stuck in a fault on a registered range keeps what it holds
 *   (the GIL): this thread never takes the GIL nor touches a region's
 *   memory, and allocates nothing once started (a fault can stop a thread
 *   inside malloc too): argv, envp and the spawn's file actions and
 *   attributes are prepared, copied, beforehand.
 * - glibc's posix_spawn is clone(CLONE_VM | CLONE_VFORK) on a stack of its
 *   own, with no atfork handler and no lock of the program's taken. The
 *   file action adddup2(fd, UP_RESTART_LISTEN_FD) gives the child the
 *   listening socket without FD_CLOEXEC (adddup2(fd, fd) clears it, glibc
 *   2.29), and addclosefrom_np (2.34) closes every other inherited
 *   descriptor, as subprocess's close_fds does. The socket stays
 *   close-on-exec here and the program keeps its copy open: the abstract
 *   address stays bound across the restart, and a connection made while
 *   no pager runs waits in the backlog for the next one.
 * - The child starts with the spawning thread's signal mask: this thread
 *   blocks every signal, so the spawn sets an empty mask, and SIGPIPE and
 *   SIGXFSZ (which Python ignores) back to their defaults.
 * - The new pager fetches the program's descriptors with pidfd_getfd,
 *   which needs PTRACE_MODE_ATTACH_REALCREDS over the program: the same
 *   uid and a dumpable program, or CAP_SYS_PTRACE. Yama's ptrace_scope 1
 *   lets only an ancestor attach, unless the program names the attacher
 *   with prctl(PR_SET_PTRACER, pid): done right after each spawn, well
 *   before the pager's Python is up (EINVAL: no Yama, nothing to do).
 * - A thread does not survive fork(): a forked child of the program has no
 *   restarter; the library's after-fork hook drops the child's copy of
 *   this state (up_restart_forget) without the lock, which the thread may
 *   have held at the fork.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif

#define MAX_RESTARTS 64

struct up_restart {
    pthread_mutex_t lock;
    char **argv, **envp;
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    int listen_fd;
    int stop_fd; /* an eventfd: readable once the library asks the thread to stop */
    int pidfd;   /* of the current pager; -1 once it is gone for good */
    pid_t pid;
    int state;
    int restarts;
    int max_restarts;
    int64_t window_ns;
    int64_t started_at[MAX_RESTARTS]; /* the latest restarts' times, a ring */
    int thread_started;
    pthread_t thread;
};

static char **copy_strings(char *const *strings)
{
    size_t n = 0;
    while (strings[n])
        n++;
    char **copy = calloc(n + 1, sizeof(char *));
    if (!copy)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (!(copy[i] = strdup(strings[i]))) {
            while (i--)
                free(copy[i]);
            free(copy);
            return NULL;
        }
    }
    return copy;
}

static void free_strings(char **strings)
{
    for (size_t i = 0; strings && strings[i]; i++)
        free(strings[i]);
    free(strings);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void say(const char *text)
{
    /* write(2), not stdio: no lock a stuck thread may hold. */
    size_t len = strlen(text);
    while (len) {
        ssize_t n = write(STDERR_FILENO, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

/* Spawns a pager; its pid and pidfd, or -1 with errno. */
static int spawn_pager(struct up_restart *r, pid_t *pid_out)
{
    pid_t pid;
    int rc = posix_spawn(&pid, r->argv[0], &r->actions, &r->attr, r->argv, r->envp);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    /* Refused (EINVAL: no Yama): the pager says what it cannot take over. */
    (void)prctl(PR_SET_PTRACER, (unsigned long)pid, 0, 0, 0);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        int err = errno;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        errno = err;
        return -1;
    }
    *pid_out = pid;
    return pidfd;
}

/* Whether another restart stays within max_restarts in the window. */
static int may_restart(struct up_restart *r, int64_t now)
{
    int n = r->restarts < r->max_restarts ? r->restarts : r->max_restarts;
    int within = 0;
    for (int i = 0; i < n; i++)
        within += now - r->started_at[i] < r->window_ns;
    return within < r->max_restarts;
}

static void unbind_locked(struct up_restart *r)
{
    /* Unbound, the address refuses connections: the library's requests
     * fail at once instead of waiting in the backlog for no pager. */
    if (r->listen_fd >= 0)
        close(r->listen_fd);
    r->listen_fd = -1;
}

void up_restart_unbind(struct up_restart *r)
{
    pthread_mutex_lock(&r->lock);
    unbind_locked(r);
    pthread_mutex_unlock(&r->lock);
}

static void give_up(struct up_restart *r, int state, const char *why)
{
    pthread_mutex_lock(&r->lock);
    r->state = state;
    close(r->pidfd);
    r->pidfd = -1;
    r->pid = 0;
    unbind_locked(r);
    pthread_mutex_unlock(&r->lock);
    if (why)
        say(why);
}

static void *watch(void *arg)
{
    struct up_restart *r = arg;
    for (;;) {
        struct pollfd fds[2] = {{.fd = r->stop_fd, .events = POLLIN}, {.fd = r->pidfd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents)
            break;
        if (!fds[1].revents)
            continue;
        siginfo_t info = {0};
        /* ECHILD: the program reaped it itself (a wait() for any child). */
        while (syscall(SYS_waitid, P_PIDFD, r->pidfd, &info, WEXITED, NULL) < 0 && errno == EINTR)
            ;
        char why[256];
        if (info.si_code == CLD_EXITED && info.si_status == 0) {
            /* It chose to stop (idle, or SIGTERM): nothing to restart. */
            give_up(r, UP_RESTART_ENDED, NULL);
            break;
        }
        int64_t now = now_ns();
        if (!may_restart(r, now)) {
            snprintf(why, sizeof(why),
                     "uffd_pager: the private pager died %d times within %.0f s; not starting it again (threads "
                     "waiting on missing pages of its regions keep waiting; requests raise PagerGone)\n",
                     r->max_restarts, (double)r->window_ns / 1e9);
            give_up(r, UP_RESTART_GAVE_UP, why);
            break;
        }
        pid_t pid;
        int pidfd = spawn_pager(r, &pid);
        if (pidfd < 0) {
            snprintf(why, sizeof(why), "uffd_pager: the private pager died and cannot be started again: %s\n",
                     strerror(errno));
            give_up(r, UP_RESTART_GAVE_UP, why);
            break;
        }
        pthread_mutex_lock(&r->lock);
        close(r->pidfd);
        r->pidfd = pidfd;
        r->pid = pid;
        r->started_at[r->restarts % r->max_restarts] = now;
        r->restarts++;
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

struct up_restart *up_restart_spawn(char *const argv[], char *const envp[], int listen_fd, int max_restarts,
                                    int window_ms)
{
    if (max_restarts < 0 || max_restarts > MAX_RESTARTS || window_ms < 0) {
        errno = EINVAL;
        return NULL;
    }
    struct up_restart *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    pthread_mutex_init(&r->lock, NULL);
    r->listen_fd = listen_fd;
    r->stop_fd = -1;
    r->pidfd = -1;
    r->max_restarts = max_restarts;
    r->window_ns = (int64_t)window_ms * 1000000;
    int err = 0;
    sigset_t none, defaults;
    sigemptyset(&none);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGXFSZ);
    if (!(r->argv = copy_strings(argv)) || !(r->envp = copy_strings(envp)))
        err = ENOMEM;
    else if ((err = posix_spawn_file_actions_init(&r->actions)) == 0
             && (err = posix_spawnattr_init(&r->attr)) == 0
             && (err = posix_spawn_file_actions_addopen(&r->actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)) == 0
             && (err = posix_spawn_file_actions_adddup2(&r->actions, listen_fd, UP_RESTART_LISTEN_FD)) == 0
             && (err = posix_spawn_file_actions_addclosefrom_np(&r->actions, UP_RESTART_LISTEN_FD + 1)) == 0
             && (err = posix_spawnattr_setsigmask(&r->attr, &none)) == 0
             && (err = posix_spawnattr_setsigdefault(&r->attr, &defaults)) == 0)
        err = posix_spawnattr_setflags(&r->attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (!err && (r->stop_fd = eventfd(0, EFD_CLOEXEC)) < 0)
        err = errno;
    if (!err && (r->pidfd = spawn_pager(r, &r->pid)) < 0)
        err = errno;
    if (err) {
        r->listen_fd = -1; /* still the caller's */
        up_restart_free(r);
        errno = err;
        return NULL;
    }
    r->state = UP_RESTART_WATCHING;
    return r;
}

int up_restart_start(struct up_restart *r)
{
    if (r->max_restarts == 0) {
        errno = EINVAL;
        return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    /* Signals go to the program's own threads, never to this one. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&r->thread, NULL, watch, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    r->thread_started = 1;
    return 0;
}

void up_restart_stop(struct up_restart *r)
{
    if (!r->thread_started)
        return;
    uint64_t one = 1;
    while (write(r->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
    pthread_join(r->thread, NULL);
    r->thread_started = 0;
}

int up_restart_status(struct up_restart *r, struct up_restart_status *out)
{
    pthread_mutex_lock(&r->lock);
    out->state = r->state;
    out->pid = r->pid;
    out->restarts = r->restarts;
    out->alive = 0;
    if (r->pidfd >= 0) {
        struct pollfd p = {.fd = r->pidfd, .events = POLLIN};
        out->alive = poll(&p, 1, 0) == 0;
    }
    pthread_mutex_unlock(&r->lock);
    return 0;
}

int up_restart_take_pidfd(struct up_restart *r)
{
    pthread_mutex_lock(&r->lock);
    int fd = r->pidfd;
    r->pidfd = -1;
    pthread_mutex_unlock(&r->lock);
    return fd;
}

void up_restart_free(struct up_restart *r)
{
    int fds[] = {r->listen_fd, r->stop_fd, r->pidfd};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
        if (fds[i] >= 0)
            close(fds[i]);
    posix_spawn_file_actions_destroy(&r->actions);
    posix_spawnattr_destroy(&r->attr);
    free_strings(r->argv);
    free_strings(r->envp);
    free(r);
}

void up_restart_forget(struct up_restart *r)
{
    /* In a forked child: the thread is not here, and the pager is not this
     * process's child; the descriptors are copies, closed here only. */
    r->thread_started = 0;
    up_restart_free(r);
}
