"""A wrapper that encrypts the pages of any store (see crypto.py).

The inner store only ever sees ciphertext, at the page's usual place; each
page's record (two slots of version, nonce, tag) goes to the catalog, and
the version each page was last committed at to the store's anchor in the
pager's state directory (catalog.py says why each lives where it does). A
file store's catalog is beside its file; a remote store's is in the pager's
state directory, out of the untrusted appliance's reach, so that a server
that flips, swaps, replays or rolls back values is caught: the page fails
authentication and its access gets SIGBUS, never data.

Pages of a file store are opened by the C fill path (native/fill.c, through
native/aead.c); those of a remote store, and every copy between portions,
by `read` here, which runs the same C.

A write takes a version from the anchor, chooses for each page the record
slot that does not hold its current bytes, seals the pages into that slot,
writes the records and only then the ciphertext, so a write that fails or
dies part-way leaves each page readable as its old or its new version. When
a batch overwrites pages that hold data, the records are made durable before
the ciphertext, so a power failure cannot reorder them either. sync() makes
the store and the catalog durable, then commits the versions written since
in the anchor: from then on only the new version opens each page. A page
that a failed write left in doubt (both slots may hold its bytes) is opened
before its next write to learn which slot to keep.

Writes, discards and their records are serialized per store by an asyncio
lock (a page's record and bytes change together under it); the catalog's
and the anchor's file I/O and the sealing run in worker threads.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from uffd_pager.catalog import HOLE, Anchor, Catalog, Span, ensure_state_dir, open_records
from uffd_pager.crypto import RECORD_BYTES, Key, PageAuthError
from uffd_pager.native import ffi, lib
from uffd_pager.stores.base import BadPage, Extent, ReadDone, Store, UnauthenticPage, run_blocking
from uffd_pager.uffd import PAGE_SIZE

# A page or two (a fault) costs microseconds of AES: opened on the loop, at
# once; a batch (a copy) in a worker thread.
_OPEN_AT_ONCE = 4
_AMBIGUOUS = 2  # up_record_choose_slots: both slots may hold the page's bytes


def records_path(store: Store, state_dir: str | os.PathLike[str] | None) -> str:
    """The path the catalog and anchor of store are named after: a file
    store's own path (its catalog goes beside it), or for a remote store a
    name in the state directory, found by the store's identity."""
    path = getattr(store, "path", None)
    if store.local_fd >= 0 and isinstance(path, str):
        return path
    return remote_records_path(store.state_key, state_dir)


def remote_records_path(state_key: tuple[object, ...], state_dir: str | os.PathLike[str] | None) -> str:
    name = hashlib.sha256(repr(state_key).encode()).hexdigest()[:40]
    directory = os.path.join(ensure_state_dir(state_dir), "catalogs")
    os.makedirs(directory, 0o700, exist_ok=True)
    return os.path.join(directory, name)


