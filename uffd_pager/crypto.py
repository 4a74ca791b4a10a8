"""Keys and page encryption: AES-256-GCM.

A page is encrypted on its way to the store and decrypted on its way back,
in the pager. The store keeps the 4096 ciphertext bytes at the page's usual
place; the nonce, the tag and the page's version live in the pager's
catalog (`catalog.py`), outside the ciphertext area. The associated data
binds a ciphertext to its store (a random id kept in the catalog), its
position in the store (which names the portion and the page) and its
version, so a store that flips bits, swaps pages between places or puts an
old ciphertext back (a replay) is caught: the tag in the catalog no longer
matches. Nonces come from a counter the catalog reserves durably in blocks,
so no nonce is used twice under one key, across restarts too.

The page loop runs in C on the system's libcrypto (native/aead.c), the
OpenSSL that `cryptography` also wraps; `cryptography`'s AESGCM checks it
once per process against a page it seals (`PageCipher` refuses to work if
they disagree), so the format is plain AES-256-GCM that any implementation
can open with the nonce, tag and associated data below.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import hmac
import os
import stat
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from uffd_pager.native import ffi, lib
from uffd_pager.uffd import PAGE_SIZE

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
RECORD_BYTES: int = lib.UP_RECORD_SIZE  # version, nonce, tag: one page's line in the catalog
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
        """Reads a key file written by `uffd-pager keygen`."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"key file {os.fspath(path)}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise PermissionError(f"key file {os.fspath(path)} is readable by others: chmod 600 it")
            text = os.read(fd, 4096).decode("ascii", errors="replace").strip()
        finally:
            os.close(fd)
        if not text.startswith(_KEY_FILE_HEADER):
            raise ValueError(f"{os.fspath(path)} is not a uffd-pager key file (make one with `uffd-pager keygen`)")
        try:
            return cls(bytes.fromhex(text[len(_KEY_FILE_HEADER):]))
        except ValueError:
            raise ValueError(f"{os.fspath(path)}: damaged key file") from None

    def to_text(self) -> str:
        return f"{_KEY_FILE_HEADER}{self._secret.hex()}\n"

    def to_wire(self) -> str:
        """For the local control socket only."""
        return self._secret.hex()

    @classmethod
    def from_wire(cls, text: object) -> "Key":
        if not isinstance(text, str):
            raise ValueError("the key must be sent as hex text")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError("the key sent is not 64 hex digits") from None

    def page_cipher(self, store_id: bytes) -> "PageCipher":
        return PageCipher(self._secret, store_id)

    def __repr__(self) -> str:
        return f"<Key id {self.key_id}>"


def associated_data(store_id: bytes, page: int, version: int) -> bytes:
    """What a ciphertext is bound to besides the key: its store, its page
    number in the store (the portion's offset plus the page's index in the
    portion), and its version."""
    return store_id + struct.pack("<QQ", page, version)


def nonce_of(counter: int) -> bytes:
    return counter.to_bytes(NONCE_BYTES, "big")


class PageCipher:
    """Seals and opens pages of one store under one key."""

    def __init__(self, secret: bytes, store_id: bytes) -> None:
        _check_against_reference()
        self.aead, self._second = _aead(secret), _aead(secret)  # one context per sealing thread
        self._store_id = store_id

    def seal(self, pages: list[int], first_nonce: int,
             plaintext: bytes | bytearray | memoryview) -> tuple[bytearray | memoryview, bytes]:
        """(ciphertext, records) of len(pages) pages, page i under counter
        first_nonce + i (its nonce and its version): the ciphertext is
        exactly as long as the pages, and records holds each page's catalog
        record (RECORD_BYTES each). Big batches are split over two threads."""
        n = len(pages)
        # A writable buffer (write-back's copy of the client's pages) is
        # sealed in place: AES-GCM allows it, and it saves a 4 MiB copy.
        writable = isinstance(plaintext, bytearray) or (isinstance(plaintext, memoryview) and not plaintext.readonly)
        ciphertext = plaintext if writable else bytearray(n * PAGE_SIZE)
        records = bytearray(n * RECORD_BYTES)
        c_pages = ffi.new("uint64_t[]", pages)
        src, dst, rec = ffi.from_buffer(plaintext), ffi.from_buffer(ciphertext), ffi.from_buffer(records)

        def part(lo: int, hi: int, aead: object) -> int:
            return lib.up_aead_seal_pages(aead, self._store_id, c_pages + lo, first_nonce + lo,
                                          src + lo * PAGE_SIZE, dst + lo * PAGE_SIZE, rec + lo * RECORD_BYTES,
                                          hi - lo)

        if n < _PARALLEL_PAGES:
            failed = part(0, n, self.aead) < 0
        else:
            other = _sealer().submit(part, n // 2, n, self._second)
            failed = (part(0, n // 2, self.aead) < 0) | (other.result() < 0)
        if failed:
            raise RuntimeError("libcrypto failed to seal pages")
        return ciphertext, bytes(records)

    def open(self, page: int, version: int, nonce: bytes, tag: bytes, ciphertext: bytes) -> bytes:
        plaintext = bytearray(PAGE_SIZE)
        if lib.up_aead_open_page(self.aead, self._store_id, page, version, nonce, tag, ciphertext,
                                 ffi.from_buffer(plaintext)) < 0:
            raise PageAuthError("the page does not authenticate")
        return bytes(plaintext)


# AES-GCM runs in C without the GIL: a big batch is sealed half here, half
# on this thread (a 16 MiB flush: 6.5 ms on one core, 3.5 ms on two).
_PARALLEL_PAGES = 256


@functools.cache
def _sealer() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="uffd-pager-seal")


def _aead(secret: bytes) -> object:
    aead = lib.up_aead_new(secret)
    if aead == ffi.NULL:
        raise RuntimeError("libcrypto could not set up AES-256-GCM")
    return ffi.gc(aead, lib.up_aead_free)


@functools.cache
def _check_against_reference() -> None:
    """A page sealed by the C path must open with `cryptography`'s AESGCM,
    and a flipped bit must not."""
    secret, store_id, page = os.urandom(KEY_BYTES), os.urandom(16), os.urandom(PAGE_SIZE)
    ciphertext, record = bytearray(PAGE_SIZE), bytearray(RECORD_BYTES)
    lib.up_aead_seal_pages(_aead(secret), store_id, ffi.new("uint64_t[]", [7]), 42, page,
                           ffi.from_buffer(ciphertext), ffi.from_buffer(record), 1)
    tag = record[8 + NONCE_BYTES: 8 + NONCE_BYTES + TAG_BYTES]
    reference = AESGCM(secret)
    ad = associated_data(store_id, 7, 42)
    try:
        ok = reference.decrypt(nonce_of(42), bytes(ciphertext + tag), ad) == page
    except InvalidTag:
        ok = False
    ciphertext[0] ^= 1
    try:
        reference.decrypt(nonce_of(42), bytes(ciphertext + tag), ad)
        ok = False
    except InvalidTag:
        pass
    if not ok:
        raise RuntimeError("the C AES-256-GCM path disagrees with cryptography's AESGCM; refusing to encrypt")
