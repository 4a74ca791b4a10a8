"""Backing stores, opened from a URL.

A store is where the pages of a region live. The client opens a file
store's file with its own rights (`file.open_store_file`) and passes the
descriptor; the pager makes the store of it (`open_store(url, key, fd=)`),
never opening a client's path itself. Both report a bad URL, a missing
file or a permission problem before anything is registered.
"""
from __future__ import annotations

import errno
import os
from urllib.parse import urlsplit

from uffd_pager.catalog import is_encrypted
from uffd_pager.crypto import Key
from uffd_pager.stores.base import Store
from uffd_pager.stores.encrypted import EncryptedStore
from uffd_pager.stores.file import FileStore

SCHEMES: dict[str, type[Store]] = {"file": FileStore}


def open_store(url: str, key: Key | None = None, *, fd: int | None = None, catalog_fd: int | None = None,
               state_dir: str | os.PathLike[str] | None = None) -> Store:
    """Opens the store at url; with a key, wrapped so that it only ever
    sees ciphertext. With fd, a file store is made of that descriptor,
    which the client opened with its own rights (and which the store then
    owns), and the path is never opened here; catalog_fd is the same for
    an encrypted store's catalog. state_dir is the pager's state directory,
    where each encrypted store's anchor lives (None: the default,
    catalog.default_state_dir()). Without a key, a store known to be
    encrypted is refused: its pages would read as ciphertext, and a flush
    would overwrite them."""
    try:
        store = _open_plain(url) if fd is None else FileStore.from_fd(url, fd)
    except BaseException:
        if catalog_fd is not None:
            os.close(catalog_fd)
        raise
    try:
        if key is None:
            if catalog_fd is not None:
                os.close(catalog_fd)
            if isinstance(store, FileStore) and (why := is_encrypted(store.path, state_dir)) is not None:
                raise PermissionError(errno.EACCES, f"store {store.path} is encrypted ({why}): map it with its key "
                                                    "(key_file= or key=)")
            return store
        if not isinstance(store, FileStore):
            if catalog_fd is not None:
                os.close(catalog_fd)
            raise ValueError(f"{url}: encryption needs a file store (its catalog goes beside the file)")
        return EncryptedStore(store, key, state_dir, catalog_fd=catalog_fd)
    except BaseException:
        store.close()
        raise


def _open_plain(url: str) -> Store:
    if not isinstance(url, str) or not url:
        raise ValueError(f"a store is a URL such as file:///path/to/file, not {url!r}")
    scheme = urlsplit(url).scheme
    try:
        store_type = SCHEMES[scheme]
    except KeyError:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unknown store scheme {scheme!r} in {url!r}; supported: {supported}") from None
    return store_type.open(url)


__all__ = ["Store", "FileStore", "EncryptedStore", "open_store", "SCHEMES"]
