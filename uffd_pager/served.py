"""What the pager keeps per client connection, per served region, and per open
backing store."""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from uffd_pager.durable import RegionRecord
from uffd_pager.layout import Portion, PortionAllocator, ReadAhead, Span, clip_spans, tracking_name
from uffd_pager.stores.base import Store
from uffd_pager.uffd import PAGE_SIZE, FillRange, PageFault, Tracking, Uffd
from uffd_pager.writeback import pages_of


_URL_SHOWN = 1024  # characters of a store URL in a region's summary


@dataclass(eq=False)
class Connection:
    """A client's control connection, identified by its SO_PEERCRED."""

    sock: socket.socket | None  # None: a process taken over from a dead pager (takeover.py), not back yet
    pid: int
    uid: int
    regions: dict[int, ServedRegion] = field(default_factory=dict)
    greeted: bool = False  # its hello was answered
    agent: Any = None  # its process's page-out agent (paging.Agent), from its first map that gave one
    # Requests with their descriptors; an exception to answer with; None at EOF.
    inbox: "asyncio.Queue[tuple[dict[str, Any], list[int]] | Exception | None]" = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class OpenStore:
    """A backing store opened once per pager however many regions use it,
    so that portions placed in it by different regions never overlap."""

    store: Store
    allocator: PortionAllocator
    users: int = 0


