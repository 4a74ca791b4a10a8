"""Where each page of a region lives in its backing store.

A region of `size` bytes over a store at `offset` is its first portion:
page i lives at offset + i * PAGE_SIZE. After fork() a child gets a second
portion, placed lazily, in the same store past every portion in use or in
the store named by `children=`; until a page is materialized there the
child reads it through its parent's portion (see native/portion.c).
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uffd_pager.crypto import PageAuthError
from uffd_pager.stores.base import BadPage, Extent, Store, UnauthenticPage, run_blocking
from uffd_pager.uffd import PAGE_SIZE, PortionState, Tracking


# map(dirty_tracking=...) names -> the kernel mechanism behind them.
TRACKING_MODES = {"async": Tracking.ASYNC_WP, "sync": Tracking.SYNC_WP}
DEFAULT_WRITEBACK_INTERVAL = 5.0


# The largest region: the x86-64 user address space (4-level page tables).
MAX_REGION_SIZE = 1 << 47
# Store offsets are off_t: every byte of a portion must stay below 2^63.
MAX_STORE_END = (1 << 63) - 1
# Timed write-back more often than this costs more than it saves.
MIN_WRITEBACK_INTERVAL = 0.1


def check_geometry(size: int, offset: int) -> None:
    """The one place region geometry is validated (the client before it creates anything, the pager again)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive number of bytes, not {size!r}")
    if size % PAGE_SIZE:
        raise ValueError(f"size {size} is not a multiple of the page size {PAGE_SIZE}")
    if size > MAX_REGION_SIZE:
        raise ValueError(f"size {size} exceeds the largest region, {MAX_REGION_SIZE} bytes (128 TiB)")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative number of bytes, not {offset!r}")
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of the page size {PAGE_SIZE}")
    if offset + size > MAX_STORE_END:
        raise ValueError(f"offset {offset} + size {size} passes the largest file offset, 2^63 - 1")


def tracking_name(tracking: Tracking) -> str:
    return next((name for name, mode in TRACKING_MODES.items() if mode == tracking), "none")


def parse_tracking(name: object) -> Tracking:
    try:
        return TRACKING_MODES[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"dirty_tracking must be one of {', '.join(TRACKING_MODES)}, not {name!r}") from None


def parse_writeback_interval(seconds: object) -> float:
    """Seconds between timed write-backs; 0 or None turns the timer off."""
    if seconds is None or (not isinstance(seconds, bool) and seconds == 0):
        return 0.0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not MIN_WRITEBACK_INTERVAL <= seconds < 1e9:  # a huge int would overflow float()
        raise ValueError(f"writeback_interval must be a number of seconds, at least {MIN_WRITEBACK_INTERVAL} "
                         f"(0 or None: off), not {seconds!r}")
    return float(seconds)


# map(read_ahead=...): "adaptive" windows grow while access is sequential
# (forward, backward or strided) up to READ_AHEAD_MAX and close at once on
# random access; a number of bytes is a fixed window after every missing
# fault; "off" reads only the faulting page. See native/readahead.c.
READ_AHEAD_MAX = 1 << 20
READ_AHEAD_FIXED_MAX = 16 << 20


@dataclass(frozen=True)
class ReadAhead:
    pages: int  # the largest window; 0: off
    fixed: bool

    @property
    def name(self) -> str | int:
        """As map() takes it."""
        if not self.pages:
            return "off"
        return self.pages * PAGE_SIZE if self.fixed else "adaptive"


