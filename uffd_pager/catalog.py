"""The records of an encrypted store, and the anchor that keeps them honest.

Two files per encrypted store, in two places the threat model trusts
differently. The attacker can read, write, snapshot and restore the store
and its catalog, but not the key and not the pager's state directory.

* The **catalog**, beside the store (``<store>.uffd-catalog``, mode 0600): a
  4 KiB header (magic, the key's id, the store's random id, the highest
  version written, a MAC of those under the key, a checksum of it all), then
  one 80-byte record per page of the store at ``4096 + page * 80`` (a sparse
  file: pages never written have no record). A record has two slots, each
  a version, a nonce and a tag: a write goes to the slot that does not hold
  the page's current bytes, so a flush that fails or dies half-way leaves
  every page readable as its old or its new version. The catalog is as
  exposed as the store, so nothing in it is trusted on its own: it only
  ever opens a page together with the anchor.
* The **anchor**, in the state directory (``<state>/anchors/<hash of the
  store's path>.anchor``, see default_state_dir): the key's id, the store's
  id, the next version to hand out, the highest version committed, how far
  the committed pages reach, then one 8-byte entry per page: the version
  the page was last committed at (bit 63: discarded, it reads as zero).
  Only a slot whose version is at least the entry opens a page, so an old
  ciphertext put back with its old record is refused; versions are handed
  out from the anchor, so they grow whatever is done to the catalog; a
  store and catalog restored together are refused at map() (the catalog's
  highest version is below the anchor's committed one, and only the key
  can give it a newer one); a missing or truncated catalog of a store the
  anchor knows is an error, never zeros; and a store the anchor knows is
  refused without its key.

A flush (EncryptedStore.write_runs, then sync) writes each batch's records
first (made durable before any old ciphertext is overwritten), then the
ciphertext, and at sync makes store and catalog durable and then commits the
batch's versions in the anchor (one fdatasync per file per flush, plus one
of the catalog per batch that overwrites pages). Until the commit a page
reads as its old or its new version; after it, as the new one only.

Why not SQLite: writing the records of a 16 MiB flush (4096 rows) took
15 ms in one SQLite transaction here, about as long as the flush itself;
as records it is one pwrite per run of pages.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import struct
import tempfile
import threading

from uffd_pager.crypto import NONCE_BYTES, RECORD_BYTES, SLOT_BYTES, STORE_ID_BYTES, TAG_BYTES, Key
from uffd_pager.uffd import punch_hole

SUFFIX = ".uffd-catalog"
STATE_DIR_ENV = "UFFD_PAGER_STATE_DIR"
HEADER_BYTES = 4096  # catalog and anchor: a header, then one entry per page of the store

MAGIC = b"UFFDCAT2"
OLD_MAGICS = (b"UFFDCAT1",)
# magic, key id, store id, highest version written, a MAC of those under the
# key (Key.header_mac), a checksum of all of it (damage, told from a wrong key)
HEADER = struct.Struct("<8s16s16sQ16s16s")
SLOT = struct.Struct(f"<Q{NONCE_BYTES}s{TAG_BYTES}s4x")  # version (0: empty), nonce, tag
assert SLOT.size == SLOT_BYTES and RECORD_BYTES == 2 * SLOT_BYTES  # native/aead.c writes them

ANCHOR_MAGIC = b"UFFDANC1"
# magic, key id, store id, next version, versions reserved up to, highest
# version committed, pages committed reach up to, length of the store's path
ANCHOR_HEADER = struct.Struct("<8s16s16sQQQQH")
ENTRY = struct.Struct("<Q")
HOLE = 1 << 63  # an anchor entry's flag: the page was discarded and reads as zero
# Versions are handed out from memory shared through the page cache and
# made durable a block at a time; a pager that opens the store skips to the
# end of the block, so a power failure never hands out a version twice.
VERSION_BLOCK = 1 << 20

Span = tuple[int, int]  # (first page of the store, count)
PageMeta = tuple[int, bytes, bytes]  # (version, nonce, tag)


# --- the state directory ------------------------------------------------------------


def default_state_dir() -> str:
    """The pager's own state directory, created mode 0700 if missing:
    $UFFD_PAGER_STATE_DIR if set; /var/lib/uffd-pager for root; else
    $XDG_STATE_HOME/uffd-pager, or ~/.local/state/uffd-pager."""
    return ensure_state_dir(_default_state_path())


def _default_state_path() -> str:
    if os.environ.get(STATE_DIR_ENV):
        return os.environ[STATE_DIR_ENV]
    if os.geteuid() == 0:
        return "/var/lib/uffd-pager"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "uffd-pager")


def ensure_state_dir(path: str | os.PathLike[str] | None) -> str:
    """Creates the state directory (mode 0700) if needed, and refuses one
    that others could write: its anchors are what an attacker of the store
    must not be able to roll back."""
    path = _default_state_path() if path is None else os.fspath(path)
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise OSError(exc.errno, f"state directory {path}: {exc.strerror} (set it with --state-dir or "
                                 f"{STATE_DIR_ENV})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"state directory {path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(errno.EACCES, f"state directory {path} may be written by others: it must belong to "
                                            f"uid {os.geteuid()} with mode 0700 (chown and chmod 700 it)")
    return path


def anchor_path(state_dir: str, store_path: str) -> str:
    """Where the anchor of the store at store_path lives. Anchors are found
    by the store's path, not by anything in the store or its catalog, so
    that deleting or replacing those cannot make the pager forget them."""
    name = hashlib.sha256(os.fsencode(os.path.realpath(store_path))).hexdigest()[:40]
    return os.path.join(state_dir, "anchors", name + ".anchor")


def is_encrypted(store_path: str, state_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Why the store at store_path is known to be encrypted (its anchor in
    the state directory, or a catalog beside it), or None."""
    state = _default_state_path() if state_dir is None else os.fspath(state_dir)
    if os.path.lexists(anchor_path(state, store_path)):
        return f"the state directory {state} holds its anchor"
    try:
        st = os.lstat(store_path + SUFFIX)
    except FileNotFoundError:
        return None
    # An empty catalog holds nothing to protect (a map that failed after
    # the client created it); anything else beside the store is one.
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return None
    return f"its catalog {store_path + SUFFIX} is beside it"


