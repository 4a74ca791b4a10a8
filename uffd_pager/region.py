"""`Region`: a mapped range of this process whose pages live in a store."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uffd_pager import protocol
from uffd_pager.uffd import PAGE_SIZE, Uffd, buffer_address, protect, unmap

if TYPE_CHECKING:
    from uffd_pager.client import Pager


_PROT_NONE = 0  # the mmap module exports PROT_READ/WRITE/EXEC only
_MAP_NORESERVE = 0x4000  # reserve no swap: a 1 TiB region costs only what is touched

# Mappings the program moved or cut itself: unmapped by hand where they are
# now, and their mmap objects kept forever so that nothing unmaps the range
# they were created at (which may hold the program's own memory by now).
_abandoned: list[mmap.mmap] = []


class RegionMapping(mmap.mmap):
    """The anonymous private mapping under a region, with the client's copy
    of its userfaultfd. Whatever drops the last reference (close(), or the
    garbage collector after a failed close()) unregisters the range first:
    an munmap of a registered range waits until someone reads the UNMAP
    event, and once the pager is gone no one will."""

    uffd: Uffd | None = None
    registered: int = 0

    @classmethod
    def create(cls, length: int) -> "RegionMapping":
        return cls(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def release_uffd(self, spans: list[tuple[int, int]] | None = None) -> None:
        uffd, self.uffd = self.uffd, None
        if uffd is None:
            return
        for start, end in spans or [(buffer_address(self), buffer_address(self) + self.registered)]:
            try:
                uffd.unregister(start, end - start)
            except OSError:
                pass  # gone already (the program's munmap)
        uffd.close()

    def __del__(self) -> None:
        if not self.closed:
            self.release_uffd()


@dataclass(frozen=True)
class Backing:
    """Where this process's portion of a region lives."""

    url: str
    offset: int


class Region:
    """Memory at `address` of `size` bytes, paged from `store` at `offset`.

    Made by `Pager.map`. A context manager; `close()` writes back, unregisters
    and unmaps. A Region inherited by a forked child serves the child too:
    there `flush()`, `close()`, `stats()` and `backing()` act on the child's
    own portion, and closing it ends the child's use only.

    The mapping is one page longer than `size`: the tag page past the end,
    which a forked child reads once so that the pager learns its pid.
    """

    def __init__(self, pager: "Pager", region_id: int, memory: RegionMapping, address: int, size: int,
                 store: str, offset: int) -> None:
        self._pager = pager
        self._id = region_id
        self._memory: RegionMapping | None = memory
        self._owner_pid = os.getpid()  # the process whose pager state _id names
        self._lock = threading.Lock()
        self.address = address
        self.size = size
        self.store = store
        self.offset = offset

    @property
    def closed(self) -> bool:
        return self._memory is None

    def view(self) -> memoryview:
        """A writable memoryview of the whole region (numpy.frombuffer works on it)."""
        if self._memory is None:
            raise ValueError("the region is closed")
        return memoryview(self._memory)[: self.size]

    def stats(self) -> dict[str, Any]:
        """Counters of this process's region as the pager keeps them (see README)."""
        return self._request("stats")["stats"]

    def backing(self) -> Backing | None:
        """Where this process's portion lives: the store URL and the byte
        offset of the region's first page. None in a forked child whose
        portion is not placed yet (it is, at its first access or flush)."""
        reply = self._request("backing")
        return None if reply["offset"] is None else Backing(reply["url"], reply["offset"])

    def flush(self) -> dict[str, int]:
        """Returns once every page dirtied before the call is in the store and
        synced (msync(MS_SYNC) semantics): {"pages": n, "bytes": n} written.
        If the store refuses (ENOSPC, EIO, read-only), raises with the cause;
        the pages stay dirty and the next flush() retries them. In a forked
        child it also completes the child's portion with the pages it still
        inherits, so the portion alone holds the child's view."""
        reply = self._request("flush")
        return {"pages": reply["pages"], "bytes": reply["bytes"]}

    def close(self) -> None:
        """Writes back dirty pages, unregisters the range and unmaps it. If
        the write-back fails, raises and leaves the region open: nothing is
        lost, and close() can be called again.

        Memoryviews still alive at that point are made inaccessible (an access
        faults with SIGSEGV rather than reading stale memory); the address
        range is returned to the system when the last of them is released.
        """
        if self._memory is None:
            return
        spans: list[tuple[int, int]] | None = None
        try:
            reply = self._request("unmap")  # flushes first; raises if that fails
            spans = [(start, end) for start, end in reply["spans"]]
        except (protocol.PagerGone, KeyError):
            pass  # nothing left to write back or release on the pager's side
        memory, self._memory = self._memory, None
        whole = [(self.address, self.address + self.size + PAGE_SIZE)]
        if spans is not None and spans != whole:
            # The program moved or cut the mapping: unmap it where it is now.
            memory.release_uffd(spans)
            for start, end in spans:
                unmap(start, end - start)
            _abandoned.append(memory)
            return
        memory.release_uffd()
        try:
            memory.close()
        except BufferError:
            protect(self.address, self.size + PAGE_SIZE, _PROT_NONE)
            memory.madvise(mmap.MADV_DONTNEED)

    def _request(self, op: str) -> dict[str, Any]:
        if self._memory is None:
            raise ValueError("the region is closed")
        with self._lock:
            if self._owner_pid != os.getpid():
                self._adopt()
        return self._pager._request(op, region=self._id)

    def _adopt(self) -> None:
        """First call in a forked child: make the pager see this process's
        pid on the child's uffd (a read of the tag page is a fault there,
        which carries our thread id), then claim the child's region."""
        assert self._memory is not None
        ctypes.string_at(self.address + self.size, 1)
        # Missing again, so that our own forked children fault on it too.
        self._memory.madvise(mmap.MADV_DONTNEED, self.size, PAGE_SIZE)
        reply = self._pager._request("adopt", region=self._id)
        self._id = reply["region"]
        self._owner_pid = os.getpid()

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's uffd must not act on the parent's
        memory from here (and must not be unregistered: that would act on the
        parent's range), and the child's pages are served through the uffd
        the kernel made for the child, which only the pager holds."""
        self._lock = threading.Lock()
        if self._memory is not None and self._memory.uffd is not None:
            self._memory.uffd.close()
            self._memory.uffd = None

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.address:#x}+{self.size:#x}"
        return f"<Region {state} {self.store} @ {self.offset}>"
