"""`Region`: a mapped range of this process whose pages live in a store."""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

from uffd_pager import protocol
from uffd_pager.uffd import Uffd, buffer_address, protect

if TYPE_CHECKING:
    from uffd_pager.client import Pager


class Region:
    """Memory at `address` of `size` bytes, paged from `store` at `offset`.

    Made by `Pager.map`. A context manager; `close()` unregisters and unmaps.
    A Region inherited by a forked child serves the child too; closing it in
    the child ends the child's use only.
    """

    def __init__(self, pager: "Pager", region_id: int, memory: mmap.mmap, address: int, size: int,
                 store: str, offset: int, uffd: Uffd) -> None:
        self._pager = pager
        self._id = region_id
        self._memory: mmap.mmap | None = memory
        self._uffd: Uffd | None = uffd
        self._address = address
        self._size = size
        self.store = store
        self.offset = offset

    @property
    def address(self) -> int:
        """Where the region is mapped now (an mremap by the program moves it)."""
        return buffer_address(self._memory) if self._memory is not None else self._address

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._memory is None

    def view(self) -> memoryview:
        """A writable memoryview of the whole region (numpy.frombuffer works on it)."""
        if self._memory is None:
            raise ValueError("the region is closed")
        return memoryview(self._memory)

    def stats(self) -> dict[str, Any]:
        """Counters of this region as the pager keeps them: faults, copies,
        zero fills, duplicate faults, write faults, resident pages, events,
        errors and poisoned pages."""
        if self._memory is None:
            raise ValueError("the region is closed")
        return self._pager._request("stats", region=self._id)["stats"]

    def flush(self) -> dict[str, int]:
        """Returns once every page dirtied before the call is in the store and
        synced (msync(MS_SYNC) semantics): {"pages": n, "bytes": n} written.
        If the store refuses (ENOSPC, EIO, read-only), raises with the cause;
        the pages stay dirty and the next flush() retries them."""
        if self._memory is None:
            raise ValueError("the region is closed")
        reply = self._pager._request("flush", region=self._id)
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
        if self._uffd is not None:
            try:
                self._pager._request("unmap", region=self._id)  # flushes first; raises if that fails
            except (protocol.PagerGone, KeyError):
                pass  # nothing left to write back or release on the pager's side
        memory, self._memory = self._memory, None
        uffd, self._uffd = self._uffd, None
        if uffd is not None:
            try:
                uffd.unregister(self.address, self.size)
            except OSError:
                pass  # the range is gone already (munmap by the program)
            uffd.close()
        # In a forked child, munmap alone releases it: the pager reads the
        # UNMAP event on the child's uffd and drops the child's state.
        try:
            memory.close()
        except BufferError:
            protect(self.address, self.size, mmap.PROT_NONE)
            memory.madvise(mmap.MADV_DONTNEED)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's uffd must not act on the parent's
        memory from here, and the child's pages are served through the uffd
        the kernel made for the child, which only the pager holds."""
        if self._uffd is not None:
            os.close(self._uffd.fd)
            self._uffd.fd = -1
            self._uffd = None

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.address:#x}+{self.size:#x}"
        return f"<Region {state} {self.store} @ {self.offset}>"
