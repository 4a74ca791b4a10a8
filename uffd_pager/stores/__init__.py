"""Backing stores, opened from a URL.

A store is where the pages of a region live (see base.py for the
interface). The client opens a file store's file with its own rights
(`file.open_store_file`) and passes the descriptor; the pager makes the
store of it (`open_store(url, key, fd=)`), never opening a client's path
itself. A remote store (Redis) is reached by the pager; the client only
checks its URL (`check_url`). Both report a bad URL, a missing file, an
unreachable server or a permission problem before anything is registered.
"""
from __future__ import annotations

import errno
import os
from urllib.parse import urlsplit

from uffd_pager import catalog
from uffd_pager.catalog import ensure_state_dir, is_encrypted
from uffd_pager.crypto import Key
from uffd_pager.errors import ProtocolError
from uffd_pager.stores import redis as redis_store
from uffd_pager.stores.base import Store
from uffd_pager.stores.encrypted import EncryptedStore, records_path, remote_records_path
from uffd_pager.stores.file import FileStore

SCHEMES = ("file", *redis_store.SCHEMES)
_EXAMPLES = "file:///path/to/file, redis://HOST:PORT/NAME, redis+unix:///PATH?name=NAME, " \
            "redis+cluster://HOST:PORT,.../NAME"


def is_remote(url: str) -> bool:
    """Whether url names a store the pager reaches itself (no descriptor)."""
    return check_url(url) != "file"


def check_url(url: object) -> str:
    """The URL's scheme, or ValueError saying what a valid store URL is.
    Opens and connects to nothing."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"a store is a URL such as {_EXAMPLES}, not {url!r}")
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from uffd_pager.stores.file import file_path
        file_path(url)
    elif scheme in redis_store.SCHEMES:
        redis_store.parse_url(url)
    else:
        raise ValueError(f"unknown store scheme {scheme!r} in {url!r}; supported: "
                         f"{', '.join(s + '://' for s in SCHEMES)} (e.g. {_EXAMPLES})")
    return scheme


async def open_store(url: str, key: Key | None = None, *, fd: int | None = None, catalog_fd: int | None = None,
                     state_dir: str | os.PathLike[str] | None = None) -> Store:
    """Opens the store at url; with a key, wrapped so that it only ever
    sees ciphertext. A file store is made of fd, which the client opened
    with its own rights (and which the store then owns); the path is never
    opened here. catalog_fd is the same for an encrypted store's catalog.
    state_dir is the pager's state directory (None: the default,
    catalog.default_state_dir()). Without a key, a store known to be
    encrypted is refused: its pages would read as ciphertext, and a flush
    would overwrite them. Descriptors passed are closed on failure."""
    try:
        scheme = check_url(url)
        if (scheme == "file") != (fd is not None):
            raise ProtocolError(f"{url}: a file store comes with its descriptor, and only a file store")
    except BaseException:
        for each in (fd, catalog_fd):
            if each is not None:
                os.close(each)
        raise
    if scheme != "file":
        if catalog_fd is not None:
            os.close(catalog_fd)
        remote = await redis_store.RedisStore.open(url, ensure_state_dir(state_dir))
        return _sealed(remote, key, state_dir)
    assert fd is not None
    try:
        store = FileStore.from_fd(url, fd)
    except BaseException:
        if catalog_fd is not None:
            os.close(catalog_fd)
        raise
    if key is None and catalog_fd is not None:
        os.close(catalog_fd)
    return _sealed(store, key, state_dir, catalog_fd)


def _sealed(store: Store, key: Key | None, state_dir: str | os.PathLike[str] | None,
            catalog_fd: int | None = None) -> Store:
    """store, wrapped to encrypt with key; without a key, refused if it is
    known to be encrypted (its pages would read as ciphertext, and a flush
    would overwrite them)."""
    try:
        if key is None:
            if (why := is_encrypted(records_path(store, state_dir), state_dir)) is not None:
                raise PermissionError(errno.EACCES, f"store {store.url} is encrypted ({why}): map it with its key "
                                                    "(key_file= or key=)")
            return store
        return EncryptedStore(store, key, state_dir, catalog_fd=catalog_fd)
    except BaseException:
        store.close()
        raise


def forget_store(url: str, state_dir: str | os.PathLike[str] | None = None) -> None:
    """Forgets what the pager's state directory remembers of a store, the
    only way to start one over on purpose: an encrypted file's catalog and
    anchor (what it held can no longer be read), or the id of a remote
    pseudo file (after its server lost it; the next map starts it afresh)."""
    if check_url(url) == "file":
        from uffd_pager.stores.file import file_path
        catalog.forget_store(file_path(url), state_dir)
    else:
        redis_store.forget(url, ensure_state_dir(state_dir))
        identity = redis_store.parse_url(url).identity
        catalog.forget_store(remote_records_path(identity, state_dir), state_dir)


__all__ = ["Store", "FileStore", "EncryptedStore", "open_store", "check_url", "is_remote", "forget_store", "SCHEMES"]