class EncryptedStore(Store):
    def __init__(self, inner: Store, key: Key, state_dir: str | os.PathLike[str] | None = None, *,
                 catalog_fd: int | None = None) -> None:
        """The catalog goes beside a file store's file (catalog_fd: a
        descriptor of it the client opened, which the store then owns) or
        into state_dir for a remote store, the anchor into state_dir (None:
        catalog.default_state_dir())."""
        self._inner = inner
        self._catalog: Catalog
        self._anchor: Anchor
        self._catalog, self._anchor = open_records(records_path(inner, state_dir), key, state_dir,
                                                   catalog_fd=catalog_fd)
        self._cipher = key.page_cipher(self._catalog.store_id, self._anchor.fd, self._catalog.fd, inner.local_fd)
        self._lock = asyncio.Lock()  # a page's record and bytes change together, under it
        self._written: list[tuple[int, int, int]] = []  # (first page, count, version) not yet committed
        self.url = inner.url
        self.key_id = key.key_id
        self.fetch_deadline = inner.fetch_deadline
        self._closed = False

    @property
    def local_fd(self) -> int:
        return self._inner.local_fd

    @property
    def identity(self) -> tuple[object, ...]:
        return self._inner.identity

    @property
    def state_key(self) -> tuple[object, ...]:
        return self._inner.state_key

    @property
    def catalog_path(self) -> str:
        return self._catalog.path

    @property
    def anchor_path(self) -> str:
        return self._anchor.path

    def end(self) -> int:
        return self._inner.end()

    def sealing(self) -> tuple[Any, bytes]:
        return self._cipher.aead, self._catalog.store_id

    async def discard(self, offset: int, length: int) -> None:
        first, count = offset // PAGE_SIZE, length // PAGE_SIZE
        if not count:
            return
        async with self._lock:
            await self._inner.discard(offset, length)
            await run_blocking(self._forget, first, count)
            self._drop_uncommitted(first, count)

    def discard_locally(self, offset: int, length: int) -> bool:
        # Only for a slot being reused: no write of it can be under way.
        if not self._inner.discard_locally(offset, length):
            return False
        self._forget(offset // PAGE_SIZE, length // PAGE_SIZE)
        self._drop_uncommitted(offset // PAGE_SIZE, length // PAGE_SIZE)
        return True

    def _forget(self, first: int, count: int) -> None:
        self._catalog.forget(first, count)
        self._anchor.discard(first, count)

    def _drop_uncommitted(self, first: int, count: int) -> None:
        """Versions written in a discarded range and not committed yet are
        gone with it: a later sync must not commit them. (On the loop.)"""
        end = first + count
        kept: list[tuple[int, int, int]] = []
        for start, n, version in self._written:
            if start < first:
                kept.append((start, min(n, first - start), version))
            if start + n > end:
                kept.append((max(start, end), start + n - max(start, end), version))
        self._written = kept

    async def read(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        if self._inner.local_fd >= 0:
            return await run_blocking(self._read_local, offsets)
        sealed = await self._inner.read(offsets)
        if len(offsets) <= _OPEN_AT_ONCE:
            return self._open_fetched(offsets, sealed)
        return await run_blocking(self._open_fetched, offsets, sealed)

    def read_soon(self, offsets: Sequence[int], done: ReadDone) -> bool:
        if self._inner.local_fd >= 0 or len(offsets) > _OPEN_AT_ONCE:
            return False

        def fetched(outcome: list[bytes | None | BadPage] | BaseException) -> None:
            if isinstance(outcome, BaseException):
                done(outcome)
                return
            try:
                opened = self._open_fetched(offsets, outcome)
            except Exception as exc:
                done(exc)
                return
            done(opened)

        return self._inner.read_soon(offsets, fetched)

    def _read_local(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        out: list[bytes | None | BadPage] = []
        for offset in offsets:
            try:
                out.append(self._cipher.read(offset // PAGE_SIZE, offset))
            except PageAuthError:
                out.append(self._unauthentic(offset))
        return out

    def _open_fetched(self, offsets: Sequence[int], sealed: Sequence[bytes | None | BadPage]) -> \
            list[bytes | None | BadPage]:
        out: list[bytes | None | BadPage] = []
        for offset, value in zip(offsets, sealed):
            if isinstance(value, BadPage):
                out.append(value)
                continue
            try:
                out.append(self._cipher.open(offset // PAGE_SIZE, value))
            except PageAuthError:
                out.append(self._unauthentic(offset))
        return out

    def _unauthentic(self, offset: int) -> UnauthenticPage:
        return UnauthenticPage(offset, f"{self.url}: it fails authentication (altered, swapped, replayed or "
                                       "rolled back)")

    async def write(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        if not extents:
            return
        spans: list[Span] = [(offset // PAGE_SIZE, length // PAGE_SIZE) for offset, length in extents]
        pages = [first + k for first, count in spans for k in range(count)]
        async with self._lock:
            version, records, slots, keeps = await run_blocking(self._choose_slots, spans, len(pages))
            if _AMBIGUOUS in slots:
                await self._settle(pages, records, slots)
            ciphertext = await run_blocking(self._cipher.seal, pages, version, data, records, slots)
            await run_blocking(self._record, spans, records, keeps or _AMBIGUOUS in slots)
            await self._inner.write(extents, ciphertext)
            self._written += [(first, count, version) for first, count in spans]

    def _choose_slots(self, spans: list[Span], n: int) -> tuple[int, bytearray, bytearray, int]:
        version = self._anchor.take_version()
        records = self._catalog.records(spans)
        slots = bytearray(n)
        keeps = ffi.new("int *")
        lib.up_record_choose_slots(ffi.from_buffer(records), ffi.from_buffer(self._anchor.entries(spans)), n,
                                   ffi.from_buffer(slots), keeps)
        return version, records, slots, keeps[0]

    async def _settle(self, pages: list[int], records: bytearray, slots: bytearray) -> None:
        """For pages a failed write left in doubt: the slot to write is the
        one that does not open the bytes in the store now."""
        doubtful = [i for i, slot in enumerate(slots) if slot == _AMBIGUOUS]
        current = await self._inner.read([pages[i] * PAGE_SIZE for i in doubtful])
        for i, value in zip(doubtful, current):
            record = memoryview(records)[i * RECORD_BYTES:(i + 1) * RECORD_BYTES]
            opens0 = isinstance(value, bytes) and self._cipher.opens(pages[i], record, 0, value)
            slots[i] = 1 if opens0 else 0

    def _record(self, spans: list[Span], records: bytearray, durable: bool) -> None:
        self._catalog.write(spans, records)
        if durable:
            self._catalog.sync()  # the old versions' records outlive their bytes, power failure or not

    async def sync(self) -> None:
        written, self._written = self._written, []
        try:
            await self._inner.sync()
            await run_blocking(self._commit, written)
        except BaseException:
            self._written[:0] = written
            raise

    def _commit(self, written: list[tuple[int, int, int]]) -> None:
        if written:
            self._catalog.note_generation(max(version for _f, _c, version in written))
        self._catalog.sync()
        self._anchor.commit(written)

    def holds(self, offset: int) -> bool:
        """Whether the records say the store holds a page at offset (tests)."""
        page = offset // PAGE_SIZE
        record = self._catalog.records([(page, 1)])
        entry = self._anchor.entry(page)
        return any(record) or (entry != 0 and not entry & HOLE)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._anchor.close()
        self._catalog.close()
        self._inner.close()
