"""Fork lineage: a forked child's region, its portion (placed lazily,
claim 7), the copies each fork policy makes between portions (claims 2-4),
and finding out when children exit."""
from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import select
from typing import Callable, Iterable

from uffd_pager.layout import (
    Portion,
    copy_to_children,
)
from uffd_pager.protocol import CLAIM_TOKEN_SIZE
from uffd_pager.regions import RegionTable
from uffd_pager.served import ServedRegion
from uffd_pager.uffd import (
    PAGE_SIZE,
    FillRange,
    ForkEvent,
    Run,
    Uffd,
)

log = logging.getLogger("uffd_pager.pager")


# How often forked children not yet known by pid are probed for exit.
_CHILD_PROBE_INTERVAL = 1.0


class Lineage:
    """The fork lineage of every served region, and the copies between
    their portions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: RegionTable) -> None:
        self._loop = loop
        self._table = table
        self._child_probe: asyncio.TimerHandle | None = None
        # Writes forked children's portions to the durable state (durable.py).
        self.record_portions: Callable[[list[Portion]], None] = lambda portions: None

    @staticmethod
    def descends(region: ServedRegion, ancestor_id: int) -> bool:
        node = region.parent
        while node is not None:
            if node.id == ancestor_id:
                return True
            node = node.parent
        return False

    def adopt_fork_child(self, parent: ServedRegion, event: ForkEvent) -> None:
        """A child inherits the mapping: the kernel shares the pages resident
        at fork copy-on-write (with their write-protect bits, so unflushed
        writes stay dirty in the child too); its missing pages fault into the
        new uffd and are read through the parent's portion. The child's own
        portion is placed lazily, unless the policy copies at fork."""
        child_uffd = Uffd(event.uffd)
        child_store = parent.child_store
        try:
            portion = Portion(child_store.store, child_store.allocator, parent.fill.length, parent=parent.portion,
                              kept=parent.keep_child_portions)
            pages, fixed = parent.fill.read_ahead
            fill = FillRange(parent.fill.base, parent.fill.length, portion.state, parent.fill.tracking,
                             read_ahead_pages=pages, read_ahead_fixed=fixed)
        except BaseException:
            child_uffd.close()
            raise
        child_store.users += 1
        fill.inherit_dirty(parent.fill)
        child = self._table.add_region(child_uffd, fill, portion, owner_pid=0, fork_policy=parent.fork_policy,
                                 child_store=child_store, keep_child_portions=parent.keep_child_portions,
                                 parent=parent)
        child.handed, child.forked_at = False, self._loop.time()
        child.claim_token = secrets.token_bytes(CLAIM_TOKEN_SIZE)
        child.max_resident = parent.max_resident  # capped once its process hands its agent (adopt)
        # Pages the parent's write-back has taken but not yet stored are clean
        # in the child's page tables too: the child writes them itself.
        child.retry_pages |= parent.in_flight | parent.retry_pages
        child.copy_lock = parent.copy_lock
        if parent.fork_policy == "at-fork":
            portion.place()  # claim 3: the copy is made at fork, so the portion is placed then
            self._table.spawn(self._copy_at_fork(parent, child))
        self.sync_defer_missing((child, parent))
        self._schedule_child_probe()
        log.debug("region %d: forked child region %d", parent.id, child.id)

    async def preserve_for_children(self, region: ServedRegion, runs: list[Run]) -> None:
        """Before these pages of the region's portion are rewritten, every
        child still inheriting them gets the old bytes (claim 2); a child's
        own portion is completed with every page it still inherits, so that
        it alone holds the child's view. The copies run in a worker thread
        under the lineage's copy lock, before the write-back starts: until a
        page is copied (and marked materialized, after its bytes) a child's
        fault reads it through the parent's portion, which still holds it.

        This places a child's portion that is not placed yet: the old bytes
        must be kept before they are overwritten, and the child's own portion
        is where claim 2 puts them; a child that never touched the region
        gets its portion at its parent's first write-back of a page it
        inherits, never earlier (claim 7's "accessed" is the child's view
        of the page changing place)."""
        if runs:
            self._prune_exited_children()  # copies for a dead child are wasted work
        children = region.portion.inheriting_children() if runs else []
        if children or region.parent is not None:
            spans = [(region.page_index(run.addr), run.length // PAGE_SIZE) for run in runs]
            for child in children:
                child.place()  # the allocator is the loop's
            async with region.copy_lock:
                copied = await copy_to_children(children, spans,
                                                region.portion if region.parent is not None else None)
            region.copied_to_children += copied
        # What the children hold now (their copies on access too) must be
        # durable before the writes: a pager taking over would read the pages
        # they do not hold through this portion, which is about to change.
        changed = [p for p in [*region.portion.children, *([region.portion] if region.parent is not None else [])]
                   if p.state.live and p.state.missing() != p.recorded_missing]
        self.record_portions(changed)

    async def _copy_at_fork(self, parent: ServedRegion, child: ServedRegion) -> None:
        """fork_policy="at-fork": the child's portion gets every page at once
        (claim 3), in a worker thread: the forking parent and every other
        client go on meanwhile. Requests that report on the copy wait for it
        (see _settled)."""
        with self._table.holding(parent), self._table.holding(child):
            async with child.copy_lock:
                if child.released:
                    return
                try:
                    copied = await child.portion.complete()
                except OSError as exc:
                    log.error("region %d: copying the forked child's portion at fork failed (its flush "
                              "completes it): %s", child.id, exc)
                    return
            parent.copied_to_children += copied

    async def settled(self, region: ServedRegion) -> None:
        """Waits for copies under way in the region's lineage."""
        if region.copy_lock.locked():
            async with region.copy_lock:
                pass

    def sync_defer_missing(self, regions: Iterable[ServedRegion] | None = None) -> None:
        """fork_policy="on-access" regions route their missing faults
        through Python while copies are due: a child until it holds every
        page, a parent while a child inherits from it. regions: only those,
        when nothing else changed (a region added: it and its parent)."""
        for region in self._table.regions.values() if regions is None else regions:
            region.fill.defer_missing = not region.handed or bool(
                region.fork_policy == "on-access"
                and ((region.parent is not None and region.portion.state.missing())
                     or region.portion.inheriting_children()))

    def watch_child(self, region: ServedRegion, pid: int, pidfd: int) -> None:
        """A forked child claimed its copy: it is released when its process
        exits (the pidfd turns readable)."""
        region.owner_pid, region.pidfd = pid, pidfd
        self._loop.add_reader(pidfd, self._table.release_region, region)

    def _schedule_child_probe(self) -> None:
        if self._child_probe is None and any(r.parent is not None and r.pidfd < 0 for r in self._table.regions.values()):
            self._child_probe = self._loop.call_later(_CHILD_PROBE_INTERVAL, self._probe_children)

    def _probe_children(self) -> None:
        self._child_probe = None
        self._prune_exited_children()
        self._schedule_child_probe()

    def _prune_exited_children(self) -> None:
        """Releases forked children that have exited. Known ones have a pidfd
        (readable once the process is gone); for the others an ioctl on their
        uffd fails with ESRCH once their address space is gone."""
        for region in [r for r in self._table.regions.values() if r.parent is not None]:
            if region.pidfd >= 0:
                exited = bool(select.select([region.pidfd], [], [], 0)[0])
            else:
                try:
                    region.uffd.writeprotect(region.tag_address, PAGE_SIZE, protect=False, wake=False)
                    exited = False
                except OSError as exc:
                    exited = exc.errno == errno.ESRCH
            if exited:
                self._table.release_region(region)
