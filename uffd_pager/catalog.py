"""The durable catalog of an encrypted store: per-page nonce, tag and
version, the store's id, the key it belongs to, and the nonce counter.

One SQLite file beside the store (``<store>.uffd-catalog``, mode 0600),
written by the pager only. It never holds the key, only the key's id (an
HMAC), which is how a wrong key is refused when a region is mapped. Its
per-page rows are what make a rolled-back store detectable: the store can
put back old bytes, but not the tag the catalog holds for the page now.

Nonces come from a counter: the catalog reserves a block of them (durably)
before any is used, so a pager that crashes or restarts skips the rest of a
block rather than reuse a nonce.
"""
from __future__ import annotations

import errno
import os
import sqlite3
import threading

from uffd_pager.crypto import Key, nonce_of

NONCE_BLOCK = 1 << 16
SUFFIX = ".uffd-catalog"

PageMeta = tuple[int, bytes, bytes]  # (version, nonce, tag)


class Catalog:
    def __init__(self, path: str, key: Key) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA synchronous=FULL")
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS pages (page INTEGER PRIMARY KEY, version INTEGER NOT NULL,"
                                 " nonce BLOB NOT NULL, tag BLOB NOT NULL)")
                meta = dict(self._db.execute("SELECT name, value FROM meta"))
                if "key_id" not in meta:
                    meta = {"key_id": key.key_id, "store_id": os.urandom(16).hex(), "nonce_next": 0}
                    self._db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            if meta["key_id"] != key.key_id:
                raise PermissionError(errno.EACCES, f"wrong key for {path[:-len(SUFFIX)]}: it is encrypted under "
                                                    f"key id {meta['key_id']}, this key's id is {key.key_id}")
        except BaseException:
            self._db.close()
            raise
        self.store_id = bytes.fromhex(meta["store_id"])
        self._nonce_next = self._nonce_end = int(meta["nonce_next"])
        self._pages: dict[int, PageMeta] = {
            page: (version, nonce, tag) for page, version, nonce, tag in self._db.execute("SELECT * FROM pages")}

    @classmethod
    def beside(cls, store_path: str, key: Key) -> "Catalog":
        return cls(store_path + SUFFIX, key)

    def get(self, page: int) -> PageMeta | None:
        with self._lock:
            return self._pages.get(page)

    def next_nonce(self) -> bytes:
        with self._lock:
            if self._nonce_next == self._nonce_end:
                end = self._nonce_end + NONCE_BLOCK
                with self._db:
                    self._db.execute("UPDATE meta SET value = ? WHERE name = 'nonce_next'", (end,))
                self._nonce_end = end
            nonce = nonce_of(self._nonce_next)
            self._nonce_next += 1
            return nonce

    def commit(self, entries: dict[int, PageMeta]) -> None:
        """Records pages whose ciphertext is durably in the store."""
        if not entries:
            return
        with self._lock:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?)",
                                     [(page, *meta) for page, meta in entries.items()])
            self._pages.update(entries)

    def forget(self, first: int, count: int) -> None:
        """Drops the pages of a discarded range (a portion slot being reused)."""
        with self._lock:
            with self._db:
                self._db.execute("DELETE FROM pages WHERE page >= ? AND page < ?", (first, first + count))
            for page in [p for p in self._pages if first <= p < first + count]:
                del self._pages[page]

    def close(self) -> None:
        self._db.close()
