"""A typed wrapper over a userfaultfd: the `Uffd` object, its events, and the
C fill path (`FillRange`).

Every failure is an ``OSError`` subclass carrying the kernel's errno and a
message that names the fix where there is one (permissions above all).
"""
from __future__ import annotations

import enum
import errno
import functools
import os
from dataclasses import dataclass
from typing import Any, Union

from uffd_pager.native import ffi, lib

PAGE_SIZE: int = lib.UP_PAGE_SIZE


class Feature(enum.IntFlag):
    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


class RegisterMode(enum.IntFlag):
    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


COPY_MODE_DONTWAKE: int = lib.UFFDIO_COPY_MODE_DONTWAKE
COPY_MODE_WP: int = lib.UFFDIO_COPY_MODE_WP
WRITEPROTECT_MODE_WP: int = lib.UFFDIO_WRITEPROTECT_MODE_WP
WRITEPROTECT_MODE_DONTWAKE: int = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
MOVE_MODE_ALLOW_SRC_HOLES: int = lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES

_PERMISSION_FIX = (
    "creating a userfaultfd that follows fork() needs CAP_SYS_PTRACE (run as root, or grant "
    "the capability: setcap cap_sys_ptrace+ep, or docker --cap-add SYS_PTRACE); without it the "
    "syscall also needs sysctl vm.unprivileged_userfaultfd=1 or read-write access to "
    "/dev/userfaultfd"
)


def _os_error(err: int, what: str) -> OSError:
    """OSError(errno, ...) picks the subclass (PermissionError, ...) itself."""
    return OSError(err, f"{what}: {os.strerror(err)}")


def _error(err: int, what: str) -> OSError:
    """A failed userfaultfd call: permission errors name the fix."""
    if err in (errno.EPERM, errno.EACCES):
        return OSError(err, f"{what}: {os.strerror(err)} ({_PERMISSION_FIX})")
    return _os_error(err, what)


@dataclass(frozen=True, slots=True)
class PageFault:
    address: int
    flags: int  # UFFD_PAGEFAULT_FLAG_*
    thread_id: int

    @property
    def page(self) -> int:
        return self.address & ~(PAGE_SIZE - 1)

    @property
    def write(self) -> bool:
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        """A write to a page mapped write-protected (not a missing page)."""
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_WP)

    @property
    def minor(self) -> bool:
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_MINOR)


@dataclass(frozen=True, slots=True)
class ForkEvent:
    uffd: int  # the child's new uffd, already open in the reader's fd table


@dataclass(frozen=True, slots=True)
class RemapEvent:
    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class RemoveEvent:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnmapEvent:
    start: int
    end: int


Event = Union[PageFault, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent]


def _decode(msg) -> Event:
    kind = msg.event
    if kind == lib.UFFD_EVENT_PAGEFAULT:
        return PageFault(address=msg.b, flags=msg.a, thread_id=msg.c)
    if kind == lib.UFFD_EVENT_FORK:
        return ForkEvent(uffd=msg.a)
    if kind == lib.UFFD_EVENT_REMAP:
        return RemapEvent(old=msg.a, new=msg.b, length=msg.c)
    if kind == lib.UFFD_EVENT_REMOVE:
        return RemoveEvent(start=msg.a, end=msg.b)
    if kind == lib.UFFD_EVENT_UNMAP:
        return UnmapEvent(start=msg.a, end=msg.b)
    raise ValueError(f"unknown userfaultfd event {kind:#x}")