def forget_store(store_path: str, state_dir: str | os.PathLike[str] | None = None) -> None:
    """Deletes an encrypted store's catalog and anchor: what it held can no
    longer be read, and the file may be used anew (plain, or under a new
    store id). The only way to start an encrypted store over on purpose."""
    state = ensure_state_dir(state_dir)
    for path in (store_path + SUFFIX, anchor_path(state, store_path)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- the catalog, beside the store ---------------------------------------------------


def _checksum(fields: bytes) -> bytes:
    return hashlib.sha256(b"uffd-pager catalog header\0" + fields).digest()[:16]


class Catalog:
    """The catalog file of one store (see the module's docstring)."""

    def __init__(self, fd: int, path: str, key_id: bytes, store_id: bytes, generation: int, mac: bytes) -> None:
        self.fd = fd
        self.path = path
        self.key_id = key_id
        self.store_id = store_id
        self.generation = generation
        self._mac = mac
        self._key: Key | None = None
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, fd: int, path: str, store: str) -> "Catalog":
        """The header as it is: refused if damaged (not yet checked against
        a key: see verify)."""
        header = os.pread(fd, HEADER.size, 0)
        if header[:8] in OLD_MAGICS:
            raise OSError(errno.EPROTO, f"catalog {path} of {store} is of an older format, whose nonces could repeat: "
                                        "this version cannot open it (decrypt the store with the version that "
                                        "wrote it)")
        if len(header) < HEADER.size:
            raise OSError(errno.EBADMSG, f"catalog {path} of {store} is truncated: its header is incomplete")
        magic, key_id, store_id, generation, mac, checksum = HEADER.unpack(header)
        if magic != MAGIC:
            raise OSError(errno.EBADMSG, f"catalog {path} of {store} is damaged: it is not a uffd-pager catalog")
        if checksum != _checksum(header[:-16]):
            raise OSError(errno.EBADMSG, f"catalog {path} of {store} is damaged: its header fails its checksum "
                                         "(its key id, store id or version changed)")
        return cls(fd, path, key_id, store_id, generation, mac)

    def verify(self, key: Key, store: str) -> None:
        """Checks the header's MAC under the key (whose id must be the
        header's): a header rewritten by someone without the key, such as a
        restored catalog given a newer version, is refused."""
        if key.header_mac(self._fields(self.generation)) != self._mac:
            raise OSError(errno.EBADMSG, f"catalog {self.path} of {store} was altered: its header's MAC does not "
                                         "verify under the store's key")
        self._key = key

    def _fields(self, generation: int) -> bytes:
        return HEADER.pack(MAGIC, self.key_id, self.store_id, generation, bytes(16), bytes(16))[:-32]

    @staticmethod
    def create(fd: int, key: Key, store_id: bytes, generation: int) -> None:
        catalog = Catalog(fd, "", bytes.fromhex(key.key_id), store_id, generation, b"")
        catalog._key = key
        catalog._write_header(generation)
        os.fdatasync(fd)

    def _write_header(self, generation: int) -> None:
        assert self._key is not None, "verify() the catalog before writing it"
        fields = self._fields(generation)
        fields += self._key.header_mac(fields)
        os.pwrite(self.fd, fields + _checksum(fields), 0)
        self.generation = generation

    def records(self, spans: list[Span]) -> bytearray:
        """The records of each (first page, count) span in turn; zeros where
        there is none."""
        return _read_spans(self.fd, spans, RECORD_BYTES)

    def write(self, spans: list[Span], records: bytes | bytearray) -> None:
        at = 0
        for first, count in spans:
            os.pwrite(self.fd, memoryview(records)[at:at + count * RECORD_BYTES], HEADER_BYTES + first * RECORD_BYTES)
            at += count * RECORD_BYTES

    def note_generation(self, version: int) -> None:
        """Raises the header's highest version written to version (under the
        file lock: other pagers may write the store too)."""
        with self._lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                current = Catalog.parse(self.fd, self.path, self.path[:-len(SUFFIX)]).generation
                if version > current:
                    self._write_header(version)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def forget(self, first: int, count: int) -> None:
        punch_hole(self.fd, HEADER_BYTES + first * RECORD_BYTES, count * RECORD_BYTES)

    def close(self) -> None:
        os.close(self.fd)


