"""Page-out: keeping a region under its cap (`map(..., max_resident=BYTES)`).

When a region's resident pages pass its cap (the high watermark), pages are
dropped down to 7/8 of it (the low one). Victims are taken by a clock over
the region's address range (native/fill.c `up_fill_take_victims`): for a
sequential scan, the pages filled longest ago; pages written since their
last write-back are passed over (a second chance), and when only such pages
are left the region is flushed first, which makes them clean.

Why a write is never lost depends on the region's tracking:

* "sync": a clean page is mapped write-protected, so the first write to it
  is a WP fault that waits in the kernel for the pager. Once a page is
  taken as a victim every fault on it returns -EBUSY to the pager (it is
  kept pending, its thread waiting) until the drop is over; then the writer
  is woken, faults again on the page now missing, and gets it from the
  store with what was written back. The drop is MADV_DONTNEED, which only
  the client's own process may call: a native agent thread in the client
  (native/agent.c) does it on our request, over the socket the client
  passed with its first map. The REMOVE event the drop queues clears the
  pages' resident bits as any other.
* "async" (WP_ASYNC): a write to a protected page costs no fault, so
  nothing holds a write between a check and a drop. Instead the agent
  moves each victim out of the region (UFFDIO_MOVE, which only the uffd's
  own process may issue): from then on an access to it is a MISSING fault,
  held here like any other on a victim. A write that came before the move
  is in the moved page, so the agent decides after the move, against a copy
  it took while PAGEMAP_SCAN still called the page unwritten since its last
  write-protect (when the copy equals the store's bytes): an unchanged page
  is dropped, a changed one goes back, written, for the next flush (see
  native/agent.c for the kernel facts). The agent holds fork() off
  meanwhile, so no child sees a page out; a page shared with a child
  already cannot be moved (EBUSY) and stays. Eviction and flush exclude
  each other (flush_lock): a page a flush is copying out is clean to the
  kernel but not yet stored.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable

from uffd_pager.layout import READ_AHEAD_MAX
from uffd_pager.served import ServedRegion
from uffd_pager.uffd import AGENT_DROP, AGENT_MOVE_MAX, AGENT_MOVE_OUT, PAGE_SIZE, Run, Tracking
from uffd_pager.writeback import runs_of_pages

log = logging.getLogger("uffd_pager.paging")

_REQUEST = struct.Struct("=QQQQ")  # seq, kind, start, len: struct up_agent_request
_REPLY = struct.Struct("=QqQ")  # seq, err, dropped: struct up_agent_reply
_BATCH = 4096  # pages taken as victims at once
_IN_FLIGHT = 8  # drop requests sent to one agent before the first is answered
_DROP, _MOVE_OUT = AGENT_DROP, AGENT_MOVE_OUT


def _pageable(region: ServedRegion) -> bool:
    """Whether page-out may drop the region's pages: its process gave an
    agent, and its tracking tells a written page from a clean one."""
    return region.agent is not None and not region.released and region.fill.tracking != Tracking.NONE


class Agent:
    """The pager's end of one client process's agent socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._slots = asyncio.Semaphore(_IN_FLIGHT)  # the socket's buffer holds a few requests, not hundreds
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(_REPLY.size)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if len(data) != _REPLY.size:
                self.close()  # the client is gone, or its agent is not one
                return
            seq, err, dropped = _REPLY.unpack(data)
            future = self._waiting.pop(seq, None)
            if future is not None and not future.done():
                future.set_result((err, dropped))

    async def drop(self, start: int, length: int, timeout: float) -> None:
        """MADV_DONTNEED of [start, start + length) in the client; raises
        OSError when the agent refuses, is gone, or does not answer."""
        await self._ask(_DROP, start, length, timeout)

    async def move_out(self, start: int, length: int, timeout: float) -> int:
        """Takes the unwritten pages of [start, start + length) (at most
        AGENT_MOVE_MAX pages) out of the client without losing a write (see
        native/agent.c); returns the mask of the pages dropped (bit k: page
        k). Raises OSError as drop does; the pages not dropped are where
        they were."""
        return await self._ask(_MOVE_OUT, start, length, timeout)

    async def _ask(self, kind: int, start: int, length: int, timeout: float) -> int:
        async with self._slots:
            if self._closed:
                raise OSError(errno.EPIPE, "the client's page-out agent is gone")
            self._seq += 1
            seq = self._seq
            future: asyncio.Future[tuple[int, int]] = self._loop.create_future()
            self._waiting[seq] = future
            try:
                await self._loop.sock_sendall(self._sock, _REQUEST.pack(seq, kind, start, length))
                err, dropped = await asyncio.wait_for(future, timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self._waiting.pop(seq, None)
                raise OSError(errno.EPIPE, f"the client's page-out agent did not answer: {exc!r}") from None
        if err:
            raise OSError(err, f"the client's page-out agent refused {length} bytes at {start:#x}: "
                               f"{os.strerror(err)}")
        return dropped

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_result((errno.EPIPE, 0))
        self._waiting.clear()


class PageOut:
    """Keeps capped regions under their caps (see the module's doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flush: Callable[[ServedRegion], Awaitable[object]],
                 retry: Callable[[ServedRegion], None], hold: Callable[[ServedRegion], object],
                 let_go: Callable[[ServedRegion], None]) -> None:
        self._loop = loop
        self._flush = flush
        self._retry = retry
        self._hold = hold
        self._let_go = let_go
        self._tasks: dict[ServedRegion, asyncio.Task[None]] = {}
        self.total_cap = 0  # pages all pageable regions may keep together (the pager's --max-resident); 0: none
        self.tenant_cap = 0  # pages one tenant's pageable regions may keep together (--tenant-max-resident)
        self.regions: Callable[[], Iterable[ServedRegion]] = lambda: ()

    def check(self, region: ServedRegion) -> None:
        """After faults were served: starts an eviction if the region is
        over its own cap, or the pageable regions together over the pager's."""
        if region.max_resident and not region.evicting and not region.released and region.agent is not None \
                and region.fill.counters()["resident_pages"] > region.max_resident:
            self._start(region, region.max_resident * 7 // 8)
        if self.total_cap or self.tenant_cap:
            pageable = [r for r in self.regions() if _pageable(r)]
            if self.total_cap:
                self._keep_under(pageable, self.total_cap)
            if self.tenant_cap:
                uid = region.tenant_uid
                self._keep_under([r for r in pageable if r.tenant_uid == uid], self.tenant_cap)

    def _keep_under(self, pageable: list[ServedRegion], cap: int) -> None:
        """A cap over several regions (the pager's, a tenant's) is kept by
        taking pages from the one that holds the most, down to 7/8 of the
        cap (a soft cap: what faults bring in while a drop is under way
        passes it for a while)."""
        resident = {r: r.fill.counters()["resident_pages"] for r in pageable}
        total = sum(resident.values())
        if total <= cap or any(r.evicting for r in pageable):
            return
        largest = max(pageable, key=resident.__getitem__)
        self._start(largest, max(0, resident[largest] - (total - cap * 7 // 8)))

    def _start(self, region: ServedRegion, low: int) -> None:
        region.evicting = True
        self._hold(region)
        task = self._loop.create_task(self._evict(region, low))
        self._tasks[region] = task
        task.add_done_callback(lambda _: self._tasks.pop(region, None))

    def released(self, region: ServedRegion) -> None:
        """The region is gone: its eviction stops at once. Its drop in the
        agent may be waiting for the REMOVE event it queued, which nobody
        reads any more; only closing the region's uffd (at its teardown,
        once our hold on it is let go) lets that drop, and the agent's next
        ones, go on."""
        task = self._tasks.get(region)
        if task is not None:
            task.cancel()

    async def _evict(self, region: ServedRegion, low: int) -> None:
        flushed = False
        try:
            while not region.released and (resident := region.fill.counters()["resident_pages"]) > low:
                dropped = await self._drop_victims(region, min(resident - low, _BATCH))
                if not dropped:
                    if flushed:
                        # Every page left is written again as fast as it is
                        # written back: faults go on unheld until a drop succeeds.
                        region.fill.resident_limit = 0
                        self._retry(region)
                        return
                    await self._flush(region)  # the written pages become clean, and victims
                    flushed = True
                    continue
                flushed = False
                if region.max_resident:
                    region.fill.resident_limit = region.max_resident + READ_AHEAD_MAX // PAGE_SIZE
        except Exception as exc:  # a region must never lose the pager: note it, stop this eviction
            if region.last_error != f"page-out: {exc}":  # once per cause, not once per eviction
                log.error("region %d: page-out stopped: %s; its cap is lifted until page-out succeeds again",
                          region.id, exc)
            region.last_error = f"page-out: {exc}"
            if not region.released:
                region.fill.resident_limit = 0  # faults never wait for a page-out that cannot happen
                self._retry(region)
        finally:
            region.evicting = False
            self._let_go(region)

    async def _drop_victims(self, region: ServedRegion, want: int) -> int:
        """Takes up to `want` victims and drops them (sync tracking) or moves
        them out (async, with no flush under way: see the module's doc);
        returns the pages dropped."""
        if region.fill.tracking == Tracking.SYNC_WP:
            return await self._drop_runs(region, self._take(region, want), self._drop)
        async with region.flush_lock:
            return await self._drop_runs(region, self._take(region, want), self._move_out)

    def _take(self, region: ServedRegion, want: int) -> list[Run]:
        return self._without_unstored(region, region.fill.take_victims(want))

    async def _drop_runs(self, region: ServedRegion, runs: list[Run],
                         drop: Callable[[ServedRegion, int, int], Awaitable[int]]) -> int:
        try:
            for run in runs:
                region.dropping.add((run.addr, run.addr + run.length))
            return sum(await asyncio.gather(*(drop(region, run.addr, run.length) for run in runs)))
        finally:
            for run in runs:
                region.dropping.discard((run.addr, run.addr + run.length))
            self._retry(region)  # the faults held meanwhile, -EBUSY, go on

    @staticmethod
    def _without_unstored(region: ServedRegion, runs: list[Run]) -> list[Run]:
        """The victims less the pages whose bytes are not in the store yet
        although the kernel sees them clean: taken by a write-back still
        under way (in_flight), or left by a failed one (retry_pages).
        Dropping one would lose its write; they are let go of again."""
        unstored = region.in_flight | region.retry_pages
        if not unstored:
            return runs
        base, kept = region.fill.base, []
        for run in runs:
            first = (run.addr - base) // PAGE_SIZE
            pages = [first + k for k in range(run.length // PAGE_SIZE)]
            for page in pages:
                if page in unstored:
                    region.fill.end_eviction(base + page * PAGE_SIZE, PAGE_SIZE, dropped=False)
            kept += runs_of_pages({p for p in pages if p not in unstored}, base, 0)
        return kept

    async def _drop(self, region: ServedRegion, address: int, length: int) -> int:
        dropped = False
        try:
            assert region.agent is not None
            await region.agent.drop(address, length, timeout=30.0)
            dropped = True
        finally:
            if not region.released:
                region.fill.end_eviction(address, length, dropped=dropped)
        return length // PAGE_SIZE

    async def _move_out(self, region: ServedRegion, address: int, length: int) -> int:
        """A run of victims moved out AGENT_MOVE_MAX pages a request, the
        requests sent together (the agent is never idle waiting for the
        next); the pages not dropped stay resident (written, shared with a
        child, or gone meanwhile), and are victims no more."""
        step = AGENT_MOVE_MAX * PAGE_SIZE
        pieces = [(at, min(step, address + length - at)) for at in range(address, address + length, step)]
        return sum(await asyncio.gather(*(self._move_out_piece(region, at, size) for at, size in pieces)))

    async def _move_out_piece(self, region: ServedRegion, address: int, length: int) -> int:
        mask = 0
        try:
            assert region.agent is not None
            mask = await region.agent.move_out(address, length, timeout=30.0)
        finally:
            if not region.released:
                k, npages = 0, length // PAGE_SIZE
                while k < npages:  # runs of pages alike: dropped or not
                    bit, first = mask >> k & 1, k
                    while k < npages and mask >> k & 1 == bit:
                        k += 1
                    region.fill.end_eviction(address + first * PAGE_SIZE, (k - first) * PAGE_SIZE,
                                             dropped=bool(bit))
        return mask.bit_count()

    def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
