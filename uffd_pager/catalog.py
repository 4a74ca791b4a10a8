"""The durable catalog of an encrypted store: per-page nonce, tag and
version, the store's id, the key it belongs to, and the nonce counter.

One file beside the store (``<store>.uffd-catalog``, mode 0600), written by
the pager only: a 4 KiB header, then one fixed 40-byte record per page of
the store at ``4096 + page * 40`` (a sparse file: pages never written have
no record and read as zero). It never holds the key, only the key's id (an
HMAC), which is how a wrong key is refused when a region is mapped. Its
records are what make a rolled-back store detectable: the store can put
back old bytes, but not the tag the catalog holds for the page now.

Why not SQLite: writing the records of a 16 MiB flush (4096 rows) took
15 ms in one SQLite transaction here, about as long as the flush itself;
as records it is one pwrite per run of pages.

Nonces come from a counter: the catalog reserves a block of them (durably,
in the header) before any is used, so a pager that crashes or restarts skips
the rest of a block rather than reuse a nonce.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from uffd_pager.crypto import NONCE_BYTES, RECORD_BYTES, TAG_BYTES, Key
from uffd_pager.uffd import punch_hole

NONCE_BLOCK = 1 << 16
SUFFIX = ".uffd-catalog"

MAGIC = b"UFFDCAT1"
HEADER = struct.Struct("<8s16s16sQ")  # magic, key id, store id, next unreserved nonce
HEADER_BYTES = 4096
RECORD = struct.Struct(f"<Q{NONCE_BYTES}s{TAG_BYTES}s4x")  # version (0: none), nonce, tag
assert RECORD.size == RECORD_BYTES  # native/aead.c writes them

PageMeta = tuple[int, bytes, bytes]  # (version, nonce, tag)


def unpack_record(record: bytes) -> PageMeta:
    version, nonce, tag = RECORD.unpack(record)
    return version, nonce, tag


class Catalog:
    def __init__(self, path: str, key: Key) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            key_id = bytes.fromhex(key.key_id)
            fcntl.lockf(self._fd, fcntl.LOCK_EX)  # another pager may be creating it too
            try:
                header = os.pread(self._fd, HEADER.size, 0)
                if not header:
                    # Counter 0 is never used: a record's version is its
                    # counter, and version 0 means "no record".
                    self.store_id = os.urandom(16)
                    self._write_header(key_id, 1)
                    header = os.pread(self._fd, HEADER.size, 0)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            magic, stored_key_id, self.store_id, nonce_next = HEADER.unpack(header)
            if magic != MAGIC:
                raise ValueError(f"{path} is not a uffd-pager catalog")
            if stored_key_id != key_id:
                raise PermissionError(errno.EACCES, f"wrong key for {path[:-len(SUFFIX)]}: it is encrypted under "
                                                    f"key id {stored_key_id.hex()}, this key's id is {key.key_id}")
            self._key_id = key_id
        except BaseException:
            os.close(self._fd)
            raise
        # No block is held yet: the first nonce taken reserves one (under
        # the file lock), whatever other pagers reserved since we read.
        self._nonce_next = self._nonce_end = nonce_next

    @classmethod
    def beside(cls, store_path: str, key: Key) -> "Catalog":
        return cls(store_path + SUFFIX, key)

    def _write_header(self, key_id: bytes, nonce_next: int) -> None:
        os.pwrite(self._fd, HEADER.pack(MAGIC, key_id, self.store_id, nonce_next), 0)
        os.fdatasync(self._fd)

    def get(self, page: int) -> bytes | None:
        """The page's record (see unpack_record), or None."""
        record = os.pread(self._fd, RECORD.size, HEADER_BYTES + page * RECORD.size)
        return record if len(record) == RECORD.size and any(record[:8]) else None

    def take_nonces(self, count: int) -> int:
        """Reserves count consecutive nonces; returns the first counter.

        A new block is taken from the header under an exclusive lock of the
        file, re-reading the counter there: two pagers (two daemons, or the
        private pagers of two programs) may have the same store open."""
        with self._lock:
            if self._nonce_next + count > self._nonce_end:
                fcntl.lockf(self._fd, fcntl.LOCK_EX)
                try:
                    _magic, _key_id, _store_id, stored = HEADER.unpack(os.pread(self._fd, HEADER.size, 0))
                    start = max(stored, self._nonce_next)
                    end = start + count + NONCE_BLOCK
                    self._write_header(self._key_id, end)
                finally:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)
                self._nonce_next, self._nonce_end = start, end
            first = self._nonce_next
            self._nonce_next += count
            return first

    @property
    def fd(self) -> int:
        return self._fd

    def write(self, first_pages: list[tuple[int, int]], records: bytes) -> None:
        """Records the pages just written to the store (durable at sync()):
        records holds the records of each (first page, count) run in turn."""
        at = 0
        for first, count in first_pages:
            os.pwrite(self._fd, records[at:at + count * RECORD.size], HEADER_BYTES + first * RECORD.size)
            at += count * RECORD.size

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def forget(self, first: int, count: int) -> None:
        """Drops the pages of a discarded range (a portion slot being reused)."""
        punch_hole(self._fd, HEADER_BYTES + first * RECORD.size, count * RECORD.size)

    def close(self) -> None:
        os.close(self._fd)


def read_records(path: str) -> dict[int, PageMeta]:
    """Every page record of a catalog file: {page: (version, nonce, tag)}
    (for inspection and tests)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    body = data[HEADER_BYTES:]
    body = body[: len(body) // RECORD.size * RECORD.size]
    return {page: meta for page, meta in enumerate(RECORD.iter_unpack(body)) if meta[0]}