# --- the anchor, in the state directory ----------------------------------------------


class Anchor:
    """The anchor of one store (see the module's docstring)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        # flock(2) locks belong to an open file, so threads of one pager need
        # their own lock (and closing another descriptor of the file drops none).
        self._lock = threading.Lock()
        fields = self._read_header()
        self.key_id, self.store_id = fields[1], fields[2]

    @classmethod
    def open(cls, path: str) -> "Anchor | None":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: str, store_path: str, key_id: bytes, store_id: bytes, *, committed: int = 0,
               entries: dict[int, int] | None = None) -> "Anchor":
        """Writes a new anchor whole (a temporary file renamed into place, so
        that no reader sees half of one), with entries {page: version}."""
        directory = os.path.dirname(path)
        os.makedirs(directory, 0o700, exist_ok=True)
        entries = entries or {}
        highest = max([committed, *entries.values()])
        page_end = max(entries, default=-1) + 1
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".new-")
        try:
            name = os.fsencode(os.path.realpath(store_path))[:HEADER_BYTES - ANCHOR_HEADER.size]
            os.pwrite(fd, ANCHOR_HEADER.pack(ANCHOR_MAGIC, key_id, store_id, highest + 1, highest + 1, committed,
                                             page_end, len(name)) + name, 0)
            for page, version in entries.items():
                os.pwrite(fd, ENTRY.pack(version), HEADER_BYTES + page * ENTRY.size)
            os.fdatasync(fd)
            os.rename(temporary, path)
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        _sync_directory(directory)
        return cls(fd, path)

    def _read_header(self) -> list:
        data = os.pread(self.fd, ANCHOR_HEADER.size, 0)
        if len(data) < ANCHOR_HEADER.size or data[:8] != ANCHOR_MAGIC:
            raise OSError(errno.EBADMSG, f"anchor {self.path} in the state directory is damaged")
        return list(ANCHOR_HEADER.unpack(data))

    def _write_header(self, fields: list) -> None:
        os.pwrite(self.fd, ANCHOR_HEADER.pack(*fields), 0)

    def _update(self, change) -> object:
        """change(fields) under the anchor's locks; returns its result."""
        with self._lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                fields = self._read_header()
                result = change(fields)
                self._write_header(fields)
                return result
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    @property
    def committed(self) -> int:
        return self._read_header()[5]

    @property
    def page_end(self) -> int:
        """One past the highest page committed: the catalog reaches this far."""
        return self._read_header()[6]

    def start(self) -> None:
        """Skips the versions other pagers may have handed out but not made
        durable (see VERSION_BLOCK)."""
        def skip(fields: list) -> None:
            fields[3] = fields[4]
            fields[4] = fields[3] + VERSION_BLOCK
        self._update(skip)
        os.fdatasync(self.fd)

    def take_version(self) -> int:
        """A version no page of the store was ever written at: greater than
        every one handed out before, by any pager of this state directory."""
        durable = False

        def take(fields: list) -> int:
            nonlocal durable
            version = fields[3]
            fields[3] += 1
            if fields[3] > fields[4]:
                fields[4] = fields[3] + VERSION_BLOCK
                durable = True
            return version
        version = self._update(take)
        if durable:
            os.fdatasync(self.fd)
        return version  # type: ignore[return-value]

    def entries(self, spans: list[Span]) -> bytearray:
        return _read_spans(self.fd, spans, ENTRY.size)

    def entry(self, page: int) -> int:
        return ENTRY.unpack(self.entries([(page, 1)]))[0]

    def commit(self, written: list[tuple[int, int, int]]) -> None:
        """Records (first page, count, version) spans whose records and
        ciphertext are durable as the pages' versions now, durably: older
        versions no longer open them."""
        if not written:
            return

        def record(fields: list) -> None:
            _write_spans(self.fd, [(first, count, ENTRY.pack(version)) for first, count, version in written],
                         ENTRY.size)
            fields[5] = max(fields[5], *(version for _f, _c, version in written))
            fields[6] = max(fields[6], *(first + count for first, count, _v in written))
        self._update(record)
        os.fdatasync(self.fd)

    def discard(self, first: int, count: int) -> None:
        """The pages read as zero from now on: no version written before
        opens them (their entry is a hole above every version handed out)."""
        def hole(fields: list) -> None:
            _write_spans(self.fd, [(first, count, ENTRY.pack(HOLE | fields[3]))], ENTRY.size)
        self._update(hole)

    def close(self) -> None:
        os.close(self.fd)


