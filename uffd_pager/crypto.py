"""Keys and page encryption: AES-256-GCM from `cryptography`.

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
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
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

    def cipher(self) -> AESGCM:
        return AESGCM(self._secret)

    def __repr__(self) -> str:
        return f"<Key id {self.key_id}>"


def associated_data(store_id: bytes, page: int, version: int) -> bytes:
    """What a ciphertext is bound to besides the key: its store, its page
    number in the store (the portion's offset plus the page's index in the
    portion), and its version."""
    return store_id + struct.pack("<QQ", page, version)


def nonce_of(counter: int) -> bytes:
    return counter.to_bytes(NONCE_BYTES, "big")


def encrypt_page(cipher: AESGCM, nonce: bytes, plaintext: bytes | memoryview, ad: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, tag): the ciphertext is as long as the page."""
    sealed = cipher.encrypt(nonce, bytes(plaintext), ad)
    return sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]


def decrypt_page(cipher: AESGCM, nonce: bytes, ciphertext: bytes, tag: bytes, ad: bytes) -> bytes:
    try:
        return cipher.decrypt(nonce, ciphertext + tag, ad)
    except InvalidTag:
        raise PageAuthError("the page does not authenticate") from None
