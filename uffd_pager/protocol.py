"""The control protocol between the client library and the pager.

Transport: a Unix ``SOCK_SEQPACKET`` socket, so the kernel frames every
message and file descriptors travel with the message they belong to
(``SCM_RIGHTS``). A message is one UTF-8 JSON object of at most
`MAX_MESSAGE` bytes. The client sends requests ``{"op": ..., ...}`` one at a
time and reads one reply each: ``{"ok": true, ...}`` or
``{"ok": false, "error": {"type": ..., "errno": ..., "message": ...}}``.
The first request on a connection is ``hello`` carrying ``"v":
PROTOCOL_VERSION``; a pager speaking another version refuses it.
"""
from __future__ import annotations

import array
import errno
import json
import os
import socket
from typing import Any, Sequence

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class PagerError(Exception):
    """The base of every error that is the pager's, not the caller's."""


class ProtocolError(PagerError):
    """The peer sent something that is not this protocol."""


class PagerGone(ConnectionError, PagerError):
    """The pager process went away (killed, crashed, or stopped)."""


class PagerTimeout(TimeoutError, PagerError):
    """The pager did not answer a request in time."""


class DescriptorsDropped(OSError, PagerError):
    """A message arrived without the descriptors it carried."""


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    try:
        message = json.loads(data)
    except ValueError as exc:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError(f"not a JSON message: {exc}") from None
    if not isinstance(message, dict):
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("a message must be a JSON object")
    return message, fds


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Receives one message and its fds; None at end of stream."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None
    if flags & socket.MSG_CTRUNC:
        # The kernel drops descriptors that do not fit the receiver's table.
        for fd in fds:
            _close_quietly(fd)
        raise DescriptorsDropped(errno.EMFILE, "descriptors sent with a message were dropped: the receiver is at its "
                                    "limit of open files (RLIMIT_NOFILE)")
    return decode(data, fds)


def error_reply(exc: BaseException) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, OSError) and exc.errno is not None:
        error["errno"] = exc.errno
        error["message"] = exc.strerror if exc.strerror else str(exc)
    return {"ok": False, "error": error}


_EXCEPTION_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "KeyError": KeyError,
    "ProtocolError": ProtocolError,
}


def raise_for_error(reply: dict[str, Any]) -> dict[str, Any]:
    """Returns a successful reply, or raises the exception the pager reported."""
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    message = error.get("message", "unknown pager error")
    if "errno" in error:
        # OSError(errno, ...) picks the subclass itself (FileNotFoundError, ...).
        raise OSError(error["errno"], message)
    raise _EXCEPTION_TYPES.get(error.get("type", ""), RuntimeError)(message)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
