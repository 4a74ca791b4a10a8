"""Write-back of a region: which pages are dirty (re-protected in the same
step), the copies its children need first, the store writes, and the
periodic timer (see writeback.py for the batching)."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Callable

from uffd_pager import protocol
from uffd_pager.lineage import Lineage
from uffd_pager.regions import RegionTable
from uffd_pager.served import ServedRegion
from uffd_pager.uffd import (
    PAGE_SIZE,
    Run,
    Tracking,
    present_pages,
)
from uffd_pager.writeback import merge_runs, page_runs, pages_of, runs_of_pages, write_back

log = logging.getLogger("uffd_pager.pager")


class Flusher:
    """flush() of a region, and its periodic timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: RegionTable, lineage: Lineage) -> None:
        self._loop = loop
        self._table = table
        self._lineage = lineage
        # Records in the durable state the pages that are clean in the
        # kernel's eyes but not in the store (none: every page is).
        self.record_flushing: Callable[[ServedRegion, list[tuple[int, int]]], None] = lambda region, pages: None

    async def flush(self, region: ServedRegion) -> dict[str, int]:
        """Writes every page dirtied before the call to the region's portion
        and syncs it (msync(MS_SYNC) semantics). On failure the pages stay
        dirty and the error is raised; the next flush retries them.

        A child's portion is completed in the same step: every page it still
        inherits is copied in, so that the portion alone holds the child's
        view. Before pages of a portion change, children that still inherit
        them get a copy of the old bytes first (claim 2)."""
        with self._table.holding(region):
            async with region.flush_lock:
                return await self._flush_held(region)

    async def _flush_held(self, region: ServedRegion) -> dict[str, int]:
        if region.fill.tracking == Tracking.NONE or region.released:
            return {"pages": 0, "bytes": 0}
        if region.parent is not None:
            region.portion.place()
        # Taking the dirty pages makes them clean in the kernel's eyes (and,
        # with "sync" tracking, takes turns with events): until they are
        # written, the durable state says the whole region may hold unwritten
        # pages (which ones is known only once taken, and one commit before
        # and one after is all a write-back pays), so that a pager taking
        # over after our death writes every present page. What a failure
        # leaves in retry_pages stays recorded.
        journal = (region.fill.tracking == Tracking.ASYNC_WP or region.fill.dirty_pages > 0
                   or bool(region.retry_pages))
        if journal:
            self.record_flushing(region, [(0, region.fill.length // PAGE_SIZE)])
        try:
            return await self._write_taken(region)
        finally:
            if journal:
                self.record_flushing(region, page_runs(region.retry_pages))

    async def _write_taken(self, region: ServedRegion) -> dict[str, int]:
        portion = region.portion
        runs = await self._take_dirty(region)
        if runs and not region.writable:
            # Its client may not write the store (whoever else may): kept dirty.
            region.retry_pages |= pages_of(runs, region.fill.base)
            raise protocol.StoreReadOnly(errno.EBADF, f"{portion.store.url} was opened read-only by this client; "
                                                      "reopen it for writing to write back")
        # From here until written, these pages are clean in the kernel's
        # eyes but not in the store: a fork meanwhile must know (see
        # _adopt_fork_child), and a failure puts them back.
        region.in_flight = pages_of(runs, region.fill.base)
        try:
            await self._lineage.preserve_for_children(region, runs)
            if not runs and region.parent is None:
                return {"pages": 0, "bytes": 0}
            result = await write_back(portion.store, region.owner_pid, runs)
        except OSError as exc:
            region.retry_pages |= region.in_flight
            region.writeback["writeback_errors"] += 1
            region.last_error = str(exc)
            raise
        finally:
            region.in_flight = set()
        async with region.copy_lock:  # one thread at a time changes a portion's page sets
            for run in runs:
                portion.state.mark(region.page_index(run.addr), run.length // PAGE_SIZE)
        region.writeback["flushes"] += 1
        region.writeback["pages_written"] += result.pages
        region.writeback["bytes_written"] += result.bytes
        return {"pages": result.pages, "bytes": result.bytes}

    async def _take_dirty(self, region: ServedRegion) -> list[Run]:
        """The dirty pages, write-protected again in the same step; pages a
        failed flush left behind are added (those still resident)."""
        fill = region.fill
        if fill.tracking == Tracking.SYNC_WP:
            runs: list[Run] = []
            while True:
                taken, err = fill.take_dirty(region.uffd)
                runs += taken
                region.in_flight |= pages_of(taken, fill.base)  # a fork while we wait must see them
                if not err:
                    break
                if err != errno.EAGAIN:
                    region.retry_pages |= region.in_flight
                    region.in_flight = set()
                    raise OSError(err, f"UFFDIO_WRITEPROTECT of dirty pages: {os.strerror(err)}")
                # An event (a fork, say) is unread: let the loop read it first.
                await asyncio.sleep(0.001)
                if region.released:
                    region.retry_pages |= region.in_flight
                    region.in_flight = set()
                    raise ProcessLookupError(errno.ESRCH, f"region {region.id}: its process exited during the flush")
        else:
            runs = fill.scan_written(self._pagemap_fd(region), region.paged_spans, protect=True)
        if region.retry_pages:
            retry = present_pages(self._pagemap_fd(region), fill.base, region.retry_pages)
            region.retry_pages.clear()
            runs = merge_runs(runs + runs_of_pages(retry, fill.base, region.portion.offset or 0))
        return runs

    def _pagemap_fd(self, region: ServedRegion) -> int:
        if region.pagemap_fd < 0:
            if not region.owner_pid:
                raise ProcessLookupError(errno.ESRCH, f"region {region.id}: its process is not known yet")
            region.pagemap_fd = os.open(f"/proc/{region.owner_pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return region.pagemap_fd

    async def flush_periodically(self, region: ServedRegion, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(region)
            except OSError as exc:
                log.warning("region %d: periodic write-back failed (will retry): %s", region.id, exc)