class Uffd:
    """One userfaultfd. Owns its descriptor; `close()` releases it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, features: Feature, *, user_mode_only: bool = False) -> "Uffd":
        """Creates a userfaultfd and negotiates `features` (all or nothing)."""
        missing = features & ~available_features()
        if missing:
            raise OSError(errno.EOPNOTSUPP, f"this kernel lacks userfaultfd features {missing!r}")
        fd = lib.up_uffd_create(int(user_mode_only))
        if fd < 0:
            raise _error(ffi.errno, "userfaultfd()")
        uffd = cls(fd)
        try:
            uffd._api(features)
        except BaseException:
            uffd.close()
            raise
        return uffd

    def _api(self, features: int) -> tuple[int, int]:
        out_features = ffi.new("uint64_t *")
        out_ioctls = ffi.new("uint64_t *")
        if lib.up_uffd_api(self.fd, features, out_features, out_ioctls) < 0:
            raise _error(ffi.errno, f"UFFDIO_API with features {Feature(features)!r}")
        return out_features[0], out_ioctls[0]

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register(self, start: int, length: int, mode: RegisterMode) -> int:
        """Registers [start, start+length); returns the mask of ioctls allowed on it."""
        ioctls = ffi.new("uint64_t *")
        if lib.up_uffd_register(self.fd, start, length, mode, ioctls) < 0:
            raise _error(ffi.errno, f"UFFDIO_REGISTER {start:#x}+{length:#x}")
        return ioctls[0]

    def unregister(self, start: int, length: int) -> None:
        if lib.up_uffd_unregister(self.fd, start, length) < 0:
            raise _error(ffi.errno, f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    def wake(self, start: int, length: int) -> None:
        if lib.up_uffd_wake(self.fd, start, length) < 0:
            raise _error(ffi.errno, f"UFFDIO_WAKE {start:#x}+{length:#x}")

    def writeprotect(self, start: int, length: int, protect: bool, *, wake: bool = True) -> None:
        mode = (WRITEPROTECT_MODE_WP if protect else 0) | (0 if wake else WRITEPROTECT_MODE_DONTWAKE)
        if lib.up_uffd_writeprotect(self.fd, start, length, mode) < 0:
            raise _error(ffi.errno, f"UFFDIO_WRITEPROTECT {start:#x}+{length:#x}")

    def copy(self, dst: int, data: bytes | bytearray | memoryview, mode: int = 0) -> int:
        """Copies `data` (a multiple of the page size) to dst; returns bytes copied."""
        done = ffi.new("int64_t *")
        src = ffi.from_buffer(data)
        if lib.up_uffd_copy(self.fd, dst, src, len(data), mode, done) < 0:
            raise _error(ffi.errno, f"UFFDIO_COPY to {dst:#x}+{len(data):#x}")
        return done[0]

    def zeropage(self, start: int, length: int) -> int:
        done = ffi.new("int64_t *")
        if lib.up_uffd_zeropage(self.fd, start, length, 0, done) < 0:
            raise _error(ffi.errno, f"UFFDIO_ZEROPAGE {start:#x}+{length:#x}")
        return done[0]

    def continue_(self, start: int, length: int, mode: int = 0) -> int:
        done = ffi.new("int64_t *")
        if lib.up_uffd_continue(self.fd, start, length, mode, done) < 0:
            raise _error(ffi.errno, f"UFFDIO_CONTINUE {start:#x}+{length:#x}")
        return done[0]

    def poison(self, start: int, length: int) -> int:
        done = ffi.new("int64_t *")
        if lib.up_uffd_poison(self.fd, start, length, 0, done) < 0:
            raise _error(ffi.errno, f"UFFDIO_POISON {start:#x}+{length:#x}")
        return done[0]

    def move(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        done = ffi.new("int64_t *")
        if lib.up_uffd_move(self.fd, dst, src, length, mode, done) < 0:
            raise _error(ffi.errno, f"UFFDIO_MOVE {src:#x} to {dst:#x}+{length:#x}")
        return done[0]

    def read_events(self, max_events: int = 64) -> list[Event]:
        """Reads what is pending without blocking: faults first, then events."""
        msgs = ffi.new("struct up_msg[]", max_events)
        n = lib.up_uffd_read(self.fd, msgs, max_events)
        if n < 0:
            raise _error(ffi.errno, "read(userfaultfd)")
        return [_decode(msgs[i]) for i in range(n)]


def buffer_address(buffer: Any) -> int:
    """The address of a writable buffer's first byte (an mmap, a bytearray)."""
    pointer = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


