"""Serving page faults: each region's faults and events, as they arrive.

Kernel facts fault serving relies on
------------------------------------
A userfaultfd is bound to the address space (mm) of the process that created
it, not to the process holding the descriptor: clients create and register
it, then pass it here over the control socket, and every UFFDIO_* ioctl issued
from this process acts on the client's memory. A faulting client thread
sleeps in the kernel until a UFFDIO_COPY/ZEROPAGE/WAKE covers its address,
holding whatever it held (the GIL included), so nothing here may ever wait
for a client.

``read()`` on a uffd returns pending page faults before events (FORK, REMAP,
REMOVE, UNMAP). While an event is unread, UFFDIO_COPY, ZEROPAGE,
WRITEPROTECT, CONTINUE, POISON and MOVE fail with EAGAIN (the kernel's
``mmap_changing``); WAKE and (UN)REGISTER do not. The client that caused the
event (forking, mremapping, unmapping) is blocked until the event is read.
So a fault that fails with EAGAIN is kept, the uffd is drained, the events
are applied, and the fault is retried; events never wait behind a slow
fetch. After a FORK event is read, ``mmap_changing`` stays raised until the
forking thread itself runs again, and nothing new need arrive on the uffd to
bring us back: a fault deferred by EAGAIN is therefore retried on a timer
(backing off to a few milliseconds) until it is served.

A FORK event carries the child's new uffd, already installed in *our* fd
table when we read it, but no pid; the forking parent is blocked until we
read it. A fault's thread id (UFFD_FEATURE_THREAD_ID) is no use for finding
the child: the kernel reports it as the faulting task sees it
(task_pid_vnr), so in a container it is a namespace-local number that names
another process, or none, here. Every fault on the child's uffd is the
child's, though: its library reads the region's tag page (the page past the
region, which the root process never touches), that fault is filled with a
secret of that uffd's alone, and the child sends it back when it claims its
copy over its own connection, whose SO_PEERCRED pid the kernel translates
into our namespace (see PagerService._op_adopt). There is no exit event: after a process exits, ioctls on its uffd fail with
ESRCH, so owners are watched with a pidfd (readable when the process exits),
control connections with EOF, and children not yet known by a periodic
probe of their uffd.

The hot path (read a batch, pread, UFFDIO_COPY) runs in C (`FillRange.serve`);
this module handles what C hands back: a page of a store without a local
descriptor comes back as -EOPNOTSUPP and is fetched (fetch.py), then
placed with `FillRange.place`, unless C asked for it itself (-EINPROGRESS:
native/remote.c, for Redis on one server), which hands back to
`_handed_back` what it could not place.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from uffd_pager.crypto import PageAuthError
from uffd_pager.fetch import Fetcher, Result
from uffd_pager.layout import (
    Portion,
    copy_to_children,
    cut_span,
    move_span,
)
from uffd_pager.lineage import Lineage
from uffd_pager.regions import RegionTable
from uffd_pager.served import ServedRegion
from uffd_pager.stores.base import BadPage, HandedBack, UnauthenticPage
from uffd_pager.sigbus import find_thread, signal_thread
from uffd_pager.uffd import (
    PAGE_SIZE,
    Deferred,
    Feature,
    ForkEvent,
    PageFault,
    RemapEvent,
    RemoveEvent,
    Tracking,
    Uffd,
    UnmapEvent,
    available_features,
)

log = logging.getLogger("uffd_pager.pager")


# Faults to serve again later: an event is unread (EAGAIN), or the page is
# being dropped by page-out (EBUSY, see paging.py).
_LATER = (-errno.EAGAIN, -errno.EBUSY)

# Faults that lost their target (the process exited, or the page's mapping
# changed under the copy): wake the range so any thread still waiting
# refaults. A fault outside the region (EFAULT: it was grown or partly moved
# with mremap) has no backing page and is failed like an unreadable one.
_STALE_FAULT = (-errno.ESRCH, -errno.ENOENT)

# How long a forked child's faults wait for it to claim its uffd (see
# PagerService._wait_for_hand).
_HAND_TIMEOUT = 30.0

# Pages prefetch() fills from descriptors per turn of the loop: other
# regions' faults are served in between.
_PREFETCH_STEP = 4096


class _Ahead(NamedTuple):
    """A page of a store without a descriptor fetched ahead of any fault
    (read-ahead, prefetch): placed if it is still missing and still read
    from the same portion when it arrives, else dropped; a failure is left
    to the page's own fault to meet (and report)."""

    region: ServedRegion
    page: int  # its address in the client
    source: Portion
    done: Callable[[bool], None] | None  # told whether it was placed


