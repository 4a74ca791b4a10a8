"""Fetching pages from stores that have no local descriptor (Redis, and any
store whose `local_fd` is -1).

The C fill path serves faults from descriptors; a fault whose page lives in
a remote store comes back from it as -EOPNOTSUPP and lands here. The
fetcher never makes the event loop wait for the network: a fetch is a task,
and the loop goes on reading faults and applying events (a forking client
is blocked until its FORK event is read, so events must never queue behind
a slow fetch) while any number of fetches are in flight. Faults requested
in one turn of the loop go to their store as one batched read, a page
several faults wait for is fetched once, and a read that fails is retried
with backoff until the store's deadline (`Store.fetch_deadline`, seconds);
then every waiter gets the error and its page is poisoned, never zero-filled.

A store that can start a read at once (`Store.read_soon`: Redis with its
connection up) is asked first, with no task in between: the request leaves
in the turn of the loop that read the fault, and the page is placed in the
turn its reply arrives. A read started so that fails to reach the store
is retried by a task like any other.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from uffd_pager.stores.base import BadPage, Store

log = logging.getLogger("uffd_pager.fetch")

# What a waiter is handed: the page (None: a hole, it reads as zero), a
# page the store holds wrong, or the error that kept it from being read
# (CancelledError: the pager is stopping).
Result = bytes | None | BadPage | BaseException

# Pages per read request: one pipelined round trip each.
MAX_BATCH = 256
# Reads in flight per store at once (pipelined on the store's connections).
MAX_IN_FLIGHT = 16
_FIRST_RETRY = 0.01
_LAST_RETRY = 1.0


class _Slots:
    """Reads in flight on one store: at most MAX_IN_FLIGHT, taken at once
    (read_soon) or awaited (a task), in the order they were asked for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._free = MAX_IN_FLIGHT
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        handed: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.give()  # handed to us as we were cancelled: pass it on
            raise

    def give(self) -> None:
        while self._waiters:
            handed = self._waiters.popleft()
            if not handed.done():
                handed.set_result(None)
                return
        self._free += 1


class Fetcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[Any, Result], None]) -> None:
        """deliver(waiter, result) is called on the loop once per waiter."""
        self._loop = loop
        self._deliver = deliver
        self._waiting: dict[tuple[Store, int], list[Any]] = {}
        self._due: dict[tuple[Store, int], float] = {}  # when a fault's page must have come, or failed
        self._closed = False
        self._queued: dict[Store, list[int]] = {}
        self._slots: dict[Store, _Slots] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending = False  # inside batch(): wants are sent at its end
        self.pages = 0  # pages read
        self.shared = 0  # faults served by a read another fault started
        self.retries = 0  # reads retried after a failure

    def want(self, store: Store, offset: int, waiter: Any, *, ahead: bool = False) -> None:
        """Fetches the page at store offset for waiter (once, whoever else
        waits for it). ahead: no fault waits for it (read-ahead, prefetch):
        it is read once, never retried, and a fault that comes to wait for
        it starts the deadline."""
        key = (store, offset)
        if not ahead and key not in self._due:
            self._due[key] = self._loop.time() + store.fetch_deadline
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(waiter)
            self.shared += 1
            return
        if self._closed:
            self._deliver(waiter, asyncio.CancelledError())
            return
        self._waiting[key] = [waiter]
        queue = self._queued.setdefault(store, [])
        queue.append(offset)
        if len(queue) == 1 and not self._sending:
            self._loop.call_soon(self.send, store)

    def counters(self) -> dict[str, int]:
        """For `status`: pages read, faults that shared another's read,
        reads retried, and pages being fetched now."""
        return {"pages": self.pages, "shared": self.shared, "retries": self.retries, "in_flight": len(self._waiting)}

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Faults wanted inside are sent when it ends, in one batch per store,
        rather than at the next turn of the loop (the caller reads every
        fault it can in between)."""
        self._sending = True
        try:
            yield
        finally:
            self._sending = False
            for store in list(self._queued):
                self.send(store)

    def send(self, store: Store) -> None:
        if self._closed:
            return
        offsets = sorted(self._queued.pop(store, []))
        slots = self._slots_of(store)
        for i in range(0, len(offsets), MAX_BATCH):
            batch = offsets[i:i + MAX_BATCH]
            if not (slots.try_take() and self._start(store, batch, slots)):
                self._spawn(store, batch)

    def _start(self, store: Store, offsets: list[int], slots: _Slots) -> bool:
        """Starts the read with store.read_soon, on the slot taken for it."""
        def done(outcome: list[bytes | None | BadPage] | BaseException) -> None:
            slots.give()
            if self._closed:
                return  # close() answered the waiters
            if isinstance(outcome, (ConnectionError, TimeoutError)) \
                    and any((store, offset) in self._due for offset in offsets):
                self.retries += 1  # not reached: a task retries it until the deadline
                self._spawn(store, offsets)
            elif isinstance(outcome, BaseException):
                self._hand_out(store, offsets, [outcome] * len(offsets))
            else:
                self._hand_out(store, offsets, self._counted(store, offsets, outcome))

        try:
            started = store.read_soon(offsets, done)
        except Exception:  # e.g. a command that cannot be sent: read() reports it
            log.debug("%s: read_soon refused %d pages", store.url, len(offsets), exc_info=True)
            started = False
        if not started:
            slots.give()
        return started

    def _slots_of(self, store: Store) -> _Slots:
        slots = self._slots.get(store)
        if slots is None:
            slots = self._slots[store] = _Slots(self._loop)
        return slots

    def _spawn(self, store: Store, offsets: list[int]) -> None:
        task = self._loop.create_task(self._fetch(store, offsets))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, store: Store, offsets: list[int]) -> None:
        results: list[Result]
        slots = self._slots_of(store)
        try:
            await slots.take()
            try:
                results = await self._read(store, offsets)
            finally:
                slots.give()
        except asyncio.CancelledError:
            # The pager is stopping: its waiters are let go unserved (a fault
            # left waiting is a new pager's to serve, never a SIGBUS).
            results = [asyncio.CancelledError()] * len(offsets)
        self._hand_out(store, offsets, results)

    def _hand_out(self, store: Store, offsets: list[int], results: list[Result]) -> None:
        for offset, result in zip(offsets, results):
            self._due.pop((store, offset), None)
            for waiter in self._waiting.pop((store, offset), []):
                try:
                    self._deliver(waiter, result)
                except Exception:  # one waiter's trouble must not strand the others
                    log.exception("delivering the page at %s offset %d", store.url, offset)

    async def _read(self, store: Store, offsets: list[int]) -> list[Result]:
        delay = _FIRST_RETRY
        while True:
            # The earliest fault's deadline, counted from when it was wanted
            # (not from when a slot came free); pages only read ahead: none.
            deadline = min((self._due[(store, o)] for o in offsets if (store, o) in self._due), default=0.0)
            try:
                results: list[Result] = list(await store.read(offsets))
            except (ConnectionError, TimeoutError) as exc:  # StoreUnavailable: the store may come back
                if self._loop.time() + delay > deadline:
                    log.error("%s: reading %d pages failed until the deadline: %s", store.url, len(offsets), exc)
                    return [exc] * len(offsets)
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LAST_RETRY)
                continue
            except Exception as exc:  # authentication, or a store's own bug: never retried, never zeros
                return [exc] * len(offsets)
            return self._counted(store, offsets, results)

    def _counted(self, store: Store, offsets: list[int], results: list[Result]) -> list[Result]:
        if len(results) != len(offsets):
            error = RuntimeError(f"{store.url}: {len(results)} pages returned for {len(offsets)} asked")
            return [error] * len(offsets)
        self.pages += len(offsets)
        return results

    def close(self) -> None:
        """Cancels every read; every waiter, even of a read not started yet,
        is handed CancelledError (its fault is left for a new pager)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._queued.clear()
        waiting, self._waiting = self._waiting, {}
        self._due.clear()
        for (store, offset), waiters in waiting.items():
            for waiter in waiters:
                try:
                    self._deliver(waiter, asyncio.CancelledError())
                except Exception:
                    log.exception("delivering the page at %s offset %d", store.url, offset)
