"""A store that is one local file: ``file:///absolute/path``.

Holes and bytes past the end of the file read as zero, so a sparse file of
any size (or an empty one) can back a region.
"""
from __future__ import annotations

import errno
import os
import stat
from urllib.parse import unquote, urlsplit

from uffd_pager.stores.base import Store
from uffd_pager.uffd import PAGE_SIZE, Run, punch_hole, pwrite_runs, start_writeback


def file_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: a file URL names a local path (file:///path), not host {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a file URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"{url!r}: the path must be absolute, e.g. file:///tmp/data.bin")
    return path


class FileStore(Store):
    def __init__(self, url: str, path: str, fd: int, writable: bool) -> None:
        self.url = url
        self.path = path
        self._fd = fd
        self.writable = writable

    @classmethod
    def open(cls, url: str) -> "FileStore":
        path = file_path(url)
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise _explain(exc, path) from None
            # Readable but not writable: serve reads; write-back reports it.
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc2:
                raise _explain(exc2, path) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"store {path} is not a regular file")
        return cls(url, path, fd, writable)

    @property
    def fill_fd(self) -> int:
        return self._fd

    @property
    def identity(self) -> tuple[object, ...]:
        st = os.fstat(self._fd)
        return ("file", st.st_dev, st.st_ino)

    def end(self) -> int:
        return os.fstat(self._fd).st_size

    def discard(self, offset: int, length: int) -> None:
        punch_hole(self._fd, offset, length)

    def read_page(self, offset: int) -> bytes:
        data = os.pread(self._fd, PAGE_SIZE, offset)
        return data + bytes(PAGE_SIZE - len(data))

    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise PermissionError(errno.EACCES, f"store {self.url} was opened read-only: the pager may not write it")
        pwrite_runs(self._fd, runs, data)
        self._start_writeback(runs)

    def _start_writeback(self, runs: list[Run]) -> None:
        # Start the disk on this batch now: the copy of the next batch then
        # overlaps the I/O, and the final fdatasync finds little left to do.
        start = min(run.store_offset for run in runs)
        start_writeback(self._fd, start, max(run.store_offset + run.length for run in runs) - start)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
