/* System calls the Python standard library does not wrap (3.11). */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

int up_mprotect(uint64_t addr, uint64_t len, int prot)
{
    return mprotect((void *)(uintptr_t)addr, (size_t)len, prot);
}

int up_munmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, (size_t)len);
}

int up_start_writeback(int fd, uint64_t offset, uint64_t len)
{
    return sync_file_range(fd, (off_t)offset, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

int up_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len);
}

int64_t up_fs_type(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return -1;
    return (int64_t)(uint64_t)st.f_type;
}

int up_tgkill(int tgid, int tid, int sig)
{
    return tgkill(tgid, tid, sig);
}

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

int up_pidfd_getfd(int pidfd, int targetfd)
{
    /* The new descriptor is close-on-exec (pidfd_getfd sets O_CLOEXEC). */
    return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
}