def _dense(spans: list[Span]) -> tuple[int, int] | None:
    """The range [first, end) the spans cover, if they fill enough of it
    that one read of it all is cheaper than one per span."""
    first, end = min(f for f, _c in spans), max(f + c for f, c in spans)
    return (first, end) if len(spans) > 1 and end - first <= 2 * sum(c for _f, c in spans) + 64 else None


def _read_spans(fd: int, spans: list[Span], stride: int) -> bytearray:
    """The entries (stride bytes per page, after the header) of each span in
    turn; zeros past the end of the file."""
    whole = _dense(spans)
    if whole is None:
        out = bytearray()
        for first, count in spans:
            data = os.pread(fd, count * stride, HEADER_BYTES + first * stride)
            out += data + bytes(count * stride - len(data))
        return out
    start, end = whole
    data = os.pread(fd, (end - start) * stride, HEADER_BYTES + start * stride)
    view = memoryview(data + bytes((end - start) * stride - len(data)))
    return bytearray().join(view[(first - start) * stride:(first - start + count) * stride] for first, count in spans)


def _write_spans(fd: int, spans: list[tuple[int, int, bytes]], stride: int) -> None:
    """Sets each (first, count, entry) span's entries to entry, with one
    write over the spans' range when they are dense in it (the entries
    between are written back as they were: callers hold the file's lock)."""
    whole = _dense([(first, count) for first, count, _e in spans])
    if whole is None:
        for first, count, entry in spans:
            os.pwrite(fd, entry * count, HEADER_BYTES + first * stride)
        return
    start, end = whole
    data = bytearray(_read_spans(fd, [(start, end - start)], stride))
    for first, count, entry in spans:
        data[(first - start) * stride:(first - start + count) * stride] = entry * count
    os.pwrite(fd, data, HEADER_BYTES + start * stride)


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- opening both ------------------------------------------------------------------------


