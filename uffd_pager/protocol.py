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
from typing import Any, Protocol, Sequence

from uffd_pager.errors import (
    DescriptorsDropped,
    LimitExceeded,
    PagerError,
    PagerGone,
    PagerTimeout,
    ProtocolError,
    StoreLost,
    StoreReadOnly,
    StoreUnavailable,
)

__all__ = ["DescriptorsDropped", "LimitExceeded", "PagerError", "PagerGone", "PagerTimeout", "ProtocolError",
           "StoreLost", "StoreReadOnly", "StoreUnavailable"]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 7  # len(MAP_DESCRIPTORS)


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    try:
        # Strictly UTF-8: json.loads of bytes would guess UTF-16 or UTF-32 too.
        message = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        for fd in fds:
            _close_quietly(fd)
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProtocolError(f"not a UTF-8 JSON message: {reason}") from None
    if not isinstance(message, dict):
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("a message must be a JSON object")
    return message, fds


# The fields each request may carry besides "op"; anything else is refused.
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "hello": frozenset({"v", "pid"}),
    "map": frozenset({"url", "size", "offset", "address", "tracking", "writeback_interval", "fork_policy",
                      "children", "keep_child_portions", "read_ahead", "max_resident", "fds"}),
    "unmap": frozenset({"region"}),
    "prefetch": frozenset({"region", "offset", "length"}),
    "flush": frozenset({"region"}),
    "stats": frozenset({"region"}),
    "backing": frozenset({"region"}),
    "adopt": frozenset({"region", "token", "fds"}),
    "reopen": frozenset({"region", "fds"}),
    "status": frozenset({"after"}),
    "reattach": frozenset({"regions", "fds"}),
}

# map's descriptors, named in its "fds" field in the order they are attached.
# A forked child's claim of its copy (adopt): the secret its tag page's
# fault is filled with, sent back as hex.
CLAIM_TOKEN_SIZE = 16

MAP_DESCRIPTORS = ("uffd", "store", "children", "key", "catalog", "children_catalog", "agent")
REQUIRED_MAP_DESCRIPTORS = ("uffd",)  # a remote store has no descriptor


class Channel(Protocol):
    """Where a client's requests go (client.Connection): a Region talks to
    its pager through one, never through the Pager's own attributes."""

    def request(self, op: str, pass_fds: tuple[int, ...] = (), **fields: Any) -> dict[str, Any]: ...

    def request_fds(self, op: str, pass_fds: tuple[int, ...] = (),
                    **fields: Any) -> tuple[dict[str, Any], list[int]]: ...

    # This process's page-out agent was handed to the pager on this channel.
    agent_started: bool


def check_request(request: dict[str, Any]) -> str:
    """The request's op, once its fields are the ones that op takes."""
    op = request.get("op")
    if not isinstance(op, str) or op not in REQUEST_FIELDS:
        raise ProtocolError(f"unknown request {op!r}")
    extra = set(request) - REQUEST_FIELDS[op] - {"op"}
    if extra:
        raise ProtocolError(f"{op} takes no field {', '.join(sorted(map(repr, extra)))}")
    return op


def check_version(request: dict[str, Any]) -> None:
    version = request.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, 1.0 or "1"
        raise ProtocolError(f"client speaks protocol version {version!r}, this pager speaks {PROTOCOL_VERSION}")


def named_descriptors(request: dict[str, Any], fds: list[int], allowed: Sequence[str],
                      required: Sequence[str]) -> dict[str, int]:
    """{name: fd} for a request whose "fds" field names its descriptors."""
    names = request.get("fds")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"{request.get('op')}: fds must be a list of descriptor names")
    if len(set(names)) != len(names) or not set(names) <= set(allowed) or not set(required) <= set(names):
        raise ProtocolError(f"{request.get('op')}: fds {names} must name each of {', '.join(required)} "
                            f"once, and may add {', '.join(n for n in allowed if n not in required)}")
    if len(names) != len(fds):
        raise ProtocolError(f"{request.get('op')}: fds names {len(names)} descriptors but {len(fds)} came")
    return dict(zip(names, fds))


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Receives one message and its fds; None at end of stream."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None
    if flags & socket.MSG_TRUNC:
        # SOCK_SEQPACKET cuts a longer message to the buffer: never parse the rest.
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError(f"a message longer than {MAX_MESSAGE} bytes")
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
    if error.get("type") == "StoreReadOnly":
        raise StoreReadOnly(error.get("errno", errno.EBADF), message)
    if error.get("type") == "LimitExceeded":
        raise LimitExceeded(error.get("errno", errno.EDQUOT), message)
    if error.get("type") == "StoreUnavailable":
        raise StoreUnavailable(error.get("errno", errno.EIO), message)
    if error.get("type") == "StoreLost":
        raise StoreLost(message)
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
