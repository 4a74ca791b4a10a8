"""The interface every backing store implements: a pseudo file addressed by
byte offsets.

A store knows nothing of clients, addresses, userfaultfds or cffi: it reads
and writes whole pages at store offsets, asynchronously and in batches,
so that one request can carry many pages to a remote engine. The pager
never blocks its event loop on a store: a store whose work blocks (a local
file) runs it in worker threads (`BlockingStore`), a remote one awaits its
network I/O.

A store may also offer a capability for the C fast paths: `local_fd`, a
descriptor whose bytes at a store offset are the page (`direct`), which
native/fill.c preads and native/portion.c copy_file_ranges; an encrypted
file store adds `sealing()` so that C opens its pages itself. Everything
else (a store with `local_fd` -1) is served by the pager's fetch path
(fetch.py), which fills the client with UFFDIO_COPY when a read returns.

An RDMA store fits the same interface: `read` posts one IBV_WR_RDMA_READ
per page (or per run of pages) into registered buffers that are then the
UFFDIO_COPY source, and `write` posts RDMA_WRITEs from buffers that
write-back copied out of the client; neither needs the remote CPU. `sync`
is a completion wait (plus a remote flush where the memory is persistent),
`discard` and `end` are metadata the pager keeps, as the Redis store keeps
its end.
"""
from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, TypeVar

from uffd_pager.errors import PagerError

T = TypeVar("T")

# (store offset, length): a run of whole pages, back to back in a buffer.
Extent = tuple[int, int]
# Called once, on the loop, with what `read` would have returned or raised.
ReadDone = Callable[[list["bytes | None | BadPage"] | BaseException], None]


class BadPage(PagerError):
    """A page the store returned that is not one (a value of the wrong
    length): it is never handed to a client as data."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"page at store offset {offset}: {reason}")
        self.offset = offset


class UnauthenticPage(BadPage):
    """A page of an encrypted store that fails authentication."""


class HandedBack(NamedTuple):
    """A fault's page the C path of a remote store (native/remote.c) did not
    place: rc -EOPNOTSUPP, fetch it through `read` (which retries, fails or
    reports it by the fetch path's rules); any other rc, what placing it
    returned. The store passes these on to the pager without reading them."""

    owner: int  # the pager's region id
    address: int
    flags: int
    rc: int


class Store(abc.ABC):
    """Pages of a region live in a store at byte offsets."""

    url: str
    key_id: str | None = None  # the id of the key an encrypted store is under
    # True when local_fd holds the pages as they are, so the C paths may
    # pread them and copy_file_range them between portions.
    direct: bool = False
    # How long a page that cannot be read now is retried before the access
    # that wants it fails (fetch.py); remote stores take it from their URL.
    fetch_deadline: float = 30.0

    @property
    def local_fd(self) -> int:
        """A descriptor the C fill path may read pages from (see `direct`
        and `sealing`), or -1: pages come through `read`."""
        return -1

    # The C fault path's requests for this store's pages (a `struct
    # up_remote *`, native/remote.c) once `serve_remotely` started them;
    # None: its pages come through `read`.
    remote: Any = None

    def serve_remotely(self, handed_back: Callable[[list[HandedBack]], None]) -> None:
        """Lets C ask for this store's pages itself where it can (Redis on one
        server), with `remote` set for the portions placed in it; what it
        hands back goes to handed_back. Nothing for a store that cannot."""

    def sealing(self) -> tuple[Any, bytes] | None:
        """For an encrypted file store: what the C fill path needs to open its
        pages itself (the AES-GCM context, which reads the catalog and the
        anchor too, and the store's id); None otherwise."""
        return None

    @property
    @abc.abstractmethod
    def identity(self) -> tuple[object, ...]:
        """Equal for two stores opened on the same data (portions in one
        store must not overlap, whichever region placed them)."""

    @property
    def state_key(self) -> tuple[object, ...]:
        """What the pager's state directory knows the store by (an encrypted
        store's catalog and anchor, a remote store's id): found again from
        its URL alone, without reaching it."""
        return self.identity

    @abc.abstractmethod
    def end(self) -> int:
        """The byte offset past the store's data, as far as this store
        knows: children's portions are placed past it."""

    @abc.abstractmethod
    async def read(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        """The pages at these store offsets: PAGE_SIZE bytes each, None for a
        page the store does not hold (it reads as zero), a BadPage for one
        it holds wrong (an UnauthenticPage: an encrypted store's page that
        fails authentication). Raises StoreUnavailable when the store cannot
        answer now, StoreLost when it lost what it held, or another OSError."""

    def read_soon(self, offsets: Sequence[int], done: ReadDone) -> bool:
        """Starts the same read as `read` now, in this turn of the loop,
        if the store can without waiting (a remote store whose connection
        is up), and calls done with its outcome when it is known; False if
        it cannot (nothing started: the caller awaits `read`). It lets a
        fault's request leave, and its page arrive, without a turn of the
        loop per coroutine in between."""
        return False

    @abc.abstractmethod
    async def write(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        """Writes each extent's bytes (back to back in data, in the order of
        extents) at its store offset. Raises on failure; what was written
        before is then unknown, and the caller keeps the pages dirty. A
        writable data buffer may be overwritten (an encrypted store seals
        in place): the caller must not read it afterwards."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Makes every write so far as durable as the store can (fsync
        semantics for a file; see each store for what it promises)."""

    @abc.abstractmethod
    async def discard(self, offset: int, length: int) -> None:
        """Makes a range read as zero (a portion slot being reused)."""

    # Portions of children are placed at multiples of this (bytes): a store
    # that copies whole blocks itself (copy_within) wants them aligned.
    alignment: int = 4096

    async def copy_within(self, source: int, destination: int, length: int) -> bool:
        """Copies length bytes from source to destination in this store on
        its own side (no bytes through the pager), if it can: False (nothing
        done) where it cannot. The destination reads as zero before (a new
        portion), and holes of the source stay holes."""
        return False

    def discard_locally(self, offset: int, length: int) -> bool:
        """discard() at once, for a store with a local descriptor, where it is
        cheap (a hole punched); False (nothing done) for any other store."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the store's resources; the store is unusable afterwards.
        Never blocks (a remote store finishes closing in the background)."""


async def run_blocking(work: Callable[..., T], *args: Any) -> T:
    """Runs blocking work in a worker thread of the running loop. A thread
    cannot be stopped: if the awaiting task is cancelled, it still waits
    for the thread to end before the cancellation goes on, so that nothing
    the thread uses (descriptors, native state) is released under it."""
    future = asyncio.get_running_loop().run_in_executor(None, work, *args)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class BlockingStore(Store):
    """A store whose operations block (a local file): subclasses implement
    them as plain methods, which the interface runs in worker threads."""

    @abc.abstractmethod
    def read_blocking(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        ...

    @abc.abstractmethod
    def write_blocking(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        ...

    @abc.abstractmethod
    def sync_blocking(self) -> None:
        ...

    @abc.abstractmethod
    def discard_blocking(self, offset: int, length: int) -> None:
        ...

    async def read(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        return await run_blocking(self.read_blocking, offsets)

    async def write(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        await run_blocking(self.write_blocking, extents, data)

    async def sync(self) -> None:
        await run_blocking(self.sync_blocking)

    async def discard(self, offset: int, length: int) -> None:
        await run_blocking(self.discard_blocking, offset, length)
