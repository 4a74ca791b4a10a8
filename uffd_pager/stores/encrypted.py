"""A wrapper that encrypts every page of any store (see crypto.py).

The inner store only ever sees ciphertext, at the page's usual place; the
per-page nonce, tag and version go to the catalog once the ciphertext is
durable (after the inner store's sync). Reads and writes of pages hold one
lock, so a reader never pairs new metadata with old bytes or the reverse.
"""
from __future__ import annotations

import threading

from uffd_pager.catalog import Catalog, unpack_record
from uffd_pager.crypto import RECORD_BYTES, Key, PageAuthError
from uffd_pager.stores.base import Store
from uffd_pager.stores.file import FileStore
from uffd_pager.uffd import PAGE_SIZE, Run


class EncryptedStore(Store):
    direct = False

    def __init__(self, inner: FileStore, key: Key) -> None:  # the catalog goes beside its file
        self._inner = inner
        self._catalog = Catalog.beside(inner.path, key)
        self._cipher = key.page_cipher(self._catalog.store_id)
        self._lock = threading.Lock()
        self._seal_lock = threading.Lock()  # write-back threads of several regions share the store
        self._pending: dict[int, bytes] = {}  # catalog records of pages written, not yet durable
        self.url = inner.url
        self.key_id = key.key_id

    @classmethod
    def open(cls, url: str) -> "EncryptedStore":
        raise TypeError("an encrypted store is opened with open_store(url, key)")

    @property
    def fill_fd(self) -> int:
        return self._inner.fill_fd

    @property
    def identity(self) -> tuple[object, ...]:
        return self._inner.identity

    @property
    def catalog_path(self) -> str:
        return self._catalog.path

    def end(self) -> int:
        return self._inner.end()

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._inner.discard(offset, length)
            first, count = offset // PAGE_SIZE, length // PAGE_SIZE
            for page in [p for p in self._pending if first <= p < first + count]:
                del self._pending[page]
            self._catalog.forget(first, count)

    def holds(self, offset: int) -> bool:
        with self._lock:
            return self._record(offset // PAGE_SIZE) is not None

    def _record(self, page: int) -> bytes | None:
        return self._pending.get(page) or self._catalog.get(page)

    def read_page(self, offset: int) -> bytes:
        page = offset // PAGE_SIZE
        with self._lock:
            record = self._record(page)
            if record is None:
                return bytes(PAGE_SIZE)  # never written through this key: a hole
            ciphertext = self._inner.read_page(offset)
        version, nonce, tag = unpack_record(record)
        try:
            return self._cipher.open(page, version, nonce, tag, ciphertext)
        except PageAuthError:
            raise PageAuthError(f"{self.url}: page at offset {offset} fails authentication "
                                "(altered, swapped or replayed)") from None

    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        pages = [run.store_offset // PAGE_SIZE + k for run in runs for k in range(run.length // PAGE_SIZE)]
        first = self._catalog.take_nonces(len(pages))
        with self._seal_lock:
            ciphertext, records = self._cipher.seal(pages, first, data)
        with self._lock:
            self._inner.write_runs(runs, ciphertext)
            self._pending.update(zip(pages, (records[i:i + RECORD_BYTES]
                                             for i in range(0, len(records), RECORD_BYTES))))

    def sync(self) -> None:
        with self._lock:
            written = dict(self._pending)
        self._inner.sync()
        self._catalog.commit(written)
        with self._lock:
            for page, meta in written.items():
                if self._pending.get(page) == meta:
                    del self._pending[page]

    def close(self) -> None:
        self._catalog.close()
        self._inner.close()
