"""`Region`: a mapped range of this process whose pages live in a store."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

from uffd_pager import protocol
from uffd_pager.native import ffi, lib
from uffd_pager.stores.file import open_store_file
from uffd_pager.uffd import PAGE_SIZE, Tracking, Uffd, buffer_address, protect, unmap


_PROT_NONE = 0  # the mmap module exports PROT_READ/WRITE/EXEC only
_MAP_NORESERVE = 0x4000  # reserve no swap: a 1 TiB region costs only what is touched

# Mappings the program moved or cut itself: unmapped by hand where they are
# now, and their mmap objects kept forever so that nothing unmaps the range
# they were created at (which may hold the program's own memory by now).
_abandoned: list[mmap.mmap] = []

# Held across every step during which a range is registered but no pager
# reads its uffd, and by every os.fork() of this process (client.py hooks
# it): a fork then would queue a FORK event nobody reads, and fork() would
# block forever with the GIL held.
fork_lock = threading.RLock()

log = logging.getLogger("uffd_pager.client")


class RegionMapping(mmap.mmap):
    """The anonymous private mapping under a region, with the client's copy
    of its userfaultfd. Whatever drops the last reference (close(), or the
    garbage collector after a failed close()) unregisters the range first:
    an munmap of a registered range waits until someone reads the UNMAP
    event, and once the pager is gone no one will.

    An *orphaned* mapping (its pager is gone) is never unregistered nor
    unmapped: unregistering would wake the threads waiting on its missing
    pages into zeros, and the writes not yet flushed live only here. It
    stays until the process exits (see `orphan`)."""

    uffd: Uffd | None = None
    # The store files, catalogs and key memfd passed to the pager, kept open
    # for the region's life: a pager that takes over from a dead one finds
    # them here (uffd_pager/takeover.py).
    kept_fds: tuple[int, ...] = ()
    registered: int = 0
    orphaned: bool = False
    pager_alive: Callable[[], bool] = staticmethod(lambda: True)

    @classmethod
    def create(cls, length: int, pager_alive: Callable[[], bool]) -> "RegionMapping":
        memory = cls(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        memory.pager_alive = pager_alive
        return memory

    def orphan(self) -> None:
        """Keeps the mapping, registered, for the rest of the process's life.
        A reference is leaked on purpose: the interpreter's own teardown
        would otherwise free the object and munmap the range, which blocks
        forever on the UNMAP event (the range is registered, nobody reads)."""
        if not self.orphaned:
            self.orphaned = True
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))

    def release_uffd(self, spans: list[tuple[int, int]] | None = None) -> None:
        uffd, self.uffd = self.uffd, None
        kept, self.kept_fds = self.kept_fds, ()
        for fd in kept:
            os.close(fd)
        if uffd is None:
            return
        lib.up_agent_forget(buffer_address(self))  # the page-out agent may no longer drop pages here
        for start, end in spans or [(buffer_address(self), buffer_address(self) + self.registered)]:
            try:
                uffd.unregister(start, end - start)
            except OSError:
                pass  # gone already (the program's munmap)
        uffd.close()

    def __del__(self) -> None:
        if self.closed or self.orphaned:
            return
        if self.uffd is not None and not self.pager_alive():
            self.orphan()  # resurrected and kept: see orphan()
            return
        self.release_uffd()


def allow_page_out(address: int, size: int, uffd: Uffd, tracking: Tracking) -> None:
    """Lets this process's page-out agent take pages out of the region
    only; under "async" tracking it moves them out through the region's
    uffd (native/agent.c), so it keeps a duplicate of it until forgotten."""
    if lib.up_agent_allow(address, size, uffd.fd if tracking == Tracking.ASYNC_WP else -1) < 0:
        err = ffi.errno
        log.warning("page-out agent: region at %#x is not capped: %s", address, os.strerror(err))


def start_agent() -> int:
    """Starts this process's page-out agent (native/agent.c) on one end of a
    socket pair; returns the other end, for the pager."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    if lib.up_agent_start(fd) < 0:
        err = ffi.errno
        os.close(fd)
        theirs.close()
        raise OSError(err, f"cannot start the page-out agent's thread: {os.strerror(err)}")
    return theirs.detach()


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

    def __init__(self, channel: protocol.Channel, owner: object, region_id: int, memory: RegionMapping,
                 address: int, size: int, store: str, offset: int, *,
                 page_out: Tracking | None = None, follows_fork: bool = True) -> None:
        self._channel = channel  # requests about this region go there
        self._page_out = page_out  # capped: the region's tracking, by which page-out takes its pages
        self._follows_fork = follows_fork  # False: MADV_DONTFORK, a forked child has no such memory
        self._owner = owner  # the Pager: kept alive (and its pager process) while the region is
        self._id = region_id
        self._memory: RegionMapping | None = memory
        self._owner_pid = os.getpid()  # the process whose pager state _id names
        self.address = address
        self.size = size
        self.store = store
        self.offset = offset

    @property
    def closed(self) -> bool:
        return self._memory is None

    @property
    def pager_id(self) -> int:
        """The region's id at the pager (this process's copy's, in a forked child)."""
        return self._id

    @property
    def served_here(self) -> bool:
        """Whether the pager serves this process's copy (not a forked copy that failed to claim it)."""
        return self._owner_pid == os.getpid()

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

    def prefetch(self, offset: int = 0, length: int | None = None) -> int:
        """Fills the missing pages of [offset, offset + length) (the rest of
        the region if length is None) now, before they are touched: from a
        file in runs, from a remote store in pipelined batches. Best effort:
        a page it cannot fill is filled on first touch as ever. Returns
        the pages filled."""
        if length is None:
            length = self.size - offset
        return self._request("prefetch", offset=offset, length=length)["pages"]

    def flush(self) -> dict[str, int]:
        """Returns once every page dirtied before the call is in the store and
        synced (msync(MS_SYNC) semantics): {"pages": n, "bytes": n} written.
        If the store refuses (ENOSPC, EIO, read-only), raises with the cause;
        the pages stay dirty and the next flush() retries them. In a forked
        child it also completes the child's portion with the pages it still
        inherits, so the portion alone holds the child's view."""
        reply = self._request_writing("flush")
        return {"pages": reply["pages"], "bytes": reply["bytes"]}

    def close(self) -> None:
        """Writes back dirty pages, unregisters the range and unmaps it. If
        the write-back fails, raises and leaves the region open: nothing is
        lost, and close() can be called again.

        If the pager is gone, raises PagerGone and leaves the region open
        and mapped: its unflushed writes are still in memory, and threads
        waiting on missing pages keep waiting (they would read zeros if the
        range were unregistered). The mapping then stays until the process
        exits.

        Memoryviews still alive at that point are made inaccessible (an access
        faults with SIGSEGV rather than reading stale memory); the address
        range is returned to the system when the last of them is released.
        """
        if self._memory is None:
            return
        spans: list[tuple[int, int]] | None = None
        # From the pager's last read of the uffd until the range is
        # unregistered, a fork() would block forever: hold it off.
        with fork_lock:
            try:
                reply = self._request_writing("unmap")  # flushes first; raises if that fails
                spans = [(start, end) for start, end in reply["spans"]]
            except protocol.PagerGone:
                self._memory.orphan()
                raise
            except KeyError:
                pass  # the pager no longer serves it: nothing to write back or release there
            memory, self._memory = self._memory, None
            whole = [(self.address, self.address + self.size + PAGE_SIZE)]
            moved = spans is not None and spans != whole
            memory.release_uffd(spans if moved else None)
        if moved:
            # The program moved or cut the mapping: unmap it where it is now.
            for start, end in spans or ():
                unmap(start, end - start)
            _abandoned.append(memory)
            return
        try:
            memory.close()
        except BufferError:
            protect(self.address, self.size + PAGE_SIZE, _PROT_NONE)
            memory.madvise(mmap.MADV_DONTNEED)

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._memory is None:
            raise ValueError("the region is closed")
        if self._owner_pid != os.getpid():
            raise protocol.PagerGone(f"this forked process could not claim its copy of the region from the pager "
                                     f"at fork: {self._adopt_error}")
        return self._channel.request(op, region=self._id, **fields)

    _adopt_error: str = ""
    _forked = False  # this process's region is a forked child's copy

    def _request_writing(self, op: str) -> dict[str, Any]:
        """A request that writes back. If the store was read-only when it was
        mapped (a read-only mount since remounted, a mode since changed), it
        is opened again for writing, with this process's rights, once."""
        try:
            return self._request(op)
        except protocol.StoreReadOnly:
            if self._forked:
                raise
            fd = open_store_file(self.store)
            try:
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
                    raise
                self._channel.request("reopen", (fd,), region=self._id, fds=["store"])
            finally:
                os.close(fd)
        return self._request(op)

    def _adopt_in_child(self) -> None:
        """In a forked child, at once (an at-fork hook): the parent's uffd
        must not act on the parent's memory from here (nor be unregistered:
        that would act on the parent's range); the child's own uffd was made
        by the kernel in the pager's fd table only, so claim it back, or the
        child would read zeros if the pager died. The claim proves which of
        the pager's uffds is ours: the tag page, read through our uffd, holds
        a token the pager put there for that uffd alone (a thread id would
        not do: in a pid namespace it is not the pager's). If the claim fails
        the region is made inaccessible: an access is a SIGSEGV, never zeros."""
        memory = self._memory
        if memory is None:
            return
        if memory.uffd is not None:
            memory.uffd.close()
            memory.uffd = None
        if not self._follows_fork:
            # Not mapped in this process (MADV_DONTFORK): nothing to claim,
            # and never unmapped from here (the range may hold other memory).
            self._adopt_error = "the region does not follow fork() (its process had no CAP_SYS_PTRACE)"
            memory.orphan()
            return
        try:
            # Missing first: a fork racing map() may have copied in the page
            # of the pager's check of the parent's uffd.
            memory.madvise(mmap.MADV_DONTNEED, self.size, PAGE_SIZE)
            token = ctypes.string_at(self.address + self.size, protocol.CLAIM_TOKEN_SIZE).hex()
            # Missing again, so that our own forked children fault on it too.
            memory.madvise(mmap.MADV_DONTNEED, self.size, PAGE_SIZE)
            # A capped region stays capped in the child: its agent is made
            # here (the parent's thread is not) and handed with the claim.
            agent = start_agent() if self._page_out is not None and not self._channel.agent_started else -1
            try:
                passed = (agent,) if agent >= 0 else ()
                reply, fds = self._channel.request_fds("adopt", passed, region=self._id, token=token,
                                                       fds=["agent"] if agent >= 0 else [])
            finally:
                if agent >= 0:
                    os.close(agent)
            if agent >= 0:
                self._channel.agent_started = True
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise protocol.ProtocolError(f"adopt answered with {len(fds)} descriptors, not the child's uffd")
        except Exception as exc:  # an at-fork hook must not raise
            self._adopt_error = f"{type(exc).__name__}: {exc}"
            log.error("uffd_pager: forked pid %d cannot claim region %#x+%#x from its pager (%s); "
                      "the region is made inaccessible in this process", os.getpid(), self.address, self.size,
                      self._adopt_error)
            protect(self.address, self.size + PAGE_SIZE, _PROT_NONE)
            memory.orphan()
            return
        memory.uffd = Uffd(fds[0])
        if self._page_out is not None:
            allow_page_out(self.address, self.size, memory.uffd, self._page_out)
        self._forked = True
        self._id = reply["region"]
        self._owner_pid = os.getpid()

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.address:#x}+{self.size:#x}"
        return f"<Region {state} {self.store} @ {self.offset}>"
