"""The pager's table of served regions and open stores, and how long each
lives: a region released while an operation still uses it (a flush across
an await, a fetch, a copy in a worker thread) is torn down when the last
holder lets go, and its portions are freed only after its lineage's copies,
so nothing ever acts on freed native state or on a descriptor number
reused since."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
from typing import Awaitable, Callable, Iterator

from uffd_pager.crypto import Key
from uffd_pager.layout import (
    Portion,
    PortionAllocator,
)
from uffd_pager.served import OpenStore, ServedRegion
from uffd_pager.stores import FileStore, Store, open_store
from uffd_pager.stores.base import HandedBack
from uffd_pager.uffd import (
    PAGE_SIZE,
    FillRange,
    Uffd,
)

log = logging.getLogger("uffd_pager.pager")


class RegionTable:
    """Every served region by id, every open store by identity."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state_dir: str | None) -> None:
        self._loop = loop
        self._state_dir = state_dir  # encrypted stores' anchors (None: catalog.default_state_dir())
        self.regions: dict[int, ServedRegion] = {}
        self.stores: dict[tuple[object, ...], OpenStore] = {}
        self._next_region_id = 1
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by who serves the regions: the reader of a region's uffd
        # (FaultHandler.on_faults), and what follows a release (PagerService).
        self.serve_faults_of: Callable[[ServedRegion], None] = lambda region: None
        # ... and what takes the pages a store's C path hands back (FaultHandler).
        self.handed_back: Callable[[list[HandedBack]], None] = lambda pages: None
        self.on_released: Callable[[ServedRegion], None] = lambda region: None
        self.on_added: Callable[[ServedRegion], None] = lambda region: None  # metrics' timing
        self.on_portion_freed: Callable[[Portion], None] = lambda portion: None  # its durable row goes
        # The slots of a store an earlier pager kept (PortionAllocator), and
        # where a slot kept now is recorded: the durable state.
        self.kept_slots: Callable[[Store], list[tuple[int, int]]] = lambda store: []
        self.on_slot_kept: Callable[[Store, int, int], None] = lambda store, offset, length: None

    def next_id_at_least(self, region_id: int) -> None:
        """The next region made gets region_id or more (a region taken over keeps its id)."""
        self._next_region_id = max(self._next_region_id, region_id)

    def spawn(self, work: Awaitable[None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def open_store(self, url: str, key: Key | None, fd: int | None,
                          catalog_fd: int | None = None) -> OpenStore:
        store = await open_store(url, key, fd=fd, catalog_fd=catalog_fd, state_dir=self._state_dir)
        try:
            identity = store.identity
            shared = self.stores.get(identity)
            if shared is not None and shared.store.key_id != store.key_id:
                raise PermissionError(errno.EACCES, f"{store.url} is in use with "
                                      f"{'another key' if shared.store.key_id else 'no key'} by another region")
        except BaseException:
            store.close()
            raise
        if shared is None:
            allocator = PortionAllocator(store, self.kept_slots(store), functools.partial(self.on_slot_kept, store))
            shared = self.stores[identity] = OpenStore(store, allocator)
            store.serve_remotely(lambda pages: self.handed_back(pages))
        else:
            if isinstance(store, FileStore) and isinstance(shared.store, FileStore):
                shared.store.upgrade(store)  # write-back of the regions that may write needs a writable one
            store.close()  # one descriptor per file is enough
        shared.users += 1
        return shared

    def release_store(self, shared: OpenStore) -> None:
        shared.users -= 1
        if shared.users == 0:
            self.stores.pop(shared.store.identity, None)
            shared.store.close()

    def _store_of(self, portion: Portion) -> OpenStore:
        return self.stores[portion.store.identity]

    def add_region(self, uffd: Uffd, fill: FillRange, portion: Portion, *, owner_pid: int, fork_policy: str,
                    child_store: OpenStore, keep_child_portions: bool,
                    parent: ServedRegion | None = None, region_id: int | None = None) -> ServedRegion:
        """region_id: the id of a region taken over (takeover.py), else the next one."""
        region = ServedRegion(id=self._next_region_id if region_id is None else region_id, uffd=uffd, fill=fill, portion=portion,
                              owner_pid=owner_pid, fork_policy=fork_policy, child_store=child_store,
                              keep_child_portions=keep_child_portions, parent=parent,
                              spans=[(fill.base, fill.base + fill.length + PAGE_SIZE)])
        os.set_blocking(uffd.fd, False)
        self._loop.add_reader(uffd.fd, self.serve_faults_of, region)  # first: if it fails, nothing is left behind
        if region_id is None:
            self._next_region_id += 1
        portion.region_id = region.id
        fill.owner = region.id
        self.regions[region.id] = region
        self.on_added(region)
        return region

    @contextlib.contextmanager
    def holding(self, region: ServedRegion) -> Iterator[None]:
        """Keeps the region's descriptors, native state and portions alive
        while an operation uses them across an await (or a worker thread):
        a region released meanwhile (its process exited; a child pruned by
        its own flush) is torn down when the last holder lets go, so nothing
        ever acts on freed state or on a descriptor number reused since."""
        region.holds += 1
        try:
            yield
        finally:
            self.let_go(region)

    def let_go(self, region: ServedRegion) -> None:
        """Ends one hold (see _holding) taken by hand."""
        region.holds -= 1
        if region.released and region.holds == 0:
            self._tear_down(region)

    def release_region(self, region: ServedRegion) -> None:
        """Stops serving the region at once; its state goes when unused."""
        if self.regions.pop(region.id, None) is None:
            return
        region.released = True
        self._loop.remove_reader(region.uffd.fd)
        if region.pidfd >= 0:
            self._loop.remove_reader(region.pidfd)
        if region.timer is not None:
            region.timer.cancel()
        if region.retry_timer is not None:
            region.retry_timer.cancel()
            region.retry_timer = None
        if region.connection is not None:
            region.connection.regions.pop(region.id, None)
        if region.holds == 0:
            self._tear_down(region)
        self.on_released(region)

    def _tear_down(self, region: ServedRegion) -> None:
        for fd in (region.pidfd, region.pagemap_fd):
            if fd >= 0:
                os.close(fd)
        region.pidfd = region.pagemap_fd = -1
        region.uffd.close()
        region.fill.close()
        region.portion.in_use_by_region = False
        if region.copy_lock.locked():
            # A copy in this lineage (in a worker thread, maybe into this very
            # portion) is under way: its native state goes once it is done.
            self.spawn(self._free_after_copies(region))
        else:
            self._free_region_portions(region)

    async def _free_after_copies(self, region: ServedRegion) -> None:
        async with region.copy_lock:
            self._free_region_portions(region)

    def _free_region_portions(self, region: ServedRegion) -> None:
        self._free_portions(region.portion)
        if region.holds_children_store:
            self.release_store(region.child_store)  # the use map(children=...) took, even of the same file

    def _free_portions(self, portion: Portion | None) -> None:
        """Frees a portion no region uses and no child inherits from, then
        its parent if that was the parent's last reason to stay."""
        while portion is not None and not portion.in_use_by_region and not portion.children:
            parent = portion.parent
            shared = self._store_of(portion)
            if portion.placed:
                # A root portion is the user's data: never handed out again.
                slot = portion.allocator.release(portion.offset, reuse=parent is not None and not portion.kept)
                if slot is not None:
                    shared.users += 1  # the discard's, until it is done
                    self.spawn(self._discard_slot(shared, *slot))
            if parent is not None:
                parent.children.remove(portion)
            self.release_store(shared)  # each portion holds one use of its store
            portion.state.close()
            self.on_portion_freed(portion)
            portion = parent

    async def _discard_slot(self, shared: OpenStore, offset: int, length: int) -> None:
        """An exited child's portion is discarded before its slot is reused
        (it may hold the child's bytes; a new portion must read as zero)."""
        discarded = False
        try:
            await shared.store.discard(offset, length)
            discarded = True
        except OSError as exc:
            log.warning("%s: discarding an exited child's portion at %d failed (the slot is not reused): %s",
                        shared.store.url, offset, exc)
        finally:
            shared.allocator.add_free(offset, length, discarded=discarded)
            self.release_store(shared)
