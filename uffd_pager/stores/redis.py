"""A store that is a pseudo file in the memory of a Redis server or cluster
(the claims' "memory appliance"), on redis-py's asyncio client with its
hiredis parser.

URLs (NAME is the pseudo file; many share one server):

* ``redis://[USER:PASSWORD@]HOST:PORT/NAME[?db=N]``
* ``redis+unix:///PATH/TO/SOCKET?name=NAME[&db=N]``
* ``redis+cluster://HOST:PORT[,HOST:PORT...]/NAME`` (any of the masters;
  the rest are discovered)

and on any of them ``timeout=SECONDS`` (each network call, default 5),
``deadline=SECONDS`` (how long a fault's page is retried while the server
cannot be reached before the access fails with SIGBUS, default 30) and
``wait=N`` / ``wait_timeout=MS`` (a flush also waits until N replicas of
every master have the writes, Redis ``WAIT``; default 0: the master's
acknowledgement is enough).

Layout. Pages are grouped 16 to a chunk (64 KiB of the pseudo file): the
chunk at byte offset c * 65536 of NAME is the hash ``up:NAME:c``, whose
field ``i`` holds page i of the chunk. A page never written, or written as
zeros, is no field at all: it reads as zero and costs the server nothing.
A batch of neighbouring pages is one HMGET on one server, and consecutive
chunks hash to different slots, so a region spreads over every master of
a cluster. ``up:NAME:meta`` holds the pseudo file's id and end.

What a flush promises: every page is in the memory of its master when
`sync` returns (and on N replicas with ``wait=N``); whether it survives a
restart of the server is the server's persistence configuration
(``appendonly``, ``appendfsync``).

A server that lost its memory. The pseudo file's id is kept in the pager's
state directory too; a server that comes back empty (or holds another
pseudo file of that name) is refused at `open` and, while mapped, on every
read and write: the id is read in the same pipelined round trip (in a
cluster, one marker per master, so that a master that lost its data is
noticed too). An empty server must never read as zeros.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from uffd_pager.errors import StoreLost, StoreUnavailable
from uffd_pager.stores.base import BadPage, Extent, HandedBack, ReadDone, Store
from uffd_pager.stores.redis_native import RemoteRequests
from uffd_pager.stores.redis_wire import Command, ReplyError, Wire, connect_socket, hello_commands
from uffd_pager.uffd import PAGE_SIZE

SCHEMES = ("redis", "redis+unix", "redis+cluster")
PAGES_PER_CHUNK = 16
CHUNK_BYTES = PAGES_PER_CHUNK * PAGE_SIZE
DEFAULT_TIMEOUT = 5.0
DEFAULT_DEADLINE = Store.fetch_deadline
_NAME = re.compile(r"[A-Za-z0-9._\-]{1,200}")
_OPTIONS = {"db", "timeout", "deadline", "wait", "wait_timeout", "name"}
_EXAMPLES = ("redis://HOST:PORT/NAME, redis+unix:///PATH/TO/SOCKET?name=NAME or "
             "redis+cluster://HOST:PORT[,HOST:PORT...]/NAME")
_FIELDS = [str(i).encode() for i in range(PAGES_PER_CHUNK)]
_ZERO_PAGE = bytes(PAGE_SIZE)
_closing: set[asyncio.Task[None]] = set()  # clients closing in the background
# Error replies that a retry may outlive (a server loading its data, a
# cluster re-electing); any other is final for the read that got it.
_TRANSIENT = ("LOADING", "TRYAGAIN", "CLUSTERDOWN", "BUSY", "MASTERDOWN", "NOREPLICAS")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis store URL."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]  # TCP (host, port)s; empty for a Unix socket
    unix_path: str | None
    name: str
    db: int
    username: str | None
    password: str | None
    timeout: float
    deadline: float
    wait: int
    wait_timeout: int

    @property
    def identity(self) -> tuple[object, ...]:
        """Equal for two URLs of the same pseudo file (options, credentials
        and the order of a cluster's nodes aside; a cluster named by other
        nodes of it is, as far as we can know, another one)."""
        where = self.unix_path if self.unix_path is not None else tuple(sorted(self.nodes))
        return ("redis", where, self.db, self.name)

    @property
    def where(self) -> str:
        """The server(s), for messages and identities (no credentials)."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return ",".join(f"{host}:{port}" for host, port in self.nodes)


