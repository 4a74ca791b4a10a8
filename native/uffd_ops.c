/* userfaultfd creation and ioctls: one thin function per ioctl. */
#include "uffd_native.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int up_uffd_create(int user_mode_only)
{
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    /* The syscall refuses callers without CAP_SYS_PTRACE while
     * vm.unprivileged_userfaultfd is 0; /dev/userfaultfd (5.11+) is gated by
     * its file mode instead, so try it before giving up. */
    int saved = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) {
        errno = saved;
        return -1;
    }
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    saved = errno;
    close(dev);
    errno = saved;
    return fd;
}

int up_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -1;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

int up_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -1;
    *ioctls_out = reg.ioctls;
    return 0;
}

int up_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &range);
}

int up_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range);
}

int up_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp);
}

/* The kernel writes progress into the last field: bytes done, or -errno. */
static int progress(int rc, int64_t reported, int64_t *done)
{
    *done = reported > 0 ? reported : 0;
    return rc < 0 ? -1 : 0;
}

int up_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_copy copy = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode};
    int rc = ioctl(fd, UFFDIO_COPY, &copy);
    return progress(rc, copy.copy, done);
}

int up_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_zeropage zp = {.range = {.start = start, .len = len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &zp);
    return progress(rc, zp.zeropage, done);
}

int up_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_continue cont = {.range = {.start = start, .len = len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_CONTINUE, &cont);
    return progress(rc, cont.mapped, done);
}

int up_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_poison poison = {.range = {.start = start, .len = len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_POISON, &poison);
    return progress(rc, poison.updated, done);
}

int up_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_move move = {.dst = dst, .src = src, .len = len, .mode = mode};
    int rc = ioctl(fd, UFFDIO_MOVE, &move);
    return progress(rc, move.move, done);
}

static void flatten(const struct uffd_msg *m, struct up_msg *out)
{
    memset(out, 0, sizeof(*out));
    out->event = m->event;
    switch (m->event) {
    case UFFD_EVENT_PAGEFAULT:
        out->a = m->arg.pagefault.flags;
        out->b = m->arg.pagefault.address;
        out->c = m->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_FORK:
        out->a = m->arg.fork.ufd;
        break;
    case UFFD_EVENT_REMAP:
        out->a = m->arg.remap.from;
        out->b = m->arg.remap.to;
        out->c = m->arg.remap.len;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        out->a = m->arg.remove.start;
        out->b = m->arg.remove.end;
        break;
    }
}

int up_uffd_read_raw(int fd, struct uffd_msg *msgs, int max)
{
    ssize_t n = read(fd, msgs, sizeof(*msgs) * (size_t)max);
    if (n < 0)
        return errno == EAGAIN ? 0 : -1;
    return (int)(n / (ssize_t)sizeof(*msgs));
}

int up_uffd_read(int fd, struct up_msg *out, int max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64;
    int n = up_uffd_read_raw(fd, msgs, max);
    for (int i = 0; i < n; i++)
        flatten(&msgs[i], &out[i]);
    return n;
}

void up_msg_flatten(const struct uffd_msg *m, struct up_msg *out)
{
    flatten(m, out);
}
