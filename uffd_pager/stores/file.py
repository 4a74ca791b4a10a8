"""A store that is one local file: ``file:///absolute/path``.

Holes and bytes past the end of the file read as zero, so a sparse file of
any size (or an empty one) can back a region.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from uffd_pager.errors import StoreReadOnly
from uffd_pager.stores.base import BadPage, BlockingStore, Extent
from uffd_pager.uffd import PAGE_SIZE, Run, filesystem_type, punch_hole, pwrite_runs, start_writeback

# statfs f_type of filesystems whose files are a process's memory or the
# kernel's state rather than data (linux/magic.h).
PSEUDO_FILESYSTEMS = {
    0x9FA0: "procfs", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x27E0EB: "cgroupfs", 0x63677270: "cgroup2fs", 0xCAFE4A11: "bpffs",
    0x6E736673: "nsfs", 0x62656570: "configfs", 0xDE5E81E4: "efivarfs", 0x6165676C: "pstore",
}


def file_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: a file URL names a local path (file:///path), not host {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a file URL takes no query or fragment")
    path = unquote(parts.path)
    if "\0" in path:
        raise ValueError(f"{url!r}: the path holds a NUL byte (%00)")
    if os.path.normpath(path).split("/")[1:2] in (["proc"], ["sys"], ["dev"]):
        # Names of a process's descriptors and memory, or of the kernel's state:
        # a store's URL must name the same data wherever it is opened again.
        raise ValueError(f"{url!r}: a store is a regular file, not a name under /proc, /sys or /dev")
    if not path.startswith("/"):
        raise ValueError(f"{url!r}: the path must be absolute, e.g. file:///tmp/data.bin")
    return path


class FileStore(BlockingStore):
    direct = True

    def __init__(self, url: str, path: str, fd: int, writable: bool) -> None:
        self.url = url
        self.path = path
        self._fd = fd
        self.writable = writable

    @classmethod
    def from_fd(cls, url: str, fd: int) -> "FileStore":
        """A store of a descriptor the client opened (and this store now
        owns): readable, a regular file on a filesystem that holds data
        (not /proc, /sys and their kind, whose "files" are a process's
        memory or the kernel's state), writable if it was opened so."""
        try:
            path = file_path(url)
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, f"store {path} is not a regular file")
            fs_type = filesystem_type(fd)
            if fs_type in PSEUDO_FILESYSTEMS:
                raise OSError(errno.EINVAL, f"store {path} is on {PSEUDO_FILESYSTEMS[fs_type]}, not a filesystem "
                                            "that holds data: only regular files can be stores")
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            if access == os.O_WRONLY:
                raise OSError(errno.EBADF, f"store {path}: its descriptor was opened write-only")
        except BaseException:
            os.close(fd)
            raise
        return cls(url, path, fd, writable=access == os.O_RDWR)

    @classmethod
    def open(cls, url: str) -> "FileStore":
        """Opens the file with this process's own rights (tools and tests;
        the pager only ever gets descriptors, see from_fd)."""
        return cls.from_fd(url, open_store_file(url))

    def upgrade(self, other: "FileStore") -> None:
        """Takes other's descriptor of the same file if it may write and this
        one may not. dup2 keeps the descriptor's number, which the C fill
        state of every portion in this store holds."""
        if other.identity != self.identity:
            raise ValueError(f"{other.url} is not the file of {self.url}")
        if other.writable and not self.writable:
            os.dup2(other.local_fd, self._fd, inheritable=False)
            self.writable = True

    @property
    def local_fd(self) -> int:
        return self._fd

    @property
    def identity(self) -> tuple[object, ...]:
        st = os.fstat(self._fd)
        return ("file", st.st_dev, st.st_ino)

    def end(self) -> int:
        return os.fstat(self._fd).st_size

    def discard_blocking(self, offset: int, length: int) -> None:
        if length:
            punch_hole(self._fd, offset, length)

    def discard_locally(self, offset: int, length: int) -> bool:
        self.discard_blocking(offset, length)
        return True

    def read_page(self, offset: int) -> bytes:
        data = os.pread(self._fd, PAGE_SIZE, offset)
        return data + bytes(PAGE_SIZE - len(data))

    def read_blocking(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        return [self.read_page(offset) for offset in offsets]

    def write_blocking(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        self.write_runs([Run(0, offset, length) for offset, length in extents], data)

    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise StoreReadOnly(errno.EBADF, f"store {self.url} was opened read-only: the pager may not write it")
        if runs:
            pwrite_runs(self._fd, runs, data)
            self._start_writeback(runs)

    def _start_writeback(self, runs: list[Run]) -> None:
        # Start the disk on this batch now: the copy of the next batch then
        # overlaps the I/O, and the final fdatasync finds little left to do.
        start = min(run.store_offset for run in runs)
        start_writeback(self._fd, start, max(run.store_offset + run.length for run in runs) - start)

    def sync_blocking(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_store_file(url: str) -> int:
    """Opens a file store's file with the caller's own rights (the client
    does, and passes the descriptor): read-write if it may, else read-only
    (write-back then says so). O_NONBLOCK: opening a FIFO must not block,
    and it is refused as not a regular file."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"a store is a URL such as file:///path/to/file, not {url!r}")
    if urlsplit(url).scheme != "file":
        raise ValueError(f"unknown store scheme {urlsplit(url).scheme!r} in {url!r}; supported: file://")
    path = file_path(url)
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, os.O_RDWR | flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ETXTBSY):
            raise _explain(exc, path) from None
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc2:
            raise _explain(exc2, path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"store {path} is not a regular file")
    return fd


def _explain(exc: OSError, path: str) -> OSError:
    reasons = {
        errno.ENOENT: "no such file (create it first, e.g. truncate -s SIZE FILE)",
        errno.EISDIR: "is a directory, not a file",
        errno.EACCES: "permission denied: the pager's user cannot read it",
        errno.EPERM: "permission denied: the pager's user cannot read it",
        errno.ENOTDIR: "a component of the path is not a directory",
    }
    reason = reasons.get(exc.errno or 0, os.strerror(exc.errno or 0))
    return OSError(exc.errno, f"store {path}: {reason}")
