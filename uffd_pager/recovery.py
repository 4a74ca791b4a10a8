"""Serving again the regions a dead (or stopped) pager recorded in its
durable state (durable.py): the orchestration of a takeover, from the rows
to regions served again, woken and with their unwritten pages known.
takeover.py fetches what it needs from the live processes (their uffds and
store descriptors); PagerService runs this before it accepts anyone."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable

from uffd_pager.durable import DurableState, RegionRecord, process_start
from uffd_pager.layout import Portion, parse_fork_policy, parse_tracking
from uffd_pager.lineage import Lineage
from uffd_pager.regions import RegionTable
from uffd_pager.served import Connection, OpenStore, ServedRegion
from uffd_pager.takeover import Claim, Reclaimed, Reclaimer
from uffd_pager.uffd import PAGE_SIZE, FillRange, Tracking, Uffd
from uffd_pager.writeback import page_runs, pages_of_page_runs

log = logging.getLogger("uffd_pager.pager")

# PagerService's map of a request, for a process (no connection), with descriptors
# it takes what it keeps out of, under a given region id: answers the map's reply.
ServeMap = Callable[[Connection, dict[str, Any], list[int], int], Awaitable[dict[str, Any]]]
# PagerService's opening of a map's store and children's store from named descriptors.
OpenStores = Callable[[str, str | None, dict[str, int], list[int], list[OpenStore]],
                      Awaitable[tuple[OpenStore, OpenStore]]]


class Recovery:
    """One takeover: run() once, before the pager accepts anyone; counts
    what it served again (status' "takeover")."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: RegionTable, lineage: Lineage,
                 durable: DurableState, serve_map: ServeMap, open_stores: OpenStores) -> None:
        self._loop = loop
        self._table = table
        self._lineage = lineage
        self._durable = durable
        self._serve_map = serve_map
        self._open_stores = open_stores
        self.counts = {"regions": 0, "reattached": 0, "woken": 0}  # reattached: counted by PagerService

    async def run(self) -> None:
        """Serves again the regions a dead (or stopped) pager recorded, of the
        processes still alive (see takeover.py): their descriptors are
        fetched from the processes themselves, every range is woken (faults
        the old pager had read are delivered again), and the pages written
        since their last write-back are found in the page tables, with those
        of a write-back the old pager was in the middle of (its row says).

        Forked children's copies too, each on its parent's portion, placed
        where it was and holding what its row says. An ancestor whose
        process is gone, but whose portion a live descendant still inherits
        pages from, is rebuilt as a portion only, its store descriptors
        taken from that descendant (which inherited them at fork). Rows of
        lineages with no live process are forgotten."""
        records = self._durable.regions()  # parents first
        by_id = {r.id: r for r in records}
        started = {pid: process_start(pid) for pid in {r.pid for r in records}}  # a process's rows are many
        holder = {r.id: r for r in records if not r.released and started[r.pid] == r.pid_start}
        for record in reversed(records):  # a row is kept by its own process, else by a live descendant's
            if record.id in holder and record.parent is not None:
                holder.setdefault(record.parent, holder[record.id])
        if records:  # regions made meanwhile (a FORK event read between two takeovers) get new ids
            self._table.next_id_at_least(max(r.id for r in records) + 1)
        lineages: dict[int, list[RegionRecord]] = {}
        root_of: dict[int, int] = {}
        for record in records:
            root_of[record.id] = root_of.get(record.parent, record.id) if record.parent is not None else record.id
            lineages.setdefault(root_of[record.id], []).append(record)
        reclaimer = Reclaimer(claim for r in records if r.id in holder
                              if (claim := _claim_of(r, holder[r.id])) is not None)
        try:
            for rows in _by_holding_process(list(lineages.values()), holder):
                await self._take_over_lineage(rows, holder, by_id, reclaimer)
                # Faults and events of the regions served again so far are
                # read before the next lineage, whose process may wait on them.
                await asyncio.sleep(0)
        finally:
            reclaimer.close()
        if records:
            log.info("takeover: %d of %d recorded regions served again", self.counts["regions"], len(records))

    async def _take_over_lineage(self, records: list[RegionRecord], holder: dict[int, RegionRecord],
                                 by_id: dict[int, RegionRecord], reclaimer: Reclaimer) -> None:
        """One lineage's rows, parents first."""
        served: dict[int, ServedRegion] = {}
        for record in records:
            parent = served.get(record.parent) if record.parent is not None else None
            if record.id not in holder or (record.parent is not None and parent is None):
                self._durable.forget(record.id)
                continue
            try:
                region = await self._take_over_one(record, holder[record.id], parent,
                                                   by_id[record.parent] if record.parent is not None else None,
                                                   reclaimer)
            except ProcessLookupError:
                self._durable.forget(record.id)
                continue
            except Exception as exc:
                log.error("takeover: region %d of pid %d cannot be served again: %s: %s", record.id, record.pid,
                          type(exc).__name__, exc, exc_info=not isinstance(exc, OSError))
                self._durable.forget(record.id)
                continue
            served[record.id] = region
            if region.released:
                log.info("takeover: region %d (pid %d, gone): its portion, inherited by pid %d", record.id,
                         record.pid, holder[record.id].pid)
                continue
            self.counts["regions"] += 1
            log.info("takeover: region %d of pid %d, %s, %d bytes%s: served again", region.id, record.pid,
                     record.request.get("url"), region.fill.length,
                     f", forked from region {record.parent}" if record.parent is not None else "")
        for region in served.values():
            if region.released and region.holds_children_store:
                # A gone root lets go of the children's store as a released
                # region does: its descendants' portions hold uses of their own.
                region.holds_children_store = False
                self._table.release_store(region.child_store)

    async def _take_over_one(self, record: RegionRecord, holder: RegionRecord, parent: ServedRegion | None,
                             parent_record: RegionRecord | None, reclaimer: Reclaimer) -> ServedRegion:
        """What it takes from the live processes is _claim_of(record, holder)'s."""
        if parent is None:
            if holder is record:
                region = await self._serve_taken_over(record, reclaimer.take(record))
            else:
                region = await self._portion_of_gone_root(record, reclaimer.take(record))
        else:
            assert parent_record is not None
            if holder is record:
                region = await self._serve_taken_over_child(record, reclaimer.take(record), parent)
            else:
                region = self._copy_of_gone_child(record, parent)
            # The parent's write-back in progress had these pages clean in the
            # child's page tables too (see Lineage.adopt_fork_child).
            region.retry_pages |= pages_of_page_runs(parent_record.flushing)
            if region.retry_pages:
                self._durable.flushing(region.id, page_runs(region.retry_pages))
        return region

    async def _serve_taken_over(self, record: RegionRecord, reclaimed: Reclaimed) -> ServedRegion:
        """The recorded map request again, with the reclaimed descriptors,
        for the process (as PagerService serves a client's map); ours to close on
        failure, as a request's are."""
        request = dict(record.request, op="map", max_resident=None)  # capped again when its process reattaches
        fds = [reclaimed.uffd if name == "uffd" else reclaimed.descriptors[name] for name in request["fds"]]
        owner = Connection(sock=None, pid=record.pid, uid=record.uid)
        try:
            reply = await self._serve_map(owner, request, fds, record.id)  # takes what it keeps out of fds
        except BaseException:
            os.close(reclaimed.pidfd)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        region = self._table.regions[reply["region"]]
        assert region.id == record.id
        region.connection = None
        region.recorded = record
        region.pidfd = reclaimed.pidfd  # released when the process exits, unless it reconnects first
        self._loop.add_reader(region.pidfd, self._table.release_region, region)
        await self._resume(region, record)
        return region

    async def _serve_taken_over_child(self, record: RegionRecord, reclaimed: Reclaimed,
                                parent: ServedRegion) -> ServedRegion:
        """A forked child's copy again (as Lineage.adopt_fork_child made it,
        its process known as _op_adopt knows it)."""
        try:
            portion = self._portion_again(record, parent)
            pages, fixed = parent.fill.read_ahead
            fill = FillRange(parent.fill.base, parent.fill.length, portion.state, parent.fill.tracking,
                             read_ahead_pages=pages, read_ahead_fixed=fixed)
            region = self._table.add_region(Uffd(reclaimed.uffd), fill, portion, owner_pid=record.pid,
                                            fork_policy=parent.fork_policy, child_store=parent.child_store,
                                            keep_child_portions=parent.keep_child_portions, parent=parent,
                                            region_id=record.id)
        except BaseException:
            reclaimed.close()
            raise
        region.copy_lock, region.recorded, region.writable = parent.copy_lock, record, parent.writable
        self._lineage.watch_child(region, record.pid, reclaimed.pidfd)
        self._lineage.sync_defer_missing((region, parent))
        await self._resume(region, record)
        return region

    def _portion_again(self, record: RegionRecord, parent: ServedRegion) -> Portion:
        """A forked child's portion as its row recorded it."""
        shared = parent.child_store
        portion = Portion(shared.store, shared.allocator, parent.fill.length, parent=parent.portion,
                          kept=parent.keep_child_portions)
        shared.users += 1  # each portion holds one use of its store
        if record.offset is not None:
            portion.place_at(record.offset)
            shared.allocator.reserve(record.offset, portion.size, kept=portion.kept)
        for first, npages in record.materialized:
            portion.state.mark(first, npages)
        portion.region_id, portion.recorded_missing = record.id, portion.state.missing()
        return portion

    async def _portion_of_gone_root(self, record: RegionRecord, reclaimed: Reclaimed) -> ServedRegion:
        """The root of a lineage whose process is gone: its stores, opened
        from the descriptors a live descendant inherited, and its portion,
        which that descendant still reads pages through."""
        request = record.request
        named = {name: reclaimed.descriptors[name] for name in request["fds"] if name != "uffd"}
        fds = list(named.values())
        opened: list[OpenStore] = []
        try:
            store, child_store = await self._open_stores(request["url"], request.get("children"), named, fds, opened)
        except BaseException:
            for each in opened:
                self._table.release_store(each)
            raise
        finally:
            for fd in fds:
                os.close(fd)
            os.close(reclaimed.pidfd)
        portion = Portion(store.store, store.allocator, request["size"])
        portion.place_at(request["offset"])
        store.allocator.reserve(request["offset"], request["size"])
        region = self._gone(record, portion, child_store, None, parse_fork_policy(request.get("fork_policy", "on-write")),
                            request.get("keep_child_portions", False), parse_tracking(request.get("tracking", "async")))
        region.uid, region.holds_children_store = record.uid, request.get("children") is not None
        return region

    def _copy_of_gone_child(self, record: RegionRecord, parent: ServedRegion) -> ServedRegion:
        """A forked child whose process is gone, whose portion a live
        descendant still inherits pages from."""
        return self._gone(record, self._portion_again(record, parent), parent.child_store, parent,
                          parent.fork_policy, parent.keep_child_portions, parent.fill.tracking)

    def _gone(self, record: RegionRecord, portion: Portion, child_store: OpenStore, parent: ServedRegion | None,
              fork_policy: str, keep: bool, tracking: Tracking) -> ServedRegion:
        """A region of a process that is gone, as a released region is: not
        served (it has no uffd), kept for the portion its children read."""
        portion.region_id, portion.in_use_by_region = record.id, False
        region = ServedRegion(id=record.id, uffd=Uffd(-1), fill=FillRange(record.request["address"], portion.size,
                                                                          portion.state, tracking),
                              portion=portion, owner_pid=0, fork_policy=fork_policy, child_store=child_store,
                              keep_child_portions=keep, parent=parent, released=True, recorded=record)
        if parent is not None:
            region.copy_lock = parent.copy_lock
        return region

    async def _resume(self, region: ServedRegion, record: RegionRecord) -> None:
        """A region taken over is served again: the pages present in its
        process are resident, those written since its last write-back dirty
        (with "sync" tracking found in the page tables, their uffd-wp bit
        clear, and left so until the next write-back takes them: protected
        now, they would be clean in the page tables while only our memory
        knew them dirty, and lost if this pager died too), so are those of a
        write-back the dead pager had not finished, and every thread waiting
        in a fault is woken to fault again."""
        try:
            if region.pagemap_fd < 0:
                region.pagemap_fd = os.open(f"/proc/{record.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            region.fill.scan_resident(region.pagemap_fd)  # what page-out counts against a cap, and may drop
            if region.fill.tracking == Tracking.SYNC_WP:
                region.fill.mark_dirty(region.fill.scan_written(region.pagemap_fd, region.paged_spans, protect=False))
            region.retry_pages |= pages_of_page_runs(record.flushing)
            region.uffd.wake(region.fill.base, region.fill.length + PAGE_SIZE)
        except BaseException:
            self._table.release_region(region)
            raise
        self.counts["woken"] += 1


def _by_holding_process(lineages: list[list[RegionRecord]],
                        holder: dict[int, RegionRecord]) -> list[list[RegionRecord]]:
    """The lineages, those whose root one process holds side by side (in the
    order their processes first come): each process is served again whole
    as early as it can be, and its /proc entries are read just before."""
    def pid_of(rows: list[RegionRecord]) -> int:
        held = holder.get(rows[0].id)
        return held.pid if held is not None else 0

    order: dict[int, int] = {}
    for rows in lineages:
        order.setdefault(pid_of(rows), len(order))
    return sorted(lineages, key=lambda rows: order[pid_of(rows)])


def _claim_of(record: RegionRecord, holder: RegionRecord) -> Claim | None:
    """What taking a row over needs from the live processes: a root its
    uffd and descriptors, or, its process gone, the store descriptors the
    holder (a descendant) inherited; a forked child its uffd (its store is
    its parent's); a gone child nothing."""
    if record.parent is None:
        return Claim(record, record) if holder is record else Claim(record, holder, uffd=False)
    return Claim(record, record, descriptors=False) if holder is record else None
