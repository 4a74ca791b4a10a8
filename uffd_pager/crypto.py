"""Keys and page encryption: AES-256-GCM.

A page is encrypted on its way to the store and decrypted on its way back,
in the pager. The store keeps the 4096 ciphertext bytes at the page's usual
place; the nonce, the tag and the page's version live in the catalog beside
the store, and the version each page was last committed at lives in the
store's anchor in the pager's state directory (`catalog.py`).

Under GCM a nonce used twice under one key leaks the XOR of two plaintexts
and lets the attacker forge tags, and the attacker of our threat model can
snapshot and restore the store and its catalog. So no nonce depends on
anything in those files: each store has its own subkey (HKDF-SHA256 of the
key and the store's random id), and every page write takes 96 random bits
as its nonce (getrandom in C). Random nonces stay safe to 2^32 writes per
subkey (NIST SP 800-38D), 16 TiB written to one store before that.

The associated data binds a ciphertext to its store (the random id), its
position in the store (which names the portion and the page) and its
version, so a store that flips bits, swaps pages between places or puts an
old ciphertext back (a replay) is caught; which versions may open a page
the anchor says.

The page loop runs in C on the system's libcrypto (native/aead.c), the
OpenSSL that `cryptography` also wraps; `cryptography`'s AESGCM checks it
once per process against a page it seals and a page it opens (`PageCipher`
refuses to work if they disagree), so the format is plain AES-256-GCM that
any implementation can open with the nonce, tag and associated data below.
"""
from __future__ import annotations

import concurrent.futures
import errno
import functools
import hashlib
import hmac
import os
import stat
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from uffd_pager.native import ffi, lib
from uffd_pager.uffd import PAGE_SIZE

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
RECORD_BYTES: int = lib.UP_RECORD_SIZE  # one page's line in the catalog: two slots
SLOT_BYTES = RECORD_BYTES // 2  # version, nonce, tag, padding
STORE_ID_BYTES = 16
_KEY_FILE_HEADER = "uffd-pager-key-v1 "


class PageAuthError(Exception):
    """A page's ciphertext does not authenticate: tampered, swapped, replayed."""