def open_records(store_path: str, key: Key, state_dir: str | os.PathLike[str] | None = None, *,
                 catalog_fd: int | None = None) -> tuple[Catalog, Anchor]:
    """The catalog and anchor of the store at store_path, checked against
    each other and the key; both are made for a store that has neither.
    With catalog_fd (which it then owns), the catalog is that descriptor,
    opened (and created, mode 0600) by the client with its own rights, and
    its path is never opened here. Raises PermissionError for the wrong key
    or a rolled-back store, FileNotFoundError for a catalog the anchor
    misses, OSError(EBADMSG) for a damaged, emptied or truncated one, and
    changes no file before the key is known to be the store's."""
    cpath = store_path + SUFFIX
    with contextlib.ExitStack() as undo:
        if catalog_fd is not None:
            undo.callback(os.close, catalog_fd)
        state = ensure_state_dir(state_dir)
        apath = anchor_path(state, store_path)
        if (anchor := Anchor.open(apath)) is not None:
            undo.callback(anchor.close)
            _check_key(anchor.key_id, key, store_path, f"the state directory {state}")
        if catalog_fd is None:
            fd = _open_catalog(cpath, store_path, anchor)
            undo.callback(os.close, fd)
        else:
            fd = _check_catalog_fd(catalog_fd, cpath)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another pager may be creating them too
        try:
            if anchor is None and (anchor := Anchor.open(apath)) is not None:
                undo.callback(anchor.close)
                _check_key(anchor.key_id, key, store_path, f"the state directory {state}")
            if os.fstat(fd).st_size == 0:
                if anchor is not None and (anchor.page_end or anchor.committed):
                    raise OSError(errno.EBADMSG, f"catalog {cpath} of {store_path} is empty, but the state directory "
                                                 f"{state} knows pages written to the store: it was truncated or "
                                                 "replaced. Restore it from a backup")
                Catalog.create(fd, key, anchor.store_id if anchor is not None else os.urandom(STORE_ID_BYTES),
                               anchor.committed if anchor is not None else 0)
            catalog = Catalog.parse(fd, cpath, store_path)
            if anchor is None:
                _check_key(catalog.key_id, key, store_path, f"its catalog {cpath}")
                catalog.verify(key, store_path)
                anchor = _adopt(apath, store_path, catalog)
                undo.callback(anchor.close)
            else:
                _check_against_anchor(catalog, anchor, key, store_path, state, os.fstat(fd).st_size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        anchor.start()
        undo.pop_all()
    return catalog, anchor


def _check_catalog_fd(fd: int, cpath: str) -> int:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, f"catalog {cpath} is not a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise OSError(errno.EBADF, f"catalog {cpath}: its descriptor must be open for reading and writing")
    return fd


def open_catalog_file(store_path: str) -> int:
    """Opens (creating, mode 0600) the catalog of the store at store_path
    with the caller's own rights: the client does, and passes the
    descriptor (open_store's catalog_fd), so that a daemon never creates a
    file where its client may not."""
    cpath = store_path + SUFFIX
    try:
        fd = os.open(cpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"catalog {cpath} of {store_path} is a symbolic link: refused") from None
        raise OSError(exc.errno, f"catalog {cpath} of {store_path}: {exc.strerror} (an encrypted store's catalog "
                                 "goes beside it: its directory must be writable)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"catalog {cpath} of {store_path} is not a regular file")
    return fd


def _open_catalog(cpath: str, store_path: str, anchor: Anchor | None) -> int:
    # O_NOFOLLOW: whoever can write beside the store must not be able to
    # point the pager's writes elsewhere with a symbolic link.
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(cpath, flags if anchor is not None else flags | os.O_CREAT, 0o600)
    except FileNotFoundError:
        assert anchor is not None
        if anchor.page_end or anchor.committed:
            raise FileNotFoundError(errno.ENOENT, f"catalog {cpath} of encrypted store {store_path} is missing, but "
                                                  f"the state directory knows pages written to the store: without "
                                                  "it they cannot be read. Restore it from a backup (or delete "
                                                  "the store's data on purpose with uffd-pager forget)") from None
        fd = os.open(cpath, flags | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"catalog {cpath} of {store_path} is a symbolic link: refused") from None
        raise OSError(exc.errno, f"catalog {cpath} of {store_path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"catalog {cpath} of {store_path} is not a regular file")
    return fd


def _check_key(known_id: bytes, key: Key, store_path: str, where: str) -> None:
    if known_id != bytes.fromhex(key.key_id):
        raise PermissionError(errno.EACCES, f"wrong key for {store_path}: {where} says it is encrypted under key id "
                                            f"{known_id.hex()}, this key's id is {key.key_id}")


def _check_against_anchor(catalog: Catalog, anchor: Anchor, key: Key, store_path: str, state: str,
                          size: int) -> None:
    if catalog.store_id != anchor.store_id:
        raise OSError(errno.EBADMSG, f"catalog {catalog.path} belongs to another store (id {catalog.store_id.hex()}; "
                                     f"the state directory {state} knows {store_path} as {anchor.store_id.hex()}): "
                                     "it was replaced")
    if catalog.key_id != anchor.key_id:
        raise OSError(errno.EBADMSG, f"catalog {catalog.path} of {store_path} names key id {catalog.key_id.hex()}, "
                                     f"but the store is under key id {anchor.key_id.hex()}: its header was altered")
    catalog.verify(key, store_path)
    committed = anchor.committed
    if catalog.generation < committed:
        raise PermissionError(errno.EACCES, f"encrypted store {store_path} was rolled back: its catalog's latest "
                                            f"version is {catalog.generation}, but version {committed} was "
                                            f"committed (the state directory {state} says so). The store and its "
                                            "catalog were restored from an older copy; refusing to serve old data")
    reach = HEADER_BYTES + anchor.page_end * RECORD_BYTES
    if anchor.page_end and size < reach:
        raise OSError(errno.EBADMSG, f"catalog {catalog.path} of {store_path} is truncated: {size} bytes, but the "
                                     f"pages committed need {reach}. Restore it from a backup")


def _adopt(apath: str, store_path: str, catalog: Catalog) -> Anchor:
    """The anchor of a store whose catalog this state directory has not
    seen (new, or made under another state directory): it trusts the
    catalog as it is now. Each page's entry is the older of its versions,
    so that a flush interrupted elsewhere still reads as old or new."""
    entries: dict[int, int] = {}
    size = os.fstat(catalog.fd).st_size
    chunk = 1 << 20
    for start in range(HEADER_BYTES, size, chunk * RECORD_BYTES):
        data = os.pread(catalog.fd, chunk * RECORD_BYTES, start)
        first = (start - HEADER_BYTES) // RECORD_BYTES
        for i in range(len(data) // RECORD_BYTES):
            versions = [v for v in (_slot_version(data, i, 0), _slot_version(data, i, 1)) if v]
            if versions:
                entries[first + i] = min(versions)
    return Anchor.create(apath, store_path, catalog.key_id, catalog.store_id, committed=catalog.generation,
                         entries=entries)


def _slot_version(data: bytes, record: int, slot: int) -> int:
    return ENTRY.unpack_from(data, record * RECORD_BYTES + slot * SLOT_BYTES)[0]


# --- inspection ------------------------------------------------------------------------


def read_slots(path: str) -> dict[int, tuple[PageMeta, PageMeta]]:
    """Both slots of every page record of a catalog file (for inspection
    and tests): {page: ((version, nonce, tag), (version, nonce, tag))}."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    body = data[HEADER_BYTES:]
    body = body[: len(body) // RECORD_BYTES * RECORD_BYTES]
    out = {}
    for page in range(len(body) // RECORD_BYTES):
        slots = (SLOT.unpack_from(body, page * RECORD_BYTES), SLOT.unpack_from(body, page * RECORD_BYTES + SLOT.size))
        if slots[0][0] or slots[1][0]:
            out[page] = slots
    return out


def read_records(path: str) -> dict[int, PageMeta]:
    """The newest slot of every page record of a catalog file: {page:
    (version, nonce, tag)} (for inspection and tests)."""
    return {page: max(slots) for page, slots in read_slots(path).items()}
