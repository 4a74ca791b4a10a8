"""A wrapper that encrypts the pages of a file store (see crypto.py).

The inner store only ever sees ciphertext, at the page's usual place; each
page's record (two slots of version, nonce, tag) goes to the catalog beside
it, and the version each page was last committed at to the store's anchor
in the pager's state directory (catalog.py says why each lives where it
does). Pages are opened by the C fill path (native/fill.c, through
native/aead.c) or, for copies between portions, by read_page here, which
runs the same C.

A write (write_runs) takes a version from the anchor, chooses for each page
the record slot that does not hold its current bytes, seals the pages into
that slot, writes the records and only then the ciphertext, so a write that
fails or dies part-way leaves each page readable as its old or its new
version. When a batch overwrites pages that hold data, the records are made
durable before the ciphertext, so a power failure cannot reorder them
either. sync() makes the store and the catalog durable, then commits the
versions written since in the anchor: from then on only the new version
opens each page. A page that a failed write left in doubt (both slots may
hold its bytes) is opened before its next write to learn which slot to keep.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from uffd_pager.catalog import HOLE, Anchor, Catalog, Span, open_records
from uffd_pager.crypto import RECORD_BYTES, Key, PageAuthError
from uffd_pager.native import ffi, lib
from uffd_pager.stores.base import BadPage, BlockingStore, Extent
from uffd_pager.stores.file import FileStore
from uffd_pager.uffd import PAGE_SIZE, Run

_AMBIGUOUS = 2  # up_record_choose_slots: both slots may hold the page's bytes


class EncryptedStore(BlockingStore):

    def __init__(self, inner: FileStore, key: Key, state_dir: str | os.PathLike[str] | None = None, *,
                 catalog_fd: int | None = None) -> None:
        """The catalog goes beside inner's file (catalog_fd: a descriptor of
        it the client opened, which the store then owns), the anchor into
        state_dir (None: catalog.default_state_dir())."""
        self._inner = inner
        self._catalog: Catalog
        self._anchor: Anchor
        self._catalog, self._anchor = open_records(inner.path, key, state_dir, catalog_fd=catalog_fd)
        self._cipher = key.page_cipher(self._catalog.store_id, self._anchor.fd)
        self._lock = threading.Lock()  # a page's record and bytes change together, under it
        self._seal_lock = threading.Lock()  # write-back threads of several regions share the store
        self._written: list[tuple[int, int, int]] = []  # (first page, count, version) not yet committed
        self._written_lock = threading.Lock()
        self.url = inner.url
        self.key_id = key.key_id

    @property
    def local_fd(self) -> int:
        return self._inner.local_fd

    @property
    def identity(self) -> tuple[object, ...]:
        return self._inner.identity

    @property
    def catalog_path(self) -> str:
        return self._catalog.path

    @property
    def anchor_path(self) -> str:
        return self._anchor.path

    def end(self) -> int:
        return self._inner.end()

    def discard_blocking(self, offset: int, length: int) -> None:
        first, count = offset // PAGE_SIZE, length // PAGE_SIZE
        with self._lock:
            self._inner.discard_blocking(offset, length)
            self._catalog.forget(first, count)
            self._anchor.discard(first, count)

    def holds(self, offset: int) -> bool:
        page = offset // PAGE_SIZE
        with self._lock:
            record = self._catalog.records([(page, 1)])
            entry = self._anchor.entry(page)
        return any(record) or (entry != 0 and not entry & HOLE)

    def sealing(self) -> tuple[Any, int, bytes]:
        return self._cipher.aead, self._catalog.fd, self._catalog.store_id

    def read_page(self, offset: int) -> bytes:
        with self._lock:
            try:
                return self._cipher.read(self._catalog.fd, self._inner.local_fd, offset // PAGE_SIZE, offset)
            except PageAuthError:
                raise PageAuthError(f"{self.url}: page at offset {offset} fails authentication "
                                    "(altered, swapped, replayed or rolled back)") from None

    def read_blocking(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        return [self.read_page(offset) for offset in offsets]

    def write_blocking(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        self.write_runs([Run(0, offset, length) for offset, length in extents], data)

    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        spans: list[Span] = [(run.store_offset // PAGE_SIZE, run.length // PAGE_SIZE) for run in runs]
        pages = [first + k for first, count in spans for k in range(count)]
        n = len(pages)
        version = self._anchor.take_version()
        with self._lock:
            records = self._catalog.records(spans)
            slots = bytearray(n)
            keeps = ffi.new("int *")
            if lib.up_record_choose_slots(ffi.from_buffer(records), ffi.from_buffer(self._anchor.entries(spans)), n,
                                          ffi.from_buffer(slots), keeps) > 0:
                self._settle(pages, records, slots)
        with self._seal_lock:
            ciphertext = self._cipher.seal(pages, version, data, records, slots)
        with self._lock:
            self._catalog.write(spans, records)
            if keeps[0] or _AMBIGUOUS in slots:
                self._catalog.sync()  # the old versions' records outlive their bytes, power failure or not
            self._inner.write_runs(runs, ciphertext)
        with self._written_lock:
            self._written += [(first, count, version) for first, count in spans]

    def _settle(self, pages: list[int], records: bytearray, slots: bytearray) -> None:
        """For pages a failed write left in doubt: the slot to write is the
        one that does not open the bytes in the store now."""
        for i, page in enumerate(pages):
            if slots[i] == _AMBIGUOUS:
                record = memoryview(records)[i * RECORD_BYTES:(i + 1) * RECORD_BYTES]
                slots[i] = 0 if not self._cipher.opens(page, record, 0, self._inner.read_page(page * PAGE_SIZE)) else 1

    def sync_blocking(self) -> None:
        with self._written_lock:
            written, self._written = self._written, []
        try:
            self._inner.sync_blocking()
            if written:
                self._catalog.note_generation(max(version for _f, _c, version in written))
            self._catalog.sync()
            self._anchor.commit(written)
        except BaseException:
            with self._written_lock:
                self._written[:0] = written
            raise

    def close(self) -> None:
        self._anchor.close()
        self._catalog.close()
        self._inner.close()