class Key:
    """A 256-bit key. Its bytes never appear in repr(), logs or errors;
    `key_id` (an HMAC of a fixed label) names it safely."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes, not {len(secret)}")
        self._secret = bytes(secret)
        self.key_id = hmac.new(self._secret, b"uffd-pager key id", hashlib.sha256).hexdigest()[:32]

    @classmethod
    def generate(cls) -> "Key":
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Key":
        """Reads a key file written by `uffd-pager keygen`: a regular file
        that only its owner may read. It is opened without blocking (a FIFO
        or a device put in its place is refused, not waited on) and checked
        on the descriptor, so what is checked is what is read."""
        name = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise OSError(exc.errno, f"key file {name}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"key file {name} is not a regular file "
                                            f"({_file_kind(st.st_mode)}): write one with `uffd-pager keygen`")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise PermissionError(errno.EACCES, f"key file {name} is readable by others: chmod 600 it")
            text = os.read(fd, 4096).decode("ascii", errors="replace").strip()
        finally:
            os.close(fd)
        if not text.startswith(_KEY_FILE_HEADER):
            raise ValueError(f"{name} is not a uffd-pager key file (make one with `uffd-pager keygen`)")
        try:
            return cls(bytes.fromhex(text[len(_KEY_FILE_HEADER):]))
        except ValueError:
            raise ValueError(f"{name}: damaged key file") from None

    def to_text(self) -> str:
        return f"{_KEY_FILE_HEADER}{self._secret.hex()}\n"

    def secret_bytes(self) -> bytes:
        """The key itself: for the sealed memfd that hands it to the pager only."""
        return self._secret

    def subkey(self, store_id: bytes) -> bytes:
        """The key of one store's pages: HKDF-SHA256 of the key, with the
        store's random id as its info. Two stores under one key never share
        an AES key, so their nonces cannot collide whatever is done to them."""
        if len(store_id) != STORE_ID_BYTES:
            raise ValueError(f"a store id is {STORE_ID_BYTES} bytes, not {len(store_id)}")
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                    info=b"uffd-pager page key v2\0" + store_id).derive(self._secret)

    def header_mac(self, fields: bytes) -> bytes:
        """A MAC of a catalog header under a key derived from this one: who
        has no key cannot rewrite a header (give a restored catalog a newer
        version) unnoticed."""
        mac_key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                       info=b"uffd-pager catalog header v2").derive(self._secret)
        return hmac.new(mac_key, fields, hashlib.sha256).digest()[:16]

    def page_cipher(self, store_id: bytes, anchor_fd: int = -1, catalog_fd: int = -1,
                    store_fd: int = -1) -> "PageCipher":
        return PageCipher(self.subkey(store_id), store_id, anchor_fd, catalog_fd, store_fd)

    def __repr__(self) -> str:
        return f"<Key id {self.key_id}>"


def associated_data(store_id: bytes, page: int, version: int) -> bytes:
    """What a ciphertext is bound to besides the key: its store, its page
    number in the store (the portion's offset plus the page's index in the
    portion), and its version."""
    return store_id + struct.pack("<QQ", page, version)


class PageCipher:
    """Seals and opens the pages of one store under its subkey. anchor_fd is
    the store's anchor (catalog.Anchor), which says which versions of a page
    may open it, catalog_fd its catalog, store_fd its file (-1: a remote
    store); the C fill path reads them too. They must stay open as long as
    this does."""

    def __init__(self, subkey: bytes, store_id: bytes, anchor_fd: int = -1, catalog_fd: int = -1,
                 store_fd: int = -1) -> None:
        _check_against_reference()
        # One context per thread that uses it at a time: the event loop's C
        # fill path (and the first half of a sealed batch, under the store's
        # seal lock), the second sealing thread, and Python's reads of pages
        # (copies between portions, from worker threads) under _read_lock.
        self.aead = _aead(subkey, anchor_fd, catalog_fd, store_fd)
        self._second = _aead(subkey)  # seals only
        self._reader = _aead(subkey, anchor_fd, catalog_fd, store_fd)
        self._read_lock = threading.Lock()
        self._store_id = store_id

    def seal(self, pages: list[int], version: int, plaintext: bytes | bytearray | memoryview,
             records: bytearray, slots: bytearray) -> bytearray | memoryview:
        """The ciphertext of len(pages) pages, all under version (each page
        with a random nonce); writes each page's version, nonce and tag into
        slot slots[i] of its record in records (RECORD_BYTES each). The
        ciphertext is exactly as long as the pages. Big batches are split
        over two threads."""
        n = len(pages)
        # A writable buffer (write-back's copy of the client's pages) is
        # sealed in place: AES-GCM allows it, and it saves a 4 MiB copy.
        writable = isinstance(plaintext, bytearray) or (isinstance(plaintext, memoryview) and not plaintext.readonly)
        ciphertext = plaintext if writable else bytearray(n * PAGE_SIZE)
        c_pages = ffi.new("uint64_t[]", pages)
        src, dst = ffi.from_buffer(plaintext), ffi.from_buffer(ciphertext)
        rec, slot = ffi.from_buffer(records), ffi.from_buffer(slots)

        def part(lo: int, hi: int, aead: object) -> int:
            return lib.up_aead_seal_pages(aead, self._store_id, c_pages + lo, version, src + lo * PAGE_SIZE,
                                          dst + lo * PAGE_SIZE, rec + lo * RECORD_BYTES, slot + lo, hi - lo)

        if n < _PARALLEL_PAGES:
            failed = part(0, n, self.aead) < 0
        else:
            other = _sealer().submit(part, n // 2, n, self._second)
            failed = (part(0, n // 2, self.aead) < 0) | (other.result() < 0)
        if failed:
            raise RuntimeError("libcrypto failed to seal pages")
        return ciphertext

    def read(self, page: int, offset: int) -> bytes:
        """Store page `page` (its ciphertext at offset in the store) as the
        fill path would read it: its plaintext, or zeros for a page never
        committed. Raises PageAuthError if no version the anchor allows
        opens it."""
        plaintext = bytearray(PAGE_SIZE)
        with self._read_lock:
            n = lib.up_aead_read_page(self._reader, self._store_id, page, offset, ffi.from_buffer(plaintext))
            err = ffi.errno
        return self._opened(n, err, page, plaintext)

    def open(self, page: int, sealed: bytes | None) -> bytes | None:
        """read() for a ciphertext fetched from a store elsewhere (None: the
        store holds none): the plaintext, or None for a page that reads as
        zero (never committed, or discarded)."""
        plaintext = bytearray(PAGE_SIZE)
        with self._read_lock:
            n = lib.up_aead_open_page(self._reader, sealed if sealed is not None else ffi.NULL, self._store_id, page,
                                      ffi.from_buffer(plaintext))
            err = ffi.errno
        return self._opened(n, err, page, plaintext) if n != 0 else None

    @staticmethod
    def _opened(n: int, err: int, page: int, plaintext: bytearray) -> bytes:
        if n < 0:
            if err == errno.EBADMSG:
                raise PageAuthError("the page does not authenticate")
            raise OSError(err, f"reading encrypted page {page}: {os.strerror(err)}")
        return bytes(plaintext)

    def opens(self, page: int, record: bytes | bytearray | memoryview, slot: int,
              ciphertext: bytes | bytearray) -> bool:
        """Whether one slot of the page's record opens this ciphertext."""
        out = bytearray(PAGE_SIZE)
        with self._read_lock:
            return lib.up_aead_open_slot(self._reader, self._store_id, page, ffi.from_buffer(record), slot,
                                         ciphertext, ffi.from_buffer(out)) == 0