def parse_url(url: str) -> RedisTarget:
    """Parses a Redis store URL, or raises ValueError saying what a valid one
    looks like. Connects to nothing."""
    if not isinstance(url, str):
        raise ValueError(f"a store is a URL such as {_EXAMPLES}, not {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r} is not a Redis URL: use {_EXAMPLES}")
    if parts.fragment:
        raise ValueError(f"{url!r}: a Redis URL takes no fragment (#...); use {_EXAMPLES}")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - _OPTIONS
    if unknown:
        raise ValueError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(_OPTIONS - {'name'}))}")
    options = {k: v[-1] for k, v in query.items()}
    if parts.scheme == "redis+unix":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: a redis+unix URL names a socket path, redis+unix:///PATH?name=NAME")
        unix_path: str | None = unquote(parts.path)
        if not unix_path or not unix_path.startswith("/"):
            raise ValueError(f"{url!r}: no socket path; use redis+unix:///PATH/TO/SOCKET?name=NAME")
        name = options.get("name", "")
        nodes: tuple[tuple[str, int], ...] = ()
        username = password = None
    else:
        if "name" in options:
            raise ValueError(f"{url!r}: the pseudo file's name is the URL's path here: {_EXAMPLES}")
        unix_path = None
        name = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password_text = credentials.partition(":")
        username = unquote(username) or None
        password = unquote(password_text) or None
        nodes = tuple(_node(url, hostport) for hostport in hosts.split(","))
        if parts.scheme == "redis" and len(nodes) != 1:
            raise ValueError(f"{url!r}: redis:// names one server; for several, redis+cluster://H:P,H:P/NAME")
    if not _NAME.fullmatch(name or ""):
        raise ValueError(f"{url!r}: the pseudo file's name must be 1-200 of A-Z a-z 0-9 . _ - "
                         f"(got {name!r}); use {_EXAMPLES}")
    db = _number(url, options, "db", 0, int)
    if parts.scheme == "redis+cluster" and db != 0:
        raise ValueError(f"{url!r}: a Redis Cluster has only db 0")
    timeout = _number(url, options, "timeout", DEFAULT_TIMEOUT, float)
    deadline = _number(url, options, "deadline", DEFAULT_DEADLINE, float)
    wait = _number(url, options, "wait", 0, int)
    wait_timeout = _number(url, options, "wait_timeout", 1000, int)
    if not 0 < timeout <= 3600 or not 0 < deadline <= 86400 or not 0 <= db < 1 << 16 or not 0 <= wait < 1000 \
            or not 0 < wait_timeout <= 3_600_000:
        raise ValueError(f"{url!r}: out of range: timeout and deadline are seconds (0 < timeout <= 3600, "
                         "0 < deadline <= 86400), wait a replica count, wait_timeout milliseconds")
    return RedisTarget(parts.scheme, nodes, unix_path, name, db, username, password, timeout, deadline, wait,
                       wait_timeout)


def _node(url: str, hostport: str) -> tuple[str, int]:
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{url!r}: {hostport!r} is not HOST:PORT; use {_EXAMPLES}")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{url!r}: bad port {port_text!r} (1-65535); use {_EXAMPLES}")
    return host, int(port_text)


def _number(url: str, options: dict[str, str], key: str, default: Any, kind: type) -> Any:
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError:
        raise ValueError(f"{url!r}: {key}={options[key]!r} is not a number") from None


def _id_record(state_dir: str, target: RedisTarget) -> str:
    """Where the state directory keeps the pseudo file's id: found by the
    server and name, never by anything the server holds."""
    what = repr(target.identity).encode()
    return os.path.join(state_dir, "remote", hashlib.sha256(what).hexdigest()[:40] + ".id")


