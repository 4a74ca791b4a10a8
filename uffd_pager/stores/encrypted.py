"""A wrapper that encrypts every page of any store (see crypto.py).

The inner store only ever sees ciphertext, at the page's usual place; the
per-page nonce, tag and version go to the catalog once the ciphertext is
durable (after the inner store's sync). Reads and writes of pages hold one
lock, so a reader never pairs new metadata with old bytes or the reverse.
"""
from __future__ import annotations

import threading

from uffd_pager.catalog import Catalog, PageMeta
from uffd_pager.crypto import Key, PageAuthError, associated_data, decrypt_page, encrypt_page
from uffd_pager.stores.base import Store
from uffd_pager.uffd import PAGE_SIZE, Run


class EncryptedStore(Store):
    direct = False

    def __init__(self, inner: Store, key: Key) -> None:
        path = getattr(inner, "path", None)
        if path is None:
            raise ValueError(f"{inner.url}: encryption needs a store with a place for its catalog")
        self._inner = inner
        self._catalog = Catalog.beside(path, key)
        self._cipher = key.cipher()
        self._lock = threading.Lock()
        self._pending: dict[int, PageMeta] = {}  # written, not yet durable
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
            return self._meta(offset // PAGE_SIZE) is not None

    def _meta(self, page: int) -> PageMeta | None:
        return self._pending.get(page) or self._catalog.get(page)

    def read_page(self, offset: int) -> bytes:
        page = offset // PAGE_SIZE
        with self._lock:
            meta = self._meta(page)
            if meta is None:
                return bytes(PAGE_SIZE)  # never written through this key: a hole
            ciphertext = self._inner.read_page(offset)
        version, nonce, tag = meta
        try:
            return decrypt_page(self._cipher, nonce, ciphertext, tag,
                                associated_data(self._catalog.store_id, page, version))
        except PageAuthError:
            raise PageAuthError(f"{self.url}: page at offset {offset} fails authentication "
                                "(altered, swapped or replayed)") from None

    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        at = 0
        for run in runs:
            sealed = bytearray()
            metas: dict[int, PageMeta] = {}
            for k in range(run.length // PAGE_SIZE):
                page = run.store_offset // PAGE_SIZE + k
                with self._lock:
                    old = self._meta(page)
                version = (old[0] if old else 0) + 1
                nonce = self._catalog.next_nonce()
                ciphertext, tag = encrypt_page(self._cipher, nonce, view[at:at + PAGE_SIZE],
                                               associated_data(self._catalog.store_id, page, version))
                sealed += ciphertext
                metas[page] = (version, nonce, tag)
                at += PAGE_SIZE
            with self._lock:
                self._inner.write_runs([run], sealed)
                self._pending.update(metas)

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