def protect(address: int, length: int, prot: int) -> None:
    """mprotect(2), which the standard library does not wrap."""
    if lib.up_mprotect(address, length, prot) < 0:
        raise _os_error(ffi.errno, f"mprotect {address:#x}+{length:#x}")


@functools.cache
def available_features() -> Feature:
    """The features this kernel offers, probed once on a throwaway uffd
    (UFFDIO_API may be called only once per uffd, so probe and use differ)."""
    fd = lib.up_uffd_create(0)
    if fd < 0:
        raise _error(ffi.errno, "userfaultfd()")
    try:
        features, _ = Uffd(fd)._api(0)
    finally:
        os.close(fd)
    return Feature(features) & ~_hidden_features()


def _hidden_features() -> Feature:
    """Features to treat as missing, named in $UFFD_PAGER_HIDE_FEATURES
    (comma-separated, e.g. "WP_ASYNC"): how the tests run what a process
    on an older kernel does, on this one. Unknown names are ignored."""
    hidden = Feature(0)
    for name in os.environ.get("UFFD_PAGER_HIDE_FEATURES", "").split(","):
        hidden |= Feature.__members__.get(name.strip(), Feature(0))
    return hidden


@dataclass(frozen=True, slots=True)
class Deferred:
    """A message the C fill path handed back: an event, or a fault it could
    not serve (`status` is -errno: EAGAIN while an event is unread, ENOENT
    after the layout changed, EOPNOTSUPP when the range has no C source)."""

    event: Event
    status: int


# The page-out agent's requests (native/agent.c): drop a range, or move
# out the unwritten pages of at most AGENT_MOVE_MAX of them.
AGENT_DROP, AGENT_MOVE_OUT, AGENT_MOVE_MAX = lib.UP_AGENT_DROP, lib.UP_AGENT_MOVE_OUT, lib.UP_AGENT_MOVE_MAX


class Tracking(enum.IntEnum):
    """How a region learns which pages its process wrote."""

    NONE = lib.UP_TRACK_NONE
    SYNC_WP = lib.UP_TRACK_SYNC_WP
    ASYNC_WP = lib.UP_TRACK_ASYNC_WP


@dataclass(frozen=True, slots=True)
class Run:
    """Pages [addr, addr+length) of the client, at store_offset in the store."""

    addr: int
    store_offset: int
    length: int


def _released(what: str) -> OSError:
    """Used after close(): the native state is freed, so refuse (EBADF)."""
    return OSError(errno.EBADF, f"{what} was released")


