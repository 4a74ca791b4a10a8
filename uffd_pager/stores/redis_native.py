"""The connection over which C asks for a Redis store's fault pages itself
(native/remote.c), and its upkeep.

Why: a fault served through the fetch path (fetch.py, redis_wire.py)
spends tens of microseconds of Python between its fault and its request
and between its reply and its UFFDIO_COPY; a trace of the pager in a slow
hour of this machine showed 33 us before the request and 19 us after the
reply, beside 95 us of the round trip itself. Asked for by C, in up_serve,
and placed by C when the socket is readable, a page costs the loop one
reader callback.

This module makes the connection (redis_wire.connect_socket: the socket,
its AUTH and SELECT), hands the socket to C, calls up_remote_drain when it
is readable and passes on what C hands back. A connection that fails, or
leaves a request unanswered for the URL's timeout, hands back every request
in flight (they are fetched through `read`, under the fetch path's
deadline) and is made again a second later; until then, and until the
first is made, faults take the fetch path. Nothing here raises into the
loop: a failure to connect is logged at debug level and tried again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from uffd_pager.native import ffi, lib
from uffd_pager.stores.base import HandedBack

log = logging.getLogger("uffd_pager.redis_native")

_RESULTS = 256  # pages handed back per drain call
_RECONNECT = 1.0  # seconds after a failed connection


def counters(remote: object) -> dict[str, int]:
    """Of a `struct up_remote *`: requests C sent, pages it placed, pages it
    handed back, requests in flight, whether a connection is attached."""
    out = ffi.new("uint64_t[5]")
    lib.up_remote_counters(remote, out)
    return dict(zip(("requests", "placed", "handed_back", "in_flight", "attached"), out))


class RemoteRequests:
    """C's requests for one Redis server's pages of one pseudo file."""

    def __init__(self, url: str, prefix: bytes, file_id: bytes, timeout: float,
                 connect: Callable[[], Awaitable[socket.socket]],
                 handed_back: Callable[[list[HandedBack]], None]) -> None:
        remote = lib.up_remote_new(prefix, len(prefix), file_id, len(file_id))
        if remote == ffi.NULL:
            raise MemoryError("up_remote_new")
        # Freed when the last portion pointing at it lets go of this object
        # (PortionState keeps it), never while C may reach it.
        self.remote = ffi.gc(remote, lib.up_remote_free)
        self._url = url
        self._timeout = timeout
        self._connect = connect
        self._handed_back = handed_back
        self._results = ffi.new("struct up_remote_result[]", _RESULTS)
        self._state = ffi.new("int *")
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._connect_soon()

    @property
    def attached(self) -> bool:
        return self._sock is not None

    def _connect_soon(self, delay: float = 0.0) -> None:
        if self._closed:
            return
        if delay:
            self._timer = self._loop.call_later(delay, self._connect_soon)
            return
        self._timer = None
        self._connecting = self._loop.create_task(self._attach())

    async def _attach(self) -> None:
        try:
            sock = await self._connect()
        except Exception as exc:
            log.debug("%s: no connection for the C fault path (tried again in %.0f s): %s", self._url, _RECONNECT, exc)
            self._connect_soon(_RECONNECT)
            return
        finally:
            self._connecting = None
        if self._closed:
            sock.close()
            return
        if lib.up_remote_attach(self.remote, sock.fileno()) < 0:  # cannot be: attached only here, detached empty
            log.error("%s: the C fault path refused its connection: %s", self._url, ffi.errno)
            sock.close()
            return
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)
        self._arm()

    def _arm(self) -> None:
        self._timer = self._loop.call_later(min(1.0, self._timeout / 2), self._check)

    def _check(self) -> None:
        # One timer per connection, not per request: the oldest request in
        # flight tells whether any is late.
        self._timer = None
        if self._sock is None:
            return
        oldest = lib.up_remote_oldest_ns(self.remote)
        if oldest and time.monotonic_ns() - oldest > self._timeout * 1e9:
            log.warning("%s: no reply within %s s on the C fault path; its pages are fetched again", self._url,
                        self._timeout)
            lib.up_remote_fail(self.remote)
            self._readable()
        if self._sock is not None:
            self._arm()

    def _readable(self) -> None:
        while True:
            n = lib.up_remote_drain(self.remote, self._results, _RESULTS, self._state)
            if n:
                pages = [HandedBack(r.owner, r.address, r.flags, r.rc) for r in self._results[0:n]]
                try:
                    self._handed_back(pages)
                except Exception:  # one region's trouble must not stop the connection
                    log.exception("%s: handing back %d pages", self._url, n)
            if self._state[0] == lib.UP_REMOTE_MORE:
                continue
            if self._state[0] == lib.UP_REMOTE_DETACH and self._sock is not None:
                self._detach()
                self._connect_soon(_RECONNECT)
            return

    def _detach(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(sock.fileno())
        lib.up_remote_detach(self.remote)
        sock.close()

    def close(self) -> None:
        """Hands back whatever is in flight (nothing, once every region of
        the store is gone), then drops the connection."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            lib.up_remote_fail(self.remote)
            with contextlib.suppress(Exception):
                self._readable()
            self._detach()