class FaultHandler:
    """Reads each region's uffd when it is readable: serves what C can, and
    handles what it hands back (events, deferred faults, remote pages)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: RegionTable, lineage: Lineage) -> None:
        self._loop = loop
        self._table = table
        self._lineage = lineage
        self.fetcher = Fetcher(loop, self._fetched)
        table.serve_faults_of = self._on_faults
        table.handed_back = self._handed_back
        self.on_served: Callable[[ServedRegion], None] = lambda region: None  # page-out's check

    def _on_faults(self, region: ServedRegion) -> None:
        with self._table.holding(region), self.fetcher.batch():  # this read's faults: one batch per store
            self._serve_faults(region)
        self.on_served(region)

    def _serve_faults(self, region: ServedRegion) -> None:
        try:
            _served, deferred = region.fill.serve(region.uffd)
        except OSError as exc:
            log.warning("region %d: %s; releasing it", region.id, exc)
            self._table.release_region(region)
            return
        for item in deferred:
            self._take(region, item)
            if region.released:
                return
        if region.pending:
            self._retry_pending(region)
        if region.parent is not None and not region.released and not region.portion.placed \
                and region.fill.counters()["faults"] > region.tag_faults:
            region.portion.place()  # claim 7: the child's offset is chosen at its first access

    def _take(self, region: ServedRegion, item: Deferred) -> None:
        event = item.event
        if isinstance(event, PageFault):
            if item.status == -errno.EOPNOTSUPP:
                self._fetch(region, event, read_ahead=True)  # its page is in a store without a descriptor
            else:
                region.pending.append(event)
        elif isinstance(event, ForkEvent):
            region.events["fork"] += 1
            self._lineage.adopt_fork_child(region, event)
        elif isinstance(event, RemapEvent):
            region.events["remap"] += 1
            self._apply_remap(region, event)
        elif isinstance(event, RemoveEvent):
            if (event.start, event.end) != (region.tag_address, region.tag_address + PAGE_SIZE) \
                    and (event.start, event.end) not in region.dropping:
                region.events["remove"] += 1  # not the library's own drop of the tag page, nor page-out's
            region.fill.forget(event.start, event.end)
        elif isinstance(event, UnmapEvent):
            region.events["unmap"] += 1
            region.fill.forget(event.start, event.end)
            region.spans = cut_span(region.spans, event.start, event.end)
            # A forked child that unmapped its copy is done with it. A root
            # region stays until its client closes it or goes away.
            if not region.spans and region.parent is not None:
                self._table.release_region(region)

    def _retry_pending(self, region: ServedRegion) -> None:
        still: list[PageFault] = []
        waiting_for_hand = False
        for fault in region.pending:
            if fault.page in region.unfillable:
                rc = self._fail_page(region, fault, region.unfillable[fault.page])
            elif fault.page in region.fetched:
                rc = region.fill.place(region.uffd, fault, region.fetched[fault.page])
                if rc not in _LATER:
                    del region.fetched[fault.page]
            elif fault.page == region.tag_address:
                rc = self._serve_tag_page(region, fault)
            elif not region.handed and not fault.wp:
                rc = self._wait_for_hand(region, fault)
                waiting_for_hand = waiting_for_hand or rc == -errno.EAGAIN
            elif region.fork_policy == "on-access" and region.fill.defer_missing and not fault.wp:
                rc = self._serve_deferred(region, fault)
            else:
                rc = region.fill.fill_fault(region.uffd, fault)
            if rc in (0, -errno.EINPROGRESS):  # served, or a task serves it
                continue
            if rc == -errno.EOPNOTSUPP:
                self._fetch(region, fault, read_ahead=True)
                continue
            if rc in _LATER:
                still.append(fault)
            elif rc in _STALE_FAULT:
                _wake_quietly(region.uffd, fault.page)
            else:
                rc = self._fail_page(region, fault, rc)
                if rc == -errno.EAGAIN:
                    still.append(fault)
        region.pending = still
        if still:
            self._schedule_retry(region, slow=waiting_for_hand)
        else:
            region.retry_delay = 0.0

    def _schedule_retry(self, region: ServedRegion, *, slow: bool = False) -> None:
        """EAGAIN after a FORK event lasts until the forking thread runs
        again, with nothing new to read on the uffd: retry on a timer, from
        50 us backing off to 5 ms (100 ms while a child is not handed its
        uffd yet: its adopt request brings us back sooner)."""
        if region.retry_timer is not None or region.released:
            return
        region.retry_delay = 0.1 if slow else min(max(region.retry_delay * 2, 50e-6), 5e-3)
        region.retry_timer = self._loop.call_later(region.retry_delay, self.retry_now, region)

    def retry_now(self, region: ServedRegion) -> None:
        region.retry_timer = None
        if not region.released:
            with self._table.holding(region):
                self._serve_faults(region)
            self.on_served(region)

    def _wait_for_hand(self, region: ServedRegion, fault: PageFault) -> int:
        """A forked child's fault before its library took its own uffd back
        (see ServedRegion.handed) waits; after _HAND_TIMEOUT it fails loudly
        (the page is poisoned: SIGBUS), since a process forked without
        os.fork() never claims it, and serving it would leave the child
        reading zeros if this pager died."""
        if self._loop.time() - region.forked_at < _HAND_TIMEOUT:
            return -errno.EAGAIN
        log.error("region %d: a forked child (thread %d in its own pid namespace) touched its copy without "
                  "claiming it from the pager for %.0f s (forked without os.fork()?); failing the access",
                  region.id, fault.thread_id, _HAND_TIMEOUT)
        return -errno.ENOLCK

    def _serve_tag_page(self, region: ServedRegion, fault: PageFault) -> int:
        """A forked child's tag page holds its claim token (zeros after it),
        a root region's zeros."""
        region.tag_faults += 1
        try:
            if region.claim_token:
                region.uffd.copy(fault.page, region.claim_token.ljust(PAGE_SIZE, b"\0"))
            else:
                region.uffd.zeropage(fault.page, PAGE_SIZE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                return -(exc.errno or errno.EIO)
            _wake_quietly(region.uffd, fault.page)
        return 0

    def _fetch(self, region: ServedRegion, fault: PageFault, *, read_ahead: bool = False,
               since: int | None = None) -> None:
        """Fetches a missing page from the store of the portion that holds
        it (see fetch.py); `_fetched` places it. The region is held until
        then, so its store and state outlive the fetch. read_ahead: a fault
        seen for the first time, which feeds the read-ahead detector (as
        the C path does for its own); the window goes in the same batch.
        since: when the fault was first fetched (monotonic ns), for its
        latency (metrics.py)."""
        index = region.page_index(fault.page)
        source = region.portion.source(index)
        assert source.offset is not None  # the C path found it placed
        region.holds += 1
        started = since if since is not None else time.monotonic_ns() if region.fill.timing else 0
        self.fetcher.want(source.store, source.offset + index * PAGE_SIZE, (region, fault, source, started))
        fill = region.fill
        if read_ahead and fill.read_ahead[0] and not fill.defer_missing \
                and not (fault.write and fill.tracking == Tracking.SYNC_WP):  # as native/fill.c says why
            first, count, step = region.fill.advise(fault.page)
            self._fetch_ahead(region, (first + k * step for k in range(count)), None)

    def _fetch_ahead(self, region: ServedRegion, indices: Iterable[int], done: Callable[[bool], None] | None) -> int:
        """Wants the pages at indices that are missing and live in a store
        without a descriptor; returns how many it wants."""
        wanted = 0
        fill = region.fill
        for index in indices:
            address = fill.base + index * PAGE_SIZE
            if fill.is_resident(address):
                continue
            source = region.portion.source(index)
            if source.offset is None or source.store.local_fd >= 0:
                continue  # a descriptor's pages are C's to fill
            region.holds += 1
            wanted += 1
            self.fetcher.want(source.store, source.offset + index * PAGE_SIZE, _Ahead(region, address, source, done),
                              ahead=True)
        return wanted

    async def prefetch(self, region: ServedRegion, first: int, end: int) -> int:
        """Fills the missing pages of [first, end) (indices) now, as
        read-ahead would: from descriptors in runs, a slice per turn of the
        loop, the rest fetched in batches. Best effort: a page it cannot
        fill is left to its first touch (and so is every page while the
        on-access fork policy routes fills through itself). Returns the
        pages filled."""
        filled = 0
        for start in range(first, end, _PREFETCH_STEP):
            if region.released:
                return filled
            with self._table.holding(region):
                filled += region.fill.fill_ahead(region.uffd, start, min(_PREFETCH_STEP, end - start))
            await asyncio.sleep(0)
        if region.released:
            return filled
        arrived = self._loop.create_future()
        counts = {"waiting": 0, "placed": 0}

        def done(placed: bool) -> None:
            counts["waiting"] -= 1
            counts["placed"] += placed
            if counts["waiting"] == 0 and not arrived.done():
                arrived.set_result(None)

        if region.fill.defer_missing:
            return filled  # fork_policy="on-access": each page's fill goes through the policy, at its fault
        with self.fetcher.batch():
            counts["waiting"] = self._fetch_ahead(region, iter(range(first, end)), done)
        if counts["waiting"]:
            await arrived
        return filled + counts["placed"]

    def _handed_back(self, pages: list[HandedBack]) -> None:
        """Pages a store's C path (native/remote.c) asked for and did not
        place: fetched again through the fetch path, which retries, fails
        or reports them by its rules, or settled by what placing returned."""
        with self.fetcher.batch():
            for page in pages:
                region = self._table.regions.get(page.owner)
                if region is None or region.released:
                    continue
                fault = PageFault(page.address, page.flags, 0)
                if page.rc == -errno.EOPNOTSUPP:
                    self._fetch(region, fault)
                else:
                    self._settle(region, fault, page.rc)

    def _fetched(self, waiter: "tuple[ServedRegion, PageFault, Portion, int] | _Ahead", result: Result) -> None:
        if isinstance(waiter, _Ahead):
            self._fetched_ahead(waiter, result)
            return
        region, fault, source, started = waiter
        try:
            if region.released or isinstance(result, asyncio.CancelledError):
                return
            if isinstance(result, (BaseException, BadPage)):
                region.fetch_failures += 1
                region.last_error = f"{source.store.url}: {result}"
                rc = -errno.EBADMSG if isinstance(result, (PageAuthError, UnauthenticPage)) else -errno.EIO
                self._settle(region, fault, self._fail_page(region, fault, rc, cause=region.last_error))
                return
            if result is not None and len(result) != PAGE_SIZE:
                region.fetch_failures += 1
                region.last_error = f"{source.store.url}: a page of {len(result)} bytes"
                self._settle(region, fault, self._fail_page(region, fault, -errno.EIO, cause=region.last_error))
                return
            if region.portion.source(region.page_index(fault.page)) is not source:
                self._fetch(region, fault, since=started)  # copied into a child's own portion meanwhile: read it there
                return
            region.fetched_pages += 1
            rc = region.fill.place(region.uffd, fault, result)
            if rc == 0 and started:
                region.fill.time_fault(time.monotonic_ns() - started)
            if rc in _LATER:
                region.fetched[fault.page] = result
            self._settle(region, fault, rc)
        finally:
            self._table.let_go(region)

    def _fetched_ahead(self, ahead: _Ahead, result: Result) -> None:
        region = ahead.region
        placed = False
        try:
            if region.released or isinstance(result, (BaseException, BadPage)) \
                    or (result is not None and len(result) != PAGE_SIZE) or region.fill.is_resident(ahead.page):
                return
            if region.portion.source(region.page_index(ahead.page)) is not ahead.source:
                return  # copied into a child's own portion meanwhile: its fault reads it there
            placed = region.fill.place(region.uffd, PageFault(ahead.page, 0, 0), result) == 0
            region.read_ahead_fetched += placed
            region.fetched_pages += placed
        finally:
            if ahead.done is not None:
                ahead.done(placed)
            self._table.let_go(region)

    def _settle(self, region: ServedRegion, fault: PageFault, rc: int) -> None:
        """What became of a fault served outside _retry_pending (a fetch, a
        copy): kept for the retry timer, woken, or failed."""
        if rc == 0:
            return
        if rc in _LATER:
            region.pending.append(fault)
            self._schedule_retry(region)
        elif rc in _STALE_FAULT:
            _wake_quietly(region.uffd, fault.page)
        elif self._fail_page(region, fault, rc) == -errno.EAGAIN:
            region.pending.append(fault)
            self._schedule_retry(region)

    def _fail_page(self, region: ServedRegion, fault: PageFault, rc: int, *, cause: str | None = None) -> int:
        """The page's data could not be produced (the store failed, an
        encrypted page did not authenticate, the address is outside the
        region). It is never handed out as zeros or as unauthenticated
        bytes: poison it, so the access raises SIGBUS in the client (on a
        kernel without UFFDIO_POISON, SIGBUS is sent to the faulting thread).
        Returns -EAGAIN while an event keeps the poisoning from happening."""
        poison = Feature.POISON in available_features()
        if fault.page not in region.unfillable:
            region.errors += 1
            if rc == -errno.EBADMSG:
                region.auth_failures += 1
                reason = "its ciphertext fails authentication (altered, swapped or replayed in the store)"
            else:
                reason = cause or os.strerror(-rc)
            log.error("region %d: page %#x of pid %d cannot be filled: %s; %s", region.id, fault.page,
                      region.owner_pid, reason,
                      "poisoning it" if poison else "SIGBUS to the faulting thread (this kernel has no UFFDIO_POISON)")
        if not poison:
            return self._signal_faulting_thread(region, fault)
        try:
            region.uffd.poison(fault.page, PAGE_SIZE)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                region.unfillable[fault.page] = rc
                return -errno.EAGAIN
            if exc.errno == errno.EEXIST:
                _wake_quietly(region.uffd, fault.page)  # filled meanwhile (a stale fault)
            elif exc.errno not in (errno.ESRCH, errno.ENOENT):
                log.error("region %d: UFFDIO_POISON failed too: %s", region.id, exc)
        else:
            region.poisoned += 1
        region.unfillable.pop(fault.page, None)
        return 0

    def _signal_faulting_thread(self, region: ServedRegion, fault: PageFault) -> int:
        """Ends the access as poison would, with SIGBUS to the thread (see
        sigbus.py); the signal ends its wait, so the fault needs no answer.
        An unclaimed child is looked for in the pid namespace its nearest
        known ancestor forks into."""
        ancestor = region
        while ancestor.owner_pid <= 0 and ancestor.parent is not None:
            ancestor = ancestor.parent
        found = find_thread(fault.thread_id, region.owner_pid, ancestor.owner_pid)
        try:
            if found is None:
                raise OSError(errno.ESRCH, "no such thread")
            signal_thread(*found)
        except OSError as exc:
            log.warning("region %d: no SIGBUS for the thread that faulted on page %#x (%d in its pid namespace): %s",
                        region.id, fault.page, fault.thread_id, exc.strerror)
        else:
            region.poisoned += 1
        region.unfillable.pop(fault.page, None)
        return 0

    def _apply_remap(self, region: ServedRegion, event: RemapEvent) -> None:
        fill = region.fill
        region.spans = move_span(region.spans, event.old, event.new, event.length)
        if event.old == fill.base and event.length in (fill.length, fill.length + PAGE_SIZE):
            fill.move(event.new)
            return
        # Only part of the range moved: the moved pages keep their contents in
        # the client and are no longer ours; forget them so faults on what is
        # left are served from the store.
        log.warning("region %d: partial mremap of %#x+%#x; the moved part is no longer paged",
                    region.id, event.old, event.length)
        fill.forget(event.old, event.old + event.length)

    def _serve_deferred(self, region: ServedRegion, fault: PageFault) -> int:
        """fork_policy="on-access": any access by either process first
        copies the page into the child's portion (claim 4), in a task
        (-EINPROGRESS), which then fills the page."""
        index = region.page_index(fault.page)
        if not 0 <= index < region.fill.length // PAGE_SIZE:
            return -errno.EFAULT
        if fault.page in region.copied:
            region.copied.discard(fault.page)
            rc = region.fill.fill_fault(region.uffd, fault)
            if rc in _LATER:
                region.copied.add(fault.page)
            return rc
        if region.copy_lock.locked():
            return -errno.EAGAIN  # a copy is under way in this lineage: retried on the timer
        region.holds += 1
        self._table.spawn(self._copy_then_fill(region, fault, index))
        return -errno.EINPROGRESS

    async def _copy_then_fill(self, region: ServedRegion, fault: PageFault, index: int) -> None:
        try:
            async with region.copy_lock:
                if region.released:
                    return
                try:
                    region.copied_to_children += await copy_to_children(
                        region.portion.inheriting_children(), [(index, 1)],
                        region.portion if region.parent is not None else None, own_whole=False)
                except PageAuthError as exc:
                    log.error("region %d: %s", region.id, exc)
                    self._settle(region, fault, -errno.EBADMSG)
                    return
                except OSError as exc:
                    self._settle(region, fault, -(exc.errno or errno.EIO))
                    return
            if not region.released:
                region.copied.add(fault.page)
                region.pending.append(fault)
                self._retry_pending(region)
        finally:
            self._table.let_go(region)


def _wake_quietly(uffd: Uffd, page: int) -> None:
    try:
        uffd.wake(page, PAGE_SIZE)
    except OSError:
        pass