class PortionState:
    """The C view of a portion (see native/portion.c): the descriptor and
    offset that hold its pages, and for a forked child's portion which pages
    are materialized in it and the parent it inherits the others from.

    close() frees the page set and is idempotent; after it every method
    that acts on pages raises OSError(EBADF), and so do those of a child or
    a FillRange whose chain holds it (the C entries refuse it too), while
    `placed` and `offset` stay readable."""

    def __init__(self, npages: int, parent: "PortionState | None" = None) -> None:
        self._npages = npages
        # The destructor frees the page set if close() never ran.
        self._c = ffi.gc(ffi.new("struct up_portion *"), lib.up_portion_release)
        self.parent = parent  # keeps the parent's struct alive while we point at it
        if lib.up_portion_init(self._c, npages, parent._live() if parent is not None else ffi.NULL) < 0:
            raise _os_error(ffi.errno, f"portion state of {npages} pages")

    def _live(self) -> Any:
        """The struct, if it and its parent chain are live (else EBADF)."""
        state: PortionState | None = self
        while state is not None:
            if not state._c.live:
                raise _released(f"the portion state of {state._npages} pages")
            state = state.parent
        return self._c

    def place(self, fd: int, offset: int, remote: Any = None) -> None:
        """fd: the store's local descriptor, or -1 for a store without one
        (the C paths then hand its pages to Python: -EOPNOTSUPP), unless
        remote (the store's `struct up_remote *`) lets C ask for them."""
        c = self._live()
        self._remote = remote  # keeps the cdata alive as long as we point at it
        c.remote = remote if remote is not None else ffi.NULL
        c.fd = fd
        c.offset = offset
        c.placed = 1

    def seal_with(self, aead: Any, store_id: bytes) -> None:
        """The portion's pages are encrypted: the C fill path opens them with
        aead, which reads their records in the store's catalog (see native/fill.c)."""
        c = self._live()
        self._aead = aead  # keeps the cdata alive as long as we point at it
        c.aead = aead
        ffi.memmove(c.store_id, store_id, 16)

    @property
    def placed(self) -> bool:
        return bool(self._c.placed)

    @property
    def live(self) -> bool:
        """False once closed (its process is gone)."""
        return bool(self._c.live)

    @property
    def offset(self) -> int:
        return self._c.offset

    def copy_in(self, first: int, npages: int) -> int:
        """Copies pages not yet materialized here from the parent chain;
        returns how many were materialized."""
        copied = ffi.new("uint64_t *")
        if lib.up_portion_copy_in(self._live(), first, npages, copied) < 0:
            raise _error(ffi.errno, f"copying pages {first}..{first + npages} into a child's portion")
        return copied[0]

    def mark(self, first: int, npages: int) -> None:
        if lib.up_portion_mark(self._live(), first, npages) < 0:
            raise _os_error(ffi.errno, f"marking pages {first}..{first + npages} materialized")

    def has(self, page: int) -> bool:
        """Whether this portion holds the page itself (a root portion: all)."""
        return bool(lib.up_portion_has(self._live(), page))

    def missing(self) -> int:
        """Pages still inherited (not materialized here)."""
        return lib.up_portion_missing(self._live())

    def next_missing(self, first: int, end: int) -> int:
        """The first page of [first, end) this portion does not hold itself, or end."""
        return lib.up_portion_next_missing(self._live(), first, end)

    def held_runs(self) -> list[tuple[int, int]]:
        """The runs (first, npages) of pages this portion holds itself."""
        c, runs, page = self._live(), [], 0
        while (page := lib.up_portion_next_held(c, page, self._npages)) < self._npages:
            end = lib.up_portion_next_missing(c, page, self._npages)
            runs.append((page, end - page))
            page = end
        return runs

    def source_run(self, first: int, end: int) -> tuple[int, int]:
        """(depth, run_end): the portion of this chain that holds page first
        as this portion's process sees it (0: this one, 1: its parent, ...),
        and the end of the run of pages [first, end) that it holds too."""
        run_end = ffi.new("uint64_t *")
        depth = lib.up_portion_source_run(self._live(), first, end, run_end)
        if depth < 0:
            raise _os_error(ffi.errno, f"the source of pages {first}..{end}")
        return depth, run_end[0]

    def next_stored(self, first: int, end: int) -> int:
        """The first page of [first, end) whose bytes this portion's store may
        hold (an encrypted store: has a record for), or end. Cheap over holes."""
        return lib.up_portion_next_stored(self._live(), first, end)

    def close(self) -> None:
        lib.up_portion_release(self._c)


