"""A pipelined Redis connection for the fault path, on hiredis's parser.

Why not redis-py here: its asyncio client spends 30-40 us of the loop's
time per command (a connection taken from the pool and given back, the
command packed in Python, the reply dispatched through its parser classes),
measured beside this connection on the same server in the same minute; a
fault waits for one HMGET, and the loop that serves faults pays that for
every fault of every region. So fault reads go over a connection of their
own: hiredis packs the commands and parses the replies, a batch is written
at once, and replies are matched to requests in the order they were sent
(Redis answers a connection's commands in order). Everything else - writes,
COPY, WAIT, a cluster's slot table and its redirections - stays on redis-py.

A fault's read may also skip the coroutine layers (`Wire.start`): the
request is written in the same turn of the loop as the fault that wants it,
and its callback runs inside `data_received`, in the turn its reply comes.
Each layer skipped is a turn of the loop saved on both sides of the round
trip: in a trace of the pager, fault to request went from 54 to 26 us, and
reply to UFFDIO_COPY from 27 to 16 us (slow hours of this machine). Pages of
one server are asked for by C itself where it can (redis_native.py); this
path serves the rest: read-ahead windows, encrypted stores, clusters.

Failures: a connection that cannot be made, is lost, or leaves a request
unanswered for `timeout` seconds fails every request in flight on it
(ConnectionError / TimeoutError); the next request makes a new one. Error
replies (``-MOVED``, ``-LOADING``, ...) are returned, as hiredis.ReplyError
values (ReplyError), for the caller to judge.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

log = logging.getLogger("uffd_pager.redis_wire")

Command = Sequence[bytes | str | int]
ReplyError = hiredis.ReplyError  # an error reply, in its place among the replies
# Called once with a request's replies (in order), or with the error that
# failed the connection it was sent on.
Done = Callable[[list[Any] | BaseException], None]


class _Request:
    __slots__ = ("count", "replies", "done", "sent")

    def __init__(self, count: int, done: Done, sent: float) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.done = done
        self.sent = sent


def _answer(request: _Request, outcome: list[Any] | BaseException) -> None:
    try:
        request.done(outcome)
    except Exception:  # one caller's bug must not fail the connection for the others
        log.exception("handling the replies of a request")


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._pending: deque[_Request] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    @property
    def usable(self) -> bool:
        return self.lost is None and self._transport is not None

    def send(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self._loop.create_future()

        def done(outcome: list[Any] | BaseException) -> None:
            if future.done():  # its waiter was cancelled
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        if not self.usable:
            done(ConnectionError(f"connection lost: {self.lost}"))
        elif not commands:
            done([])  # a request of nothing: no reply will come for it
        else:
            self.submit(commands, done)
        return future

    def submit(self, commands: Sequence[Command], done: Done) -> None:
        """Writes the commands now (the connection is usable, commands not
        empty); done is called from data_received or from the failure."""
        # Packed before it is queued: a command that cannot be packed must
        # not leave a request behind that would take the next one's replies.
        payload = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
        assert self._transport is not None
        self._pending.append(_Request(len(commands), done, self._loop.time()))
        self._transport.write(payload)
        if self._timer is None:
            self._arm()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"bad reply from the server: {exc}"))
                return
            if reply is False:
                return
            if not self._pending:
                self._fail(ConnectionError("the server sent a reply nothing asked for"))
                return
            request = self._pending[0]
            request.replies.append(reply)
            if len(request.replies) == request.count:
                self._pending.popleft()
                _answer(request, request.replies)
                if self.lost is not None:  # the callback closed the connection
                    return

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc or 'closed by the server'}"))

    def _arm(self) -> None:
        self._timer = self._loop.call_at(self._pending[0].sent + self._timeout, self._check)

    def _check(self) -> None:
        # One timer for the connection, re-armed for the oldest request:
        # no timer per request on the fault path.
        self._timer = None
        if not self._pending:
            return
        if self._loop.time() >= self._pending[0].sent + self._timeout:
            self._fail(TimeoutError(f"no reply within {self._timeout} s"))
        else:
            self._arm()

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            _answer(self._pending.popleft(), exc)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(ConnectionError("closed"))


def hello_commands(username: str | None, password: str | None, db: int) -> list[Command]:
    """What a new connection sends first: AUTH, SELECT."""
    hello: list[Command] = []
    if password is not None:
        hello.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        hello.append(("SELECT", db))
    return hello


async def connect_socket(*, host: str | None, port: int, unix_path: str | None, hello: Sequence[Command],
                         timeout: float) -> socket.socket:
    """A non-blocking socket to the server with the hello commands answered,
    for a connection whose bytes C writes and reads (native/remote.c).
    Raises ConnectionError / TimeoutError (each step bounded by timeout)."""
    loop = asyncio.get_running_loop()
    if unix_path is not None:
        sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), unix_path
    else:
        family, kind, proto, _, address = (await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout))[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one small write
        if hello:
            await asyncio.wait_for(loop.sock_sendall(sock, b"".join(hiredis.pack_command(tuple(c)) for c in hello)),
                                   timeout)
            reader, replies = hiredis.Reader(), []
            while len(replies) < len(hello):
                reply = reader.gets()
                if reply is False:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
                    if not data:
                        raise ConnectionError("closed by the server")
                    reader.feed(data)
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"the server refused the connection: {reply}")
                replies.append(reply)
    except BaseException:
        sock.close()
        raise
    return sock


class Wire:
    """A connection to one server (host and port, or a Unix socket), made on
    first use and made again after a failure."""

    def __init__(self, *, host: str | None = None, port: int = 0, unix_path: str | None = None,
                 username: str | None = None, password: str | None = None, db: int = 0,
                 timeout: float = 5.0) -> None:
        self._host, self._port, self._unix_path = host, port, unix_path
        self._hello = hello_commands(username, password, db)
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    def start(self, commands: Sequence[Command], done: Done) -> bool:
        """Writes the commands now if the connection is up (done is called,
        later, with their replies or the connection's failure); False when
        it is not (nothing sent: `request` makes the connection)."""
        protocol = self._protocol
        if self._closed or not commands or protocol is None or not protocol.usable:
            return False
        protocol.submit(commands, done)
        return True

    async def request(self, commands: Sequence[Command]) -> list[Any]:
        """Sends the commands at once; their replies, in order (an error
        reply is a hiredis.ReplyError in its place)."""
        if self._closed:
            raise ConnectionError("the connection was closed")
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connected()
        return await protocol.send(commands)

    async def _connected(self) -> _Protocol:
        if self._connecting is None:  # one connection attempt, whoever else waits for it
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    def _connect_done(self, connecting: "asyncio.Future[_Protocol]") -> None:
        # However its waiters fared (cancelled ones included), the next
        # request after this attempt makes a new one if it failed.
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # retrieved: a failure is its waiters' to report

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._unix_path is not None:
            making = loop.create_unix_connection(lambda: _Protocol(loop, self._timeout), self._unix_path)
        else:
            making = loop.create_connection(lambda: _Protocol(loop, self._timeout), self._host, self._port)
        _, protocol = await asyncio.wait_for(making, self._timeout)
        try:
            if self._hello:
                for reply in await protocol.send(self._hello):
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"the server refused the connection: {reply}")
        except BaseException:  # refused, lost, or the wire closed meanwhile: never left open
            protocol.close()
            raise
        if self._closed:
            protocol.close()
            raise ConnectionError("closed")
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