@dataclass(eq=False)
class ServedRegion:
    """One registered range of one client address space: a root region
    mapped by a client, or a forked child's copy of it."""

    id: int
    uffd: Uffd
    fill: FillRange
    portion: Portion
    owner_pid: int  # 0 until a forked child claims its copy (PagerService._op_adopt)
    fork_policy: str
    child_store: OpenStore  # where children's portions go
    keep_child_portions: bool
    parent: "ServedRegion | None" = None
    connection: "Connection | None" = None
    pidfd: int = -1
    pagemap_fd: int = -1  # /proc/<owner>/pagemap, for PAGEMAP_SCAN (asynchronous tracking)
    pending: list[PageFault] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=lambda: {"fork": 0, "remap": 0, "remove": 0, "unmap": 0})
    errors: int = 0
    poisoned: int = 0
    # Pages whose write-back failed: the kernel no longer reports them dirty,
    # so they are kept here and written by the next flush.
    retry_pages: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # taken by a flush, not yet stored
    flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One per lineage (a root region and every region forked from it): held
    # while pages are copied between its portions in a worker thread.
    copy_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: "asyncio.Task[None] | None" = None
    writeback: dict[str, int] = field(default_factory=lambda: {
        "flushes": 0, "pages_written": 0, "bytes_written": 0, "writeback_errors": 0})
    copied_to_children: int = 0
    tag_faults: int = 0
    # A forked child's claim: its tag page's fault is filled with this
    # secret, which only a process reading its own tag page can send back
    # (see PagerService._op_adopt). Empty for a root region.
    claim_token: bytes = b""
    auth_failures: int = 0  # pages that failed authentication (poisoned, never handed out)
    # What of the registration (region and tag page) is still mapped, and
    # where: the program's own munmap/mremap change it (UNMAP/REMAP events).
    spans: list[Span] = field(default_factory=list)
    last_error: str = ""
    uid: int | None = None  # the tenant of a root region (see tenants.py)
    holds_children_store: bool = False  # a root region whose map(children=...) took a use of that store
    writable: bool = True  # its client's store descriptors allow writing
    # A forked child's pages are served only once its own process holds its
    # uffd (see PagerService._op_adopt): if the pager died before, the
    # child's last reference would be gone with it, the kernel would
    # unregister the range, and the child would read zeros.
    handed: bool = True
    forked_at: float = 0.0  # loop time of the FORK event (children)
    # Teardown waits while an operation that awaits (a flush) uses the region:
    # see PagerService._holding.
    holds: int = 0
    released: bool = False
    # Faults deferred by EAGAIN are retried on a timer until served.
    retry_timer: "asyncio.TimerHandle | None" = None
    retry_delay: float = 0.0
    # Pages whose poisoning failed with EAGAIN: poisoned on the next retry.
    unfillable: dict[int, int] = field(default_factory=dict)
    # Pages fetched from a remote store whose placing failed with EAGAIN
    # (address -> bytes, None: a hole): placed on the next retry.
    fetched: dict[int, bytes | None] = field(default_factory=dict)
    fetched_pages: int = 0  # pages fetched from stores without a descriptor (for faults, and ahead of them)
    max_resident: int = 0  # pages; 0: no cap (paging.py)
    evicting: bool = False  # an eviction runs
    dropping: set[tuple[int, int]] = field(default_factory=set)  # [start, end) the agent is dropping
    agent: Any = None  # the client process's page-out agent (paging.Agent), if it gave one
    read_ahead_fetched: int = 0  # ... of which placed ahead of any fault (read-ahead, prefetch)
    fetch_failures: int = 0  # ... that could not be (poisoned)
    # fork_policy="on-access": pages whose copy is done, to be filled.
    copied: set[int] = field(default_factory=set)
    recorded: "RegionRecord | None" = None  # its row in the durable state (durable.py), if it has one

    @property
    def tag_address(self) -> int:
        """The page past the region: untouched by the root process, so a
        forked child's read of it is a fault on the child's own uffd."""
        return self.fill.base + self.fill.length

    @property
    def encrypted(self) -> bool:
        return self.portion.store.key_id is not None

    @property
    def store_kind(self) -> str:
        """Its store's URL scheme: file, redis, redis+unix, redis+cluster."""
        return urlsplit(self.portion.store.url).scheme

    @property
    def tenant_uid(self) -> int | None:
        """The uid of the client whose region this is, or was forked from."""
        region = self
        while region.parent is not None:
            region = region.parent
        return region.uid

    @property
    def error_count(self) -> int:
        """Pages that could not be filled (poisoned) and failed write-backs."""
        return self.errors + self.writeback["writeback_errors"]

    def summary(self) -> dict[str, Any]:
        """One line of `status`: what a person looks at first."""
        counters = self.fill.counters()
        return {
            "id": self.id,
            "pid": self.owner_pid,
            "uid": self.tenant_uid,
            "parent": self.parent.id if self.parent is not None else None,
            # Cut where a URL is absurdly long: a status reply must hold many lines.
            "store": url if len(url := self.portion.store.url) <= _URL_SHOWN else url[:_URL_SHOWN - 3] + "...",
            "kind": self.store_kind,
            "encrypted": self.encrypted,
            "size": self.fill.length,
            "tracking": tracking_name(self.fill.tracking),
            "resident_pages": counters["resident_pages"],
            "dirty_pages": self.dirty_pages(),
            "faults": counters["faults"],
            "evictions": counters["evictions"],
            "bytes_written": self.writeback["bytes_written"],
            "errors": self.error_count,
        }

    @property
    def paged_spans(self) -> list[Span]:
        """The parts of the region proper that are still mapped in place."""
        return clip_spans(self.spans, self.fill.base, self.fill.base + self.fill.length)

    def page_index(self, address: int) -> int:
        return (address - self.fill.base) // PAGE_SIZE

    def dirty_pages(self) -> int:
        """Pages the kernel reports written, and pages a failed flush left
        behind, each counted once."""
        fill = self.fill
        if fill.tracking == Tracking.ASYNC_WP and self.pagemap_fd >= 0:
            try:
                runs = fill.scan_written(self.pagemap_fd, self.paged_spans, protect=False)
            except OSError:
                return len(self.retry_pages)  # the owner exited
            return len(pages_of(runs, fill.base) | self.retry_pages)
        retried = sum(1 for p in self.retry_pages if not fill.is_dirty(fill.base + p * PAGE_SIZE))
        return fill.counters()["dirty_pages"] + retried

    def stats(self) -> dict[str, Any]:
        counters = self.fill.counters()
        pages, fixed = self.fill.read_ahead
        return {
            **counters,
            "read_ahead_pages": counters["read_ahead_pages"] + self.read_ahead_fetched,
            "read_ahead": ReadAhead(pages, fixed).name,
            "max_resident": self.max_resident * PAGE_SIZE,
            "dirty_pages": self.dirty_pages(),
            **self.writeback,
            "tracking": tracking_name(self.fill.tracking),
            "events": dict(self.events),
            "errors": self.errors,
            "poisoned": self.poisoned,
            "encrypted": self.encrypted,
            "auth_failures": self.auth_failures,
            "fetched_pages": self.fetched_pages + counters["fetched"],
            "fetch_failures": self.fetch_failures,
            "pending": len(self.pending),
            "last_error": self.last_error,
            "fork": {
                "policy": self.fork_policy,
                "child": self.parent is not None,
                "portion_offset": self.portion.offset,
                "pages_copied_in": self.portion.copied_in,
                "pages_still_inherited": self.portion.state.missing(),
                "pages_copied_to_children": self.copied_to_children,
                "live_children": len(self.portion.children),
            },
        }