# AES-GCM runs in C without the GIL: a big batch is sealed half here, half
# on this thread (a 16 MiB flush: 6.5 ms on one core, 3.5 ms on two).
_PARALLEL_PAGES = 256


@functools.cache
def _sealer() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="uffd-pager-seal")


def _aead(subkey: bytes, anchor_fd: int = -1, catalog_fd: int = -1, store_fd: int = -1) -> object:
    aead = lib.up_aead_new(subkey, anchor_fd, catalog_fd, store_fd)
    if aead == ffi.NULL:
        raise RuntimeError("libcrypto could not set up AES-256-GCM")
    return ffi.gc(aead, lib.up_aead_free)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


@functools.cache
def _check_against_reference() -> None:
    """A page sealed by the C path must open with `cryptography`'s AESGCM,
    a page AESGCM sealed must open in C, and a flipped bit must not."""
    subkey, store_id, page = os.urandom(KEY_BYTES), os.urandom(STORE_ID_BYTES), os.urandom(PAGE_SIZE)
    ciphertext, record, out = bytearray(PAGE_SIZE), bytearray(RECORD_BYTES), bytearray(PAGE_SIZE)
    aead = _aead(subkey)
    lib.up_aead_seal_pages(aead, store_id, ffi.new("uint64_t[]", [7]), 42, page, ffi.from_buffer(ciphertext),
                           ffi.from_buffer(record), bytes([1]), 1)
    version, nonce, tag = struct.unpack_from(f"<Q{NONCE_BYTES}s{TAG_BYTES}s", record, SLOT_BYTES)
    reference = AESGCM(subkey)
    ad = associated_data(store_id, 7, 42)
    try:
        ok = version == 42 and not any(record[:SLOT_BYTES]) and \
            reference.decrypt(nonce, bytes(ciphertext + tag), ad) == page
    except InvalidTag:
        ok = False
    ciphertext[0] ^= 1
    try:
        reference.decrypt(nonce, bytes(ciphertext + tag), ad)
        ok = False
    except InvalidTag:
        pass
    their_nonce = os.urandom(NONCE_BYTES)
    theirs = reference.encrypt(their_nonce, page, ad)
    their_record = struct.pack(f"<Q{NONCE_BYTES}s{TAG_BYTES}s", 42, their_nonce, theirs[PAGE_SIZE:])
    their_record += bytes(RECORD_BYTES - len(their_record))
    ok = ok and lib.up_aead_open_slot(aead, store_id, 7, their_record, 0, theirs[:PAGE_SIZE],
                                      ffi.from_buffer(out)) == 0 and bytes(out) == page
    ok = ok and lib.up_aead_open_slot(aead, store_id, 7, their_record, 0, bytes(ciphertext),
                                      ffi.from_buffer(out)) < 0
    if not ok:
        raise RuntimeError("the C AES-256-GCM path disagrees with cryptography's AESGCM; refusing to encrypt")