class RedisStore(Store):
    """A pseudo file on a Redis server or cluster (see the module's doc)."""

    def __init__(self, url: str, target: RedisTarget, client: Any, cluster: bool) -> None:
        self.url = url
        self.target = target
        self.fetch_deadline = target.deadline
        self._client = client
        self._cluster = cluster
        self._prefix = f"up:{target.name}:".encode()
        self._meta = self._prefix + b"meta"
        self._markers: list[bytes] = [self._meta]  # keys whose "id" proves the data is there
        self._id = b""
        self._identity = target.identity
        self._end = 0
        self._closed = False
        self._wires: dict[str, Wire] = {}  # fault reads' connections, per server (redis_wire.py)
        self._native: RemoteRequests | None = None  # C's own requests (redis_native.py)

    @classmethod
    async def open(cls, url: str, state_dir: str) -> "RedisStore":
        """Connects and checks the pseudo file against the id the state
        directory remembers (a new one is created and remembered). Raises
        StoreUnavailable naming the URL when the server cannot be reached,
        StoreLost when it no longer holds the pseudo file."""
        from redis.asyncio import Redis
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        target = parse_url(url)
        common: dict[str, Any] = dict(socket_timeout=target.timeout, socket_connect_timeout=target.timeout,
                                      username=target.username, password=target.password)
        # One retry, on a new connection: a pooled connection may have died
        # with a restarted server while the fault path's own connection
        # (redis_wire.py) carried the reads. Every command sent here is
        # idempotent (HSET, HDEL, COPY REPLACE, reads), so a retry is safe.
        retry = Retry(NoBackoff(), 1)
        cluster = target.scheme == "redis+cluster"
        if cluster:
            client: Any = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], retry=retry,
                                       **common)
        elif target.unix_path is not None:
            client = Redis(unix_socket_path=target.unix_path, db=target.db, retry=retry, **common)
        else:
            host, port = target.nodes[0]
            client = Redis(host=host, port=port, db=target.db, retry=retry, **common)
        store = cls(url, target, client, cluster)
        try:
            await store._attach(state_dir)
        except BaseException:
            store.close()
            raise
        return store

    async def _attach(self, state_dir: str) -> None:
        record = _id_record(state_dir, self.target)
        try:
            with open(record, "rb") as f:
                remembered = f.read().strip()
        except FileNotFoundError:
            remembered = b""
        meta = await self._call(self._client.hmget(self._meta, [b"id", b"end"]), "connecting")
        found, end = meta[0] or b"", int(meta[1] or 0)
        where = f"{self.target.where} (pseudo file {self.target.name!r})"
        if remembered and not found:
            raise StoreLost(f"{self.url}: the server no longer holds the pseudo file this pager wrote "
                            f"(restarted empty, flushed, or another db?): its pages would read as zeros. If it "
                            f"is meant to start afresh, forget it: uffd_pager.forget_store({self.url!r})")
        if remembered and found != remembered:
            raise StoreLost(f"{self.url}: {where} holds another pseudo file (id {found.decode()!r}, "
                            f"this pager wrote {remembered.decode()!r})")
        self._id = found or secrets.token_hex(16).encode()
        self._end = end
        if self._cluster:
            self._markers = await self._place_markers()
            self._identity = ("redis", tuple(sorted(node.name for node in self._client.get_primaries())),
                              0, self.target.name)
            if found:
                # The meta key's master kept the pseudo file; every other
                # master must have kept its marker too: rewriting them (for
                # this pager or another) would hide a loss.
                self._check_markers(await self._call(self._read_markers(), "connecting"))
        await self._call(self._mark(), "connecting")
        if not remembered:
            os.makedirs(os.path.dirname(record), 0o700, exist_ok=True)
            tmp = f"{record}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._id + b"\n")
                os.fsync(f.fileno())
            os.replace(tmp, record)

    async def _place_markers(self) -> list[bytes]:
        """One marker key per master (the meta key is one of them): a master
        that loses its data loses its marker."""
        markers = [self._meta]
        owners = {self._client.get_node_from_key(self._meta).name}
        masters = {node.name for node in self._client.get_primaries()}
        k = 0
        while owners != masters and k < 100_000:
            key = self._prefix + b"mark:" + str(k).encode()
            node = self._client.get_node_from_key(key)
            if node.name not in owners:
                owners.add(node.name)
                markers.append(key)
            k += 1
        return markers

    async def _mark(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in self._markers:
            pipe.hset(key, b"id", self._id)
        if self._end:
            pipe.hset(self._meta, b"end", str(self._end).encode())
        await pipe.execute()

    @property
    def identity(self) -> tuple[object, ...]:
        """A cluster's is its masters', however the URL names it."""
        return self._identity

    alignment = CHUNK_BYTES

    async def copy_within(self, source: int, destination: int, length: int) -> bool:
        """COPY of whole chunks' hashes (Redis 6.2+), on one server only: in
        a cluster the two chunks are in different slots, which COPY refuses."""
        if self._cluster:
            return False
        pipe = self._client.pipeline(transaction=False)
        for k in range(length // CHUNK_BYTES):
            pipe.copy(self._key(source // CHUNK_BYTES + k), self._key(destination // CHUNK_BYTES + k), replace=True)
        end = destination + length
        if end > self._end:
            pipe.hset(self._meta, b"end", str(end).encode())
        await self._call(pipe.execute(), "copying")
        self._end = max(self._end, end)
        return True

    @property
    def state_key(self) -> tuple[object, ...]:
        return self.target.identity  # a cluster: the nodes its URL names, in any order

    def end(self) -> int:
        return self._end

    def _key(self, chunk: int) -> bytes:
        return self._prefix + str(chunk).encode()

    def _check_markers(self, ids: Sequence[Any]) -> None:
        if any(found != self._id for found in ids):
            raise StoreLost(f"{self.url}: the server lost the pseudo file, or a master of it lost its part "
                            "(restarted empty, or flushed): its pages are gone, and they are never read as zeros. "
                            f"To start it afresh, delete its keys (up:{self.target.name}:*) on every master "
                            "and forget it (uffd_pager.forget_store)")

    async def read(self, offsets: Sequence[int]) -> list[bytes | None | BadPage]:
        """One HMGET per chunk, over the fault path's own connections; on one
        server the markers are read in the same round trip (after the
        pages, so that a loss before the read is seen), in a cluster only
        when a page is a hole (only the markers tell a hole from a master
        that lost its memory)."""
        chunks, requests = self._hmget_requests(offsets)
        markers = [(b"HGET", key, b"id") for key in self._markers]
        if self._cluster:
            replies = await self._wire_calls(requests)
            if replies is None:  # the slot table moved: redis-py follows the redirections
                replies = await self._call(self._hmgets(requests), "reading")
        else:
            replies = await self._wire_calls(requests + markers)
            assert replies is not None
            self._check_markers(replies[len(requests):])
        values, holes = self._values(chunks, replies)
        if holes and self._cluster:
            ids = await self._wire_calls(markers)
            if ids is None:
                ids = await self._call(self._read_markers(), "reading")
            self._check_markers(ids)
        return [values[offset] for offset in offsets]

    @property
    def remote(self) -> Any:
        return self._native.remote if self._native is not None else None

    def serve_remotely(self, handed_back: Callable[[list[HandedBack]], None]) -> None:
        """On one server: C asks for faults' pages over a connection of its
        own (redis_native.py). A cluster's go through `read`: a slot that
        moves, or a hole (which needs every master's marker), needs redis-py."""
        if self._cluster or self._closed or self._native is not None:
            return
        t = self.target
        host, port = t.nodes[0] if t.nodes else (None, 0)
        hello = hello_commands(t.username, t.password, t.db)

        def connect() -> Awaitable[socket.socket]:
            return connect_socket(host=host, port=port, unix_path=t.unix_path, hello=hello, timeout=t.timeout)

        self._native = RemoteRequests(self.url, self._prefix, self._id, t.timeout, connect, handed_back)

    def read_soon(self, offsets: Sequence[int], done: ReadDone) -> bool:
        """On one server, with the fault path's connection up: the same
        round trip as `read`, sent now, its replies judged in the callback
        (see redis_wire.py for what that saves). A cluster's reads go
        through `read`: a hole there needs a second round trip for the
        markers, and a redirection needs redis-py."""
        if self._cluster or self._closed:
            return False
        chunks, requests = self._hmget_requests(offsets)
        commands = requests + [(b"HGET", key, b"id") for key in self._markers]

        def replied(outcome: list[Any] | BaseException) -> None:
            try:
                if isinstance(outcome, BaseException):
                    raise StoreUnavailable(errno.EIO, f"{self.url}: reading: {outcome or type(outcome).__name__}")
                self._reply_errors(outcome)
                self._check_markers(outcome[len(requests):])
                values, _ = self._values(chunks, outcome)
            except Exception as exc:
                done(exc)
                return
            done([values[offset] for offset in offsets])

        return self._wires[self._server_of(self._meta)].start(commands, replied)

    def _hmget_requests(self, offsets: Sequence[int]) -> tuple[dict[int, list[int]], list[Command]]:
        """The offsets by chunk, and one HMGET per chunk."""
        chunks: dict[int, list[int]] = {}
        for offset in offsets:
            chunks.setdefault(offset // CHUNK_BYTES, []).append(offset)
        requests: list[Command] = [
            (b"HMGET", self._key(chunk), *[_FIELDS[(o % CHUNK_BYTES) // PAGE_SIZE] for o in members])
            for chunk, members in chunks.items()]
        return chunks, requests

    def _values(self, chunks: dict[int, list[int]], replies: Sequence[Any]) -> tuple[dict[int, bytes | None | BadPage], bool]:
        """The pages the HMGETs' replies hold, by offset, and whether any is
        a hole."""
        values: dict[int, bytes | None | BadPage] = {}
        holes = False
        for members, reply in zip(chunks.values(), replies):
            for offset, value in zip(members, reply):
                if value is None:
                    holes = True
                elif len(value) != PAGE_SIZE:
                    value = BadPage(offset, f"{self.url} holds {len(value)} bytes for it, not {PAGE_SIZE}")
                values[offset] = value
        return values, holes

    async def _hmgets(self, requests: Sequence[Command]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for _, key, *fields in requests:
            pipe.hmget(key, fields)
        return await pipe.execute()

    async def _wire_calls(self, commands: Sequence[Command]) -> list[Any] | None:
        """The replies of commands (each naming its key second), sent over
        the fault path's connections, one round trip per server; None when a
        cluster redirected one (a slot moved: the caller asks redis-py, which
        follows it and learns the new table). Raises StoreUnavailable."""
        by_server: dict[str, list[int]] = {}
        try:
            for i, command in enumerate(commands):
                by_server.setdefault(self._server_of(command[1]), []).append(i)
        except Exception:  # a cluster's table without the slot (redis-py raises): it knows what to do
            if self._cluster:
                return None
            raise
        try:
            if len(by_server) == 1:
                (server,) = by_server
                replies = await self._wires[server].request(commands)
            else:
                answers = await asyncio.gather(*(self._wires[server].request([commands[i] for i in members])
                                                  for server, members in by_server.items()))
                replies = [None] * len(commands)
                for members, answer in zip(by_server.values(), answers):
                    for i, reply in zip(members, answer):
                        replies[i] = reply
        except (ConnectionError, TimeoutError, OSError) as exc:
            if self._cluster:
                # A master failed over or left: redis-py reconnects and
                # learns the cluster's new table; our connection to an
                # address no longer in it goes.
                self._forget_gone_servers()
                return None
            raise StoreUnavailable(errno.EIO, f"{self.url}: reading: {exc or type(exc).__name__}") from None
        if self._cluster and any(isinstance(reply, ReplyError) and str(reply).startswith(("MOVED", "ASK"))
                                 for reply in replies):
            return None
        self._reply_errors(replies)
        return replies

    def _reply_errors(self, replies: Sequence[Any]) -> None:
        """Raises for the first error reply: StoreUnavailable for one a retry
        may outlive, OSError for any other."""
        for reply in replies:
            if isinstance(reply, ReplyError):
                if str(reply).startswith(_TRANSIENT):
                    raise StoreUnavailable(errno.EIO, f"{self.url}: reading: {reply}")
                # The server will not serve it however long we retry.
                raise OSError(errno.EIO, f"{self.url}: reading: the server answered {reply}")

    def _forget_gone_servers(self) -> None:
        try:
            live = {node.name for node in self._client.get_nodes()}
        except Exception:
            live = set()
        for name in [n for n in self._wires if n not in live]:
            self._wires.pop(name).close()

    def _server_of(self, key: bytes) -> str:
        """The server that holds key (the one server, or the master of its
        slot in the cluster's table), with a connection made for it."""
        if not self._cluster:
            server = ""
            if server not in self._wires:
                t = self.target
                host, port = t.nodes[0] if t.nodes else (None, 0)
                self._wires[server] = Wire(host=host, port=port, unix_path=t.unix_path, username=t.username,
                                           password=t.password, db=t.db, timeout=t.timeout)
            return server
        node = self._client.get_node_from_key(key)
        if node.name not in self._wires:
            self._wires[node.name] = Wire(host=node.host, port=node.port, username=self.target.username,
                                          password=self.target.password, timeout=self.target.timeout)
        return node.name

    async def write(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        sets: dict[int, dict[bytes, bytes]] = {}
        drops: dict[int, list[bytes]] = {}
        pos = 0
        end = self._end
        for offset, length in extents:
            for page_offset in range(offset, offset + length, PAGE_SIZE):
                page = bytes(view[pos:pos + PAGE_SIZE])
                pos += PAGE_SIZE
                chunk, field = page_offset // CHUNK_BYTES, _FIELDS[(page_offset % CHUNK_BYTES) // PAGE_SIZE]
                if page == _ZERO_PAGE:
                    drops.setdefault(chunk, []).append(field)  # zeros cost the server nothing
                else:
                    sets.setdefault(chunk, {})[field] = page
            end = max(end, offset + length)
        pipe = self._client.pipeline(transaction=False)
        for key in self._markers:
            pipe.hget(key, b"id")
        for chunk, fields in sets.items():
            pipe.hset(self._key(chunk), mapping=fields)
        for chunk, fields in drops.items():
            pipe.hdel(self._key(chunk), *fields)
        if end != self._end:
            pipe.hset(self._meta, b"end", str(end).encode())
        replies = await self._call(pipe.execute(), "writing")
        self._check_markers(replies[:len(self._markers)])
        self._end = end

    async def sync(self) -> None:
        """Every write was acknowledged when it returned; with wait=N, waits
        until N replicas of every master have them too."""
        ids = await self._call(self._read_markers(), "syncing")
        self._check_markers(ids)
        if not self.target.wait:
            return
        if self._cluster:
            from redis.asyncio.cluster import RedisCluster
            acked = await self._call(self._client.execute_command(
                "WAIT", self.target.wait, self.target.wait_timeout, target_nodes=RedisCluster.PRIMARIES), "waiting")
            counts = list(acked.values()) if isinstance(acked, dict) else [acked]
        else:
            counts = [await self._call(self._client.execute_command("WAIT", self.target.wait,
                                                                    self.target.wait_timeout), "waiting")]
        if min(int(c) for c in counts) < self.target.wait:
            raise StoreUnavailable(errno.EAGAIN, f"{self.url}: only {min(counts)} of {self.target.wait} replicas "
                                                 f"acknowledged the writes within {self.target.wait_timeout} ms")

    async def _read_markers(self) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for key in self._markers:
            pipe.hget(key, b"id")
        return await pipe.execute()

    async def discard(self, offset: int, length: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        first, end = offset, offset + length
        page_offset = first
        while page_offset < end:
            chunk = page_offset // CHUNK_BYTES
            chunk_end = min((chunk + 1) * CHUNK_BYTES, end)
            if page_offset == chunk * CHUNK_BYTES and chunk_end == (chunk + 1) * CHUNK_BYTES:
                pipe.delete(self._key(chunk))
            else:
                fields = [_FIELDS[(o % CHUNK_BYTES) // PAGE_SIZE] for o in range(page_offset, chunk_end, PAGE_SIZE)]
                pipe.hdel(self._key(chunk), *fields)
            page_offset = chunk_end
        await self._call(pipe.execute(), "discarding")

    async def _call(self, work: Any, what: str) -> Any:
        """Awaits one network operation, which the client's socket timeouts
        (the URL's timeout: to connect, and for each read) bound; a failure
        to reach the server is StoreUnavailable, naming the URL."""
        from redis.exceptions import RedisClusterException, RedisError

        try:
            return await work
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise StoreUnavailable(errno.ECONNREFUSED if isinstance(exc, ConnectionRefusedError) else errno.EIO,
                                   f"{self.url}: {what}: {reason}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._native is not None:
            self._native.close()
        for wire in self._wires.values():
            wire.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._client.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


def forget(url: str, state_dir: str) -> None:
    """Forgets the id this pager remembers for the pseudo file at url (after
    its server lost it on purpose): the next map starts it afresh."""
    try:
        os.unlink(_id_record(state_dir, parse_url(url)))
    except FileNotFoundError:
        pass
