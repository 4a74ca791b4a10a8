"""A wrapper that encrypts the pages of a file store (see crypto.py).

The inner store only ever sees ciphertext, at the page's usual place; each
page's record (version, nonce, tag) goes to the catalog beside it. Pages are
opened by the C fill path (native/fill.c) or, for copies between portions,
by read_page here. Writes and Python reads of pages hold one lock, so they
never pair a new record with old bytes or the reverse. A crash between a
flush's writes and its sync can leave a page whose record and bytes
disagree: that page then fails authentication (it is poisoned, never read
as wrong data).
"""
from __future__ import annotations

import threading
from typing import Any

from uffd_pager.catalog import Catalog, unpack_record
from uffd_pager.crypto import Key, PageAuthError
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
            self._catalog.forget(offset // PAGE_SIZE, length // PAGE_SIZE)

    def holds(self, offset: int) -> bool:
        with self._lock:
            return self._catalog.get(offset // PAGE_SIZE) is not None

    def sealing(self) -> tuple[Any, int, bytes]:
        return self._cipher.aead, self._catalog.fd, self._catalog.store_id

    def read_page(self, offset: int) -> bytes:
        page = offset // PAGE_SIZE
        with self._lock:
            record = self._catalog.get(page)
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
            self._catalog.write([(run.store_offset // PAGE_SIZE, run.length // PAGE_SIZE) for run in runs], records)

    def sync(self) -> None:
        self._inner.sync()
        self._catalog.sync()

    def close(self) -> None:
        self._catalog.close()
        self._inner.close()