def parse_read_ahead(value: object) -> ReadAhead:
    if value == "off" or value is None:
        return ReadAhead(0, False)
    if value == "adaptive":
        return ReadAhead(READ_AHEAD_MAX // PAGE_SIZE, False)
    if isinstance(value, int) and not isinstance(value, bool) and PAGE_SIZE <= value <= READ_AHEAD_FIXED_MAX \
            and value % PAGE_SIZE == 0:
        return ReadAhead(value // PAGE_SIZE, True)
    raise ValueError(f"read_ahead must be \"adaptive\", \"off\" or a window in bytes (a multiple of {PAGE_SIZE}, "
                     f"at most {READ_AHEAD_FIXED_MAX}), not {value!r}")


# map(max_resident=...): the region's cap, kept by page-out (paging.py).
MIN_MAX_RESIDENT = 64 * PAGE_SIZE


def parse_max_resident(value: object) -> int:
    """max_resident in pages (0: no cap), or ValueError."""
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MAX_RESIDENT or value % PAGE_SIZE:
        raise ValueError(f"max_resident must be a number of bytes, a multiple of {PAGE_SIZE} and at least "
                         f"{MIN_MAX_RESIDENT} (0 or None: no cap), not {value!r}")
    return value // PAGE_SIZE


# map(fork_policy=...): when a forked child's portion gets a copy of the
# data it inherits (claims 2-4).
FORK_POLICIES = ("on-write", "at-fork", "on-access")


def parse_fork_policy(name: object) -> str:
    if name not in FORK_POLICIES:
        raise ValueError(f"fork_policy must be one of {', '.join(FORK_POLICIES)}, not {name!r}")
    return name  # type: ignore[return-value]


class PortionAllocator:
    """Places children's portions in one backing store: in a slot freed by
    an exited child and discarded since, else past the end of the store and
    of every portion in use (never over bytes that are already there). So a
    new portion reads as zero throughout, which copies between portions rely
    on (see native/portion.c): they write only the data their sources hold.
    A local file's slot is discarded when it is reused (a hole punched: an
    exited child's bytes stay readable until then); a remote store's at
    once, since it holds the slot in a server's memory: `release` hands the
    slot to its caller, which gives it back with `add_free` once the store
    has discarded it."""

    def __init__(self, store: Store, kept: Iterable[tuple[int, int]] = (),
                 on_kept: Callable[[int, int], None] = lambda offset, length: None) -> None:
        """kept: slots never to hand out (kept by an earlier pager);
        on_kept(offset, length) is told of each slot kept from now on."""
        self.store = store
        self._discard_on_reuse = store.local_fd >= 0
        self.in_use: dict[int, int] = {}  # offset -> length
        self._users: dict[int, int] = {}  # offset -> regions mapping that portion
        self._free: list[tuple[int, int]] = []
        # Portions kept after their child exited (keep_child_portions=True),
        # and slots that could not be discarded, stay out of reach of later
        # allocations, this pager's and its successors' (on_kept records them).
        self._kept: list[tuple[int, int]] = list(kept)
        self._on_kept = on_kept
        self._discarding: list[tuple[int, int]] = []  # freed, not yet discarded by the store

    def reserve(self, offset: int, length: int, *, kept: bool = False) -> None:
        """Records a portion placed by its owner (a root region), or again
        by a pager taking over (a child's); the same portion may be mapped
        by several regions. kept: as allocate's."""
        self.in_use[offset] = max(length, self.in_use.get(offset, 0))
        self._users[offset] = self._users.get(offset, 0) + 1
        if kept:
            self._on_kept(offset, length)

    def allocate(self, length: int, *, kept: bool = False) -> int:
        """A new portion's offset. kept: its slot is never to be handed out
        again, even after it is released; recorded (on_kept) now, not when
        its process exits, so that a pager that dies before it notices the
        exit leaves its successor knowing the slot is taken (the store's
        end does not say so: a portion's tail may never have been written)."""
        offset = self._allocate(length)
        if kept:
            self._on_kept(offset, length)
        return offset

    def _allocate(self, length: int) -> int:
        for i, (offset, size) in enumerate(self._free):
            if size == length:
                del self._free[i]
                if self._discard_on_reuse and not self.store.discard_locally(offset, length):
                    raise OSError(errno.EOPNOTSUPP, f"{self.store.url}: a slot of it cannot be discarded here")
                self.in_use[offset], self._users[offset] = length, 1
                return offset
        end = max([self.store.end(), *(o + n for o, n in self.in_use.items()),
                   *(o + n for o, n in self._free), *(o + n for o, n in self._kept),
                   *(o + n for o, n in self._discarding)])
        align = max(self.store.alignment, PAGE_SIZE)
        offset = -(-end // align) * align
        self.in_use[offset], self._users[offset] = length, 1
        return offset

    def release(self, offset: int, *, reuse: bool) -> Extent | None:
        """Its last user let the portion go: the slot to discard before it
        is reused (then `add_free`), or None."""
        self._users[offset] = self._users.get(offset, 1) - 1
        if self._users[offset] > 0:
            return None
        del self._users[offset]
        length = self.in_use.pop(offset, None)
        if length is None:
            return None
        if not reuse:
            self._keep(offset, length)
            return None
        if self._discard_on_reuse:
            self._free.append((offset, length))
            return None
        self._discarding.append((offset, length))
        return offset, length

    def add_free(self, offset: int, length: int, *, discarded: bool) -> None:
        """A released slot, discarded by the store (or not: then it is
        never handed out again, since it may hold an exited child's bytes)."""
        self._discarding.remove((offset, length))
        if discarded:
            self._free.append((offset, length))
        else:
            self._keep(offset, length)

    def _keep(self, offset: int, length: int) -> None:
        self._kept.append((offset, length))
        self._on_kept(offset, length)


class Portion:
    """One process's portion of a region: the store and offset that hold
    its pages, the portion it inherits unmaterialized pages from, and the
    children that inherit from it."""

    def __init__(self, store: Store, allocator: PortionAllocator, size: int,
                 parent: "Portion | None" = None, *, kept: bool = False) -> None:
        """kept: a child's portion that stays in the store after its process
        exits (keep_child_portions), its slot never handed out again."""
        self.store = store
        self.allocator = allocator
        self.size = size
        self.parent = parent
        self.kept = kept
        self.children: list[Portion] = []
        self.state = PortionState(size // PAGE_SIZE, parent.state if parent else None)
        self.in_use_by_region = True
        self.copied_in = 0  # pages copied into this portion from its ancestors
        self.region_id = 0  # the region it was made for (its durable row's id)
        self.recorded_missing = -1  # missing() when its row was last written (see durable.py)
        if parent is not None:
            parent.children.append(self)

    @property
    def placed(self) -> bool:
        return self.state.placed

    @property
    def offset(self) -> int | None:
        return self.state.offset if self.state.placed else None

    def place_at(self, offset: int) -> None:
        self.state.place(self.store.local_fd, offset, self.store.remote)
        sealing = self.store.sealing()
        if sealing is not None:
            self.state.seal_with(*sealing)

    def place(self) -> None:
        """Chooses this (child's) portion's offset, once (claim 7: lazily)."""
        if not self.state.placed:
            self.place_at(self.allocator.allocate(self.size, kept=self.kept))

    def inheriting_children(self) -> list["Portion"]:
        return [c for c in self.children if c.state.missing()]

    def source(self, page: int) -> "Portion":
        """The portion of this chain that holds the page (see native/portion.c)."""
        portion = self
        while not portion.state.has(page):
            assert portion.parent is not None
            portion = portion.parent
        return portion

    async def copy_in(self, first: int, npages: int) -> int:
        """Materializes pages here from the parent chain (placing the
        portion first). The caller holds the lineage's copy lock."""
        self.place()
        if self.chain_is_direct():
            return await run_blocking(self.copy_in_direct, first, npages)
        copied = await self._copy_in_through_store(first, npages)
        self.copied_in += copied
        return copied

    def copy_in_direct(self, first: int, npages: int) -> int:
        """copy_in for a placed portion whose chain is all local files in
        the clear: copy_file_range, in C. Blocking (a worker thread's)."""
        copied = self.state.copy_in(first, npages)
        self.copied_in += copied
        return copied

    def chain_is_direct(self) -> bool:
        portion: Portion | None = self
        while portion is not None:
            if not portion.store.direct:
                return False
            portion = portion.parent
        return True

    async def _copy_in_through_store(self, first: int, npages: int) -> int:
        """Pages of a chain that is not all local files in the clear (a
        remote store; an encrypted one, whose pages are decrypted from where
        they are and encrypted anew for this portion: a ciphertext is bound
        to its place) are read and written through the stores. Only the
        pages a source holds are copied; the others read as zero here
        already (see native/portion.c), so they are only marked."""
        assert self.parent is not None and self.offset is not None
        end = first + npages
        copied = written = 0
        page = self.state.next_missing(first, end)
        while page < end:
            depth, run_end = self.state.source_run(page, end)
            source = self._ancestor(depth)
            done = await self._copy_on_the_store_side(source, page, run_end)
            written += done + await self._copy_stored_pages(source, page + done, run_end)
            self.state.mark(page, run_end - page)
            copied += run_end - page
            page = self.state.next_missing(run_end, end)
        if written:
            await self.store.sync()
        return copied

    _COPY_BATCH = 64  # pages read, then written, at a time

    async def _copy_on_the_store_side(self, source: "Portion", first: int, end: int) -> int:
        """Copies the whole blocks at the start of [first, end) on the
        store's side when source and this portion are in one store that can
        (Redis: COPY of a chunk's hash); returns how many pages it copied
        (0: none, the caller copies through the pager)."""
        store, align = self.store, max(self.store.alignment, PAGE_SIZE)
        if source.store is not store or align == PAGE_SIZE:
            return 0
        assert source.offset is not None and self.offset is not None
        src, dst = source.offset + first * PAGE_SIZE, self.offset + first * PAGE_SIZE
        whole = ((end - first) * PAGE_SIZE) // align * align
        if src % align or dst % align or not whole or not await store.copy_within(src, dst, whole):
            return 0
        return whole // PAGE_SIZE

    async def _copy_stored_pages(self, source: "Portion", first: int, end: int) -> int:
        """Copies the pages of [first, end) that source's store holds (it is
        their source) to the same pages here; returns how many."""
        batch: list[int] = []
        written = 0
        page = source.state.next_stored(first, end)
        while page < end:
            batch.append(page)
            if len(batch) == self._COPY_BATCH:
                written += await self._copy_pages(source, batch)
                batch = []
            page = source.state.next_stored(page + 1, end)
        if batch:
            written += await self._copy_pages(source, batch)
        return written

    async def _copy_pages(self, source: "Portion", pages: list[int]) -> int:
        """Reads pages (ascending) as source holds them, writes those it
        holds here; returns how many it wrote."""
        assert source.offset is not None and self.offset is not None
        values = await source.store.read([source.offset + p * PAGE_SIZE for p in pages])
        extents: list[Extent] = []
        data: list[bytes] = []
        for p, value in zip(pages, values):
            if isinstance(value, UnauthenticPage):
                raise PageAuthError(str(value))
            if isinstance(value, BadPage):
                raise OSError(errno.EIO, f"{source.store.url}: {value}")
            if value is None:
                continue  # a hole: it reads as zero here already
            offset = self.offset + p * PAGE_SIZE
            if extents and extents[-1][0] + extents[-1][1] == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + PAGE_SIZE)
            else:
                extents.append((offset, PAGE_SIZE))
            data.append(value)
        if extents:
            await self.store.write(extents, b"".join(data))
        return len(data)

    def _ancestor(self, depth: int) -> "Portion":
        portion = self
        for _ in range(depth):
            assert portion.parent is not None
            portion = portion.parent
        return portion

    async def complete(self) -> int:
        """Copies every page still inherited, so this portion alone holds the
        process's view (a fresh map() of it reproduces the view)."""
        return await self.copy_in(0, self.size // PAGE_SIZE) if self.parent is not None else 0


async def copy_to_children(children: list[Portion], spans: list[tuple[int, int]], own: Portion | None, *,
                           own_whole: bool = True) -> int:
    """Copies the pages of spans [(first, npages)] into each child that
    still inherits them, then materializes in `own` (a child's portion)
    every page it inherits (own_whole) or those of spans. Returns the pages
    copied into the children. The caller holds the lineage's copy lock."""
    for portion in [*children, *([own] if own is not None else [])]:
        portion.place()  # the allocator is the loop's
    direct = [child for child in children if child.chain_is_direct()]
    own_direct = own is not None and own.chain_is_direct()
    # Local files: every copy in one worker thread (one hop, however many spans).
    own_spans = [(0, own.size // PAGE_SIZE)] if own is not None and own_whole else spans
    copied = await run_blocking(_copy_direct, direct, spans, own if own_direct else None, own_spans) \
        if direct or own_direct else 0
    for child in children:
        if child in direct:
            continue
        for first, npages in spans:
            if not child.state.live:
                break  # the child exited while we copied: its portion is gone
            try:
                copied += await child.copy_in(first, npages)
            except OSError as exc:
                if exc.errno != errno.EBADF or child.state.live:
                    raise
    if own is not None and not own_direct:
        for first, npages in own_spans:
            await own.copy_in(first, npages)
    return copied


def _copy_direct(children: list[Portion], spans: list[tuple[int, int]], own: Portion | None,
                 own_spans: list[tuple[int, int]]) -> int:
    """copy_to_children's part for local files, in a worker thread."""
    copied = 0
    for child in children:
        for first, npages in spans:
            try:
                copied += child.copy_in_direct(first, npages)
            except OSError as exc:
                if exc.errno != errno.EBADF or child.state.live:
                    raise
                break  # the child exited while we copied: its portion is gone
    for first, npages in own_spans if own is not None else []:
        own.copy_in_direct(first, npages)  # type: ignore[union-attr]
    return copied


# --- spans: the address ranges a region's registration still covers -------------

Span = tuple[int, int]  # [start, end)


def cut_span(spans: list[Span], start: int, end: int) -> list[Span]:
    """spans without [start, end) (an munmap)."""
    out: list[Span] = []
    for s, e in spans:
        if e <= start or s >= end:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if e > end:
            out.append((end, e))
    return out


def move_span(spans: list[Span], old: int, new: int, length: int) -> list[Span]:
    """spans after mremap moved [old, old+length) to new."""
    moved = [(max(s, old) - old + new, min(e, old + length) - old + new)
             for s, e in spans if s < old + length and e > old]
    return sorted(cut_span(spans, old, old + length) + moved)


def clip_spans(spans: list[Span], start: int, end: int) -> list[Span]:
    return [(max(s, start), min(e, end)) for s, e in spans if s < end and e > start]