class FillRange:
    """The C fill state of one registered range: which portion chain its
    pages come from, which pages are resident in the client, and
    (synchronous tracking) which are dirty.

    close() frees the page sets and is idempotent; after it every method
    that acts on pages raises OSError(EBADF), while the geometry and
    counters stay readable."""

    _COUNTERS = ("faults", "write_faults", "wp_faults", "copies", "zero_fills", "duplicates",
                 "resident_pages", "dirty_pages", "resident_peak", "read_ahead_pages", "read_ahead_hits", "evictions",
                 "fetched")
    _RUNS = 1024
    _DEFERRED = 256

    def __init__(self, base: int, length: int, portion: PortionState,
                 tracking: Tracking = Tracking.NONE, *, read_ahead_pages: int = 0,
                 read_ahead_fixed: bool = False) -> None:
        """read_ahead_pages: the largest read-ahead window (0: none), fixed
        or adaptive (see native/readahead.c)."""
        self._npages = length // PAGE_SIZE
        self._c = ffi.gc(ffi.new("struct up_fill *"), lib.up_fill_release)
        self.portion = portion  # keeps its struct alive while we point at it
        if lib.up_fill_init(self._c, base, length, portion._live(), tracking) < 0:
            err = ffi.errno
            limit = " (a region is at most 2^47 bytes, 128 TiB)" if err == errno.EINVAL else ""
            raise _os_error(err, f"fill state of {length:#x} bytes at {base:#x}{limit}")
        self._c.ra_max = read_ahead_pages
        self._c.ra_fixed = int(read_ahead_fixed)
        self._window = ffi.new("struct up_ra *")
        self._deferred = ffi.new("struct up_msg[]", self._DEFERRED)
        self._n_deferred = ffi.new("int *")
        self._runs = ffi.new("struct up_run[]", self._RUNS)

    def _live(self) -> Any:
        """The struct, if it and its portion chain are live (else EBADF)."""
        if not self._c.live:
            raise _released(f"the fill state of {self._c.base:#x}+{self._c.len:#x}")
        self.portion._live()
        return self._c

    @property
    def base(self) -> int:
        return self._c.base

    @property
    def length(self) -> int:
        return self._c.len

    @property
    def read_ahead(self) -> tuple[int, bool]:
        """(the largest window in pages, fixed), as given."""
        return self._c.ra_max, bool(self._c.ra_fixed)

    def advise(self, address: int) -> tuple[int, int, int]:
        """Feeds read-ahead's detector with a missing fault at address (of a
        store the C path does not fill); the window to fetch: (first page
        index, count, step)."""
        if lib.up_fill_advise(self._live(), address, self._window) < 0:
            raise _os_error(ffi.errno, f"read-ahead advice for {address:#x}")
        w = self._window
        return w.first, w.count, w.step

    def fill_ahead(self, uffd: Uffd, first: int, count: int, step: int = 1) -> int:
        """Fills the pages of [first, first + count) (indices; by step) that
        are not resident, from portions with a descriptor, in runs; best
        effort. Returns the pages filled."""
        filled = lib.up_fill_ahead(uffd.fd, self._live(), first, count, step)
        if filled < 0:
            raise _os_error(ffi.errno, "read-ahead")
        return filled

    def take_victims(self, want: int) -> list[Run]:
        """Page-out: up to `want` resident pages from the clock hand on, not
        dirty (synchronous tracking), marked evicting (see native/fill.c)."""
        n = lib.up_fill_take_victims(self._live(), want, self._runs, self._RUNS)
        if n < 0:
            raise _os_error(ffi.errno, "choosing pages to drop")
        return [self._run(i) for i in range(n)]

    @property
    def resident_limit(self) -> int:
        return self._c.resident_limit

    @resident_limit.setter
    def resident_limit(self, pages: int) -> None:
        """Resident pages past which a missing fault waits (-EBUSY) for
        page-out; 0: never."""
        self._c.resident_limit = pages

    def end_eviction(self, address: int, length: int, *, dropped: bool) -> None:
        lib.up_fill_end_eviction(self._live(), address, length, int(dropped))

    def is_resident(self, address: int) -> bool:
        return bool(lib.up_fill_is_resident(self._live(), address))

    @property
    def defer_missing(self) -> bool:
        return bool(self._c.defer_missing)

    @defer_missing.setter
    def defer_missing(self, value: bool) -> None:
        self._c.defer_missing = int(value)

    def inherit_dirty(self, parent: "FillRange") -> None:
        """At fork: the pages the child inherits carry the parent's unflushed
        writes. (Not its resident set: faults the parent had pending at
        fork are read, and filled in the parent only, before the FORK event.)"""
        if lib.up_fill_inherit_dirty(self._live(), parent._live()) < 0:
            raise _os_error(ffi.errno, "inheriting the parent's dirty pages")

    @property
    def tracking(self) -> Tracking:
        return Tracking(self._c.tracking)

    def move(self, new_base: int) -> None:
        """Follows an mremap of the whole range (REMAP event)."""
        self._live().base = new_base

    def counters(self) -> dict[str, int]:
        return {name: getattr(self._c, name) for name in self._COUNTERS}

    @property
    def dirty_pages(self) -> int:
        """Synchronous tracking: the pages in the dirty set."""
        return self._c.dirty_pages

    @property
    def owner(self) -> int:
        """The pager's id of the region (native/remote.c hands pages back by it)."""
        return self._c.owner

    @owner.setter
    def owner(self, region_id: int) -> None:
        self._c.owner = region_id

    @property
    def timing(self) -> bool:
        """Whether served faults are timed into `latency()` (metrics.py)."""
        return bool(self._c.time_faults)

    @timing.setter
    def timing(self, on: bool) -> None:
        self._c.time_faults = int(on)

    def latency(self) -> tuple[list[int], int]:
        """(faults per bucket, their total ns) of the faults timed so far:
        bucket 0 under 1 us, bucket k [2^(k-1), 2^k) us, the last all slower.
        Readable after close()."""
        return list(self._c.latency_buckets), self._c.latency_ns_sum

    def time_fault(self, ns: int) -> None:
        """Counts a fault served outside `serve` (a fetched page) that took ns."""
        lib.up_fill_time_fault(self._c, ns)

    def serve(self, uffd: Uffd) -> tuple[int, list[Deferred]]:
        """Serves every pending fault it can; returns (served, what is left)."""
        served = lib.up_serve(uffd.fd, self._live(), self._deferred, self._DEFERRED, self._n_deferred)
        if served < 0:
            raise _error(ffi.errno, "read(userfaultfd)")
        return served, [
            Deferred(_decode(self._deferred[i]), self._deferred[i].status) for i in range(self._n_deferred[0])
        ]

    def fill_fault(self, uffd: Uffd, fault: PageFault) -> int:
        """Serves one fault (again, after EAGAIN); returns 0 or -errno
        (-EBADMSG: an encrypted page that fails authentication)."""
        return lib.up_fill_fault(uffd.fd, self._live(), fault.address, fault.flags)

    def place(self, uffd: Uffd, fault: PageFault, data: bytes | None) -> int:
        """Serves a missing-page fault with a page fetched elsewhere (None
        or short: the rest reads as zero); returns 0 or -errno."""
        data = data or b""
        return lib.up_fill_place(uffd.fd, self._live(), fault.address, fault.flags, data, len(data))

    def forget(self, start: int, end: int) -> None:
        """[start, end) was removed or unmapped: neither resident nor dirty now."""
        if lib.up_fill_forget(self._live(), start, end) < 0:
            raise _os_error(ffi.errno, f"forgetting pages {start:#x}..{end:#x}")

    def mark_dirty(self, runs: list[Run]) -> None:
        """Synchronous tracking: the pages of runs are dirty (written, not
        protected): the next take_dirty writes them back and protects them."""
        for run in runs:
            first = (run.addr - self.base) // PAGE_SIZE
            if lib.up_fill_mark_dirty(self._live(), first, run.length // PAGE_SIZE) < 0:
                raise _os_error(ffi.errno, f"marking pages {first}..{first + run.length // PAGE_SIZE} dirty")

    def is_dirty(self, address: int) -> bool:
        """Synchronous tracking: the page is in the dirty set."""
        return bool(lib.up_fill_is_dirty(self._live(), address))

    def take_dirty(self, uffd: Uffd) -> tuple[list[Run], int]:
        """Synchronous tracking: write-protects dirty pages again and returns
        them as runs (their dirty bits cleared), with 0 once every dirty page
        is taken, or the errno that stopped it (EAGAIN: an event is unread).
        The runs taken before an error are returned all the same."""
        c = self._live()
        cursor = ffi.new("uint64_t *")
        runs: list[Run] = []
        while (n := lib.up_collect_dirty(uffd.fd, c, self._runs, self._RUNS, cursor)) > 0:
            runs.extend(self._run(i) for i in range(n))
        if n < 0 or (cursor[0] < self._npages and c.dirty_pages):
            return runs, ffi.errno or errno.EIO
        return runs, 0

    def scan_written(self, pagemap_fd: int, spans: list[tuple[int, int]], *, protect: bool) -> list[Run]:
        """Asynchronous tracking: the pages in spans [(start, end), ...] written
        since they were last write-protected; with protect, write-protects
        them in the same walk."""
        c = self._live()
        runs: list[Run] = []
        for start, end in spans:
            cursor = ffi.new("uint64_t *", start)
            while cursor[0] < end:
                n = lib.up_scan_written(pagemap_fd, c, int(protect), self._runs, self._RUNS, cursor, end)
                if n < 0:
                    raise _error(ffi.errno, "PAGEMAP_SCAN")
                runs.extend(self._run(i) for i in range(n))
        return runs

    def scan_resident(self, pagemap_fd: int) -> int:
        """Marks resident the pages present in the owner's page tables (a
        region taken over); returns how many."""
        marked = lib.up_scan_resident(pagemap_fd, self._live())
        if marked < 0:
            raise _error(ffi.errno, "PAGEMAP_SCAN of present pages")
        return marked

    def _run(self, i: int) -> Run:
        run = self._runs[i]
        return Run(run.addr, run.store_offset, run.len)

    def close(self) -> None:
        lib.up_fill_release(self._c)


def copy_out(pid: int, runs: list[Run], buf: bytearray) -> memoryview:
    """Reads the runs' bytes out of process pid, back to back into buf
    (process_vm_readv); returns the filled part of buf."""
    total = sum(r.length for r in runs)
    if total > len(buf):
        raise ValueError(f"{total} bytes of runs do not fit a buffer of {len(buf)}")
    if lib.up_read_remote(pid, _c_runs(runs), len(runs), ffi.from_buffer(buf)) < 0:
        raise _os_error(ffi.errno, f"process_vm_readv of {len(runs)} runs from pid {pid}")
    return memoryview(buf)[:total]


def pwrite_runs(fd: int, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
    """Writes each run's bytes (back to back in data) at its store offset."""
    if lib.up_pwrite_runs(fd, _c_runs(runs), len(runs), ffi.from_buffer(data)) < 0:
        raise _os_error(ffi.errno, f"writing {len(runs)} page runs back")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing [offset, offset+length) of fd to disk without waiting
    (sync_file_range), so the disk works while the next batch is copied."""
    if lib.up_start_writeback(fd, offset, length) < 0:
        raise _os_error(ffi.errno, "sync_file_range")


_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62


def present_pages(pagemap_fd: int, base: int, pages: set[int]) -> set[int]:
    """The pages (indices from base) that are in memory in the process whose
    /proc/pid/pagemap is open: the only ones safe to copy out, since reading
    a missing page would itself raise a userfault."""
    present = set()
    for page in pages:
        entry = os.pread(pagemap_fd, 8, (base // PAGE_SIZE + page) * 8)
        if len(entry) == 8 and int.from_bytes(entry, "little") & (_PM_PRESENT | _PM_SWAPPED):
            present.add(page)
    return present


def unmap(address: int, length: int) -> None:
    """munmap(2) of a range the mmap module does not own."""
    if lib.up_munmap(address, length) < 0:
        raise _os_error(ffi.errno, f"munmap {address:#x}+{length:#x}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Makes [offset, offset+length) of fd read as zero, freeing its blocks."""
    if lib.up_punch_hole(fd, offset, length) < 0:
        raise _os_error(ffi.errno, f"fallocate(PUNCH_HOLE) at {offset}+{length}")


def is_userfaultfd(fd: int) -> bool:
    """Whether the descriptor (of this process) is a userfaultfd: the kernel
    names its anonymous inode so."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def filesystem_type(fd: int) -> int:
    """statfs(2) f_type of the filesystem the descriptor's file is on."""
    fs_type = lib.up_fs_type(fd)
    if fs_type < 0:
        raise _os_error(ffi.errno, f"fstatfs of descriptor {fd}")
    return fs_type


def _c_runs(runs: list[Run]):
    c_runs = ffi.new("struct up_run[]", len(runs))
    for c, run in zip(c_runs, runs):
        c.addr, c.store_offset, c.len = run.addr, run.store_offset, run.length
    return c_runs
