"""The pager's front: it accepts client connections (root, its own uid, and
the users and groups it admits: tenants.py), answers their control
requests (protocol.py), and holds the parts
that do the work: the region table (regions.py), fault and event handling
(faults.py), write-back (flushing.py) and fork lineage (lineage.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import json
import logging
import os
import dataclasses
import resource
import secrets
import socket
import struct
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from uffd_pager import protocol
from uffd_pager.crypto import Key
from uffd_pager.durable import DurableState, RegionRecord, process_start
from uffd_pager.errors import LimitExceeded
from uffd_pager.faults import FaultHandler
from uffd_pager.flushing import Flusher
from uffd_pager.layout import (
    Portion,
    tracking_name,
    check_geometry,
    READ_AHEAD_MAX,
    parse_fork_policy,
    parse_max_resident,
    parse_read_ahead,
    parse_tracking,
    parse_writeback_interval,
)
from uffd_pager.lineage import Lineage
from uffd_pager.paging import Agent, PageOut
from uffd_pager.recovery import Recovery
from uffd_pager.regions import RegionTable
from uffd_pager.served import Connection, OpenStore, ServedRegion
from uffd_pager.stores import FileStore, Store, is_remote
from uffd_pager.stores.redis_native import counters as remote_counters
from uffd_pager.takeover import identity_of
from uffd_pager.tenants import Access, TenantLimits, Tenants
from uffd_pager.uffd import (
    PAGE_SIZE,
    FillRange,
    Tracking,
    Uffd,
    is_userfaultfd,
)
from uffd_pager.writeback import page_runs

if TYPE_CHECKING:  # imported when --metrics asks for it: prometheus_client costs start-up time
    from uffd_pager.metrics import PagerMetrics

log = logging.getLogger("uffd_pager.pager")

# fcntl(2) memfd seals (the fcntl module of 3.11 lacks them on some builds).
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)

# Highest user address plus one (x86-64, 5-level page tables at most).
_MAX_ADDRESS = 1 << 56

_SO_PEERPIDFD = 77  # <asm-generic/socket.h>, Linux 6.5; not in the socket module of Python 3.11

# How long a stopping pager may spend writing every region back.
_STOP_WRITE_BACK = 60.0

# How long accept() pauses when the pager is out of descriptors.
_ACCEPT_PAUSE = 0.5


# A request's answer, with the descriptors it hands over (adopt: a uffd).
Reply = dict[str, Any] | tuple[dict[str, Any], list[int]]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected; the kernel gives the
    pid as our pid namespace sees it, whatever namespace the peer is in."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd of the process that connected: SO_PEERPIDFD (Linux 6.5+)
    names that very process, where pidfd_open(pid) could name another that
    reused its pid after it exited."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
    return os.pidfd_open(pid)


def _require_token(request: dict[str, Any]) -> bytes:
    token = request.get("token")
    if not isinstance(token, str) or len(token) != 2 * protocol.CLAIM_TOKEN_SIZE:
        raise ValueError(f"adopt: 'token' must be the {2 * protocol.CLAIM_TOKEN_SIZE} hex digits read from the tag page")
    try:
        return bytes.fromhex(token)
    except ValueError:
        raise ValueError("adopt: 'token' is not hexadecimal") from None


class PagerService:
    """One pager: its listening socket, its clients, and the parts that serve them."""

    def __init__(self, listener: socket.socket, *, exit_when_idle: bool = False,
                 limits: TenantLimits | None = None, state_dir: str | None = None, max_resident: int = 0,
                 tenant_max_resident: int = 0,
                 metrics: tuple[str, int] | None = None, durable: DurableState | None = None,
                 access: Access | None = None, program: int | None = None) -> None:
        """max_resident: bytes all regions may keep
        resident together (0: no such cap), kept by page-out;
        tenant_max_resident: the same for each tenant's regions. metrics:
        (host, port) to serve Prometheus metrics on (metrics.py), or None.
        durable: the state a pager started again on this socket takes the
        regions over from (durable.py); the regions it records are taken
        over first. access: who may connect besides root and our uid.
        program: the pid of the process whose private pager this is."""
        self._listener = listener
        self._access = access or Access()
        self._listener.setblocking(False)
        self._exit_when_idle = exit_when_idle
        self._loop = asyncio.get_running_loop()
        self._connections: set[Connection] = set()
        self._done = self._loop.create_future()
        self._accept_paused = False
        self._internal_errors = 0  # exceptions that escaped to the loop (see _on_internal_error)
        self._tenants = Tenants(limits or TenantLimits())
        self._table = RegionTable(self._loop, state_dir)
        self._lineage = Lineage(self._loop, self._table)
        self._faults = FaultHandler(self._loop, self._table, self._lineage)
        self._flusher = Flusher(self._loop, self._table, self._lineage)
        self._pageout = PageOut(self._loop, self._flusher.flush, self._faults.retry_now, _hold, self._table.let_go)
        self._pageout.total_cap = max_resident // PAGE_SIZE
        self._pageout.tenant_cap = tenant_max_resident // PAGE_SIZE
        self._pageout.regions = lambda: self._table.regions.values()
        self._faults.on_served = self._pageout.check
        self._table.on_released = self._on_released
        if durable is not None:
            self._table.on_portion_freed = self._on_portion_freed
            self._table.kept_slots = lambda store: durable.kept_slots(store.identity)
            self._table.on_slot_kept = lambda store, offset, length: durable.keep_slot(store.identity, offset, length)
            self._lineage.record_portions = self._record_portions
            self._flusher.record_flushing = self._record_flushing
        self._metrics_address = metrics
        self._durable = durable
        self._program = program
        self._stopping = False  # regions released by a stop stay recorded: the next pager takes them over
        self._recovery = None if durable is None else Recovery(
            self._loop, self._table, self._lineage, durable,
            lambda conn, request, fds, region_id: self._op_map(conn, request, fds, region_id=region_id),
            self._open_stores)
        # Regions taken over at start, reattached by their processes, ranges woken.
        self._taken_over = self._recovery.counts if self._recovery else {"regions": 0, "reattached": 0, "woken": 0}
        self._metrics: PagerMetrics | None = None
        _raise_descriptor_limit()
        if not self._tenants.limits.max_fds:  # no tenant may take every descriptor from the others
            self._tenants.limits = dataclasses.replace(
                self._tenants.limits, max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
        self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self._handlers: dict[str, Callable[[Connection, dict[str, Any], list[int]], Awaitable[Reply]]] = {
            "hello": self._op_hello,
            "map": self._op_map,
            "unmap": self._op_unmap,
            "flush": self._op_flush,
            "prefetch": self._op_prefetch,
            "stats": self._op_stats,
            "backing": self._op_backing,
            "adopt": self._op_adopt,
            "reopen": self._op_reopen,
            "status": self._op_status,
            "reattach": self._op_reattach,
        }

    async def serve(self, *, idle_timeout: float = 10.0) -> None:
        """Runs until stopped; an embedded pager also stops once idle."""
        self._loop.set_exception_handler(self._on_internal_error)
        metrics_server = await self._start_metrics() if self._metrics_address is not None else None
        if self._recovery is not None:
            await self._recovery.run()
        self._loop.add_reader(self._listener.fileno(), self._accept)
        if self._exit_when_idle and self._program is not None:
            self._watch_program()
        elif self._exit_when_idle:
            # A pager whose client died before connecting stops too.
            self._loop.call_later(idle_timeout, self._stop_if_idle)
        try:
            await self._done
            self._stop_accepting()
            await self._write_back_all()
        finally:
            self._stopping = True
            self._stop_accepting()
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
            if metrics_server is not None:
                metrics_server.close()
            self._faults.fetcher.close()
            self._pageout.close()
            for region in list(self._table.regions.values()):
                self._table.release_region(region)
            for conn in list(self._connections):
                self._drop_connection(conn)

    async def _start_metrics(self) -> asyncio.Server:
        from prometheus_client import ProcessCollector
        from prometheus_client.registry import CollectorRegistry

        from uffd_pager.metrics import PagerGauges, PagerMetrics
        from uffd_pager.metrics_http import start_metrics_server

        assert self._metrics_address is not None
        self._metrics = PagerMetrics(lambda: self._table.regions.values(), lambda: PagerGauges(
            connections=len(self._connections), tenants=len(self._tenants.usage()), stores=len(self._table.stores),
            internal_errors=self._internal_errors, restarts=int(self._taken_over["regions"] > 0)))
        self._table.on_added = self._metrics.track
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._metrics)
        ProcessCollector(registry=registry)  # the pager's own CPU, memory and descriptors
        server = await start_metrics_server(registry, *self._metrics_address)
        host, port = server.sockets[0].getsockname()[:2]
        log.info("metrics on http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return server

    def _on_internal_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception no handler caught (a callback's, a task's): a bug of
        ours. The pager goes on serving the others; status counts it."""
        self._internal_errors += 1
        exc = context.get("exception")
        log.error("internal error: %s", context.get("message"), exc_info=exc if isinstance(exc, BaseException) else None)

    def stop(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _on_released(self, region: ServedRegion) -> None:
        if self._durable is not None and region.recorded is not None and not self._stopping:
            # Its row goes with its portion, which its children may still inherit from.
            self._durable.released(region.id)
        self._pageout.released(region)
        if self._metrics is not None:
            self._metrics.retire(region)
        if region.parent is None and region.uid is not None:
            self._tenants.remove(region.uid, region.fill.length)
        self._lineage.sync_defer_missing()
        self._stop_if_idle()

    def _on_portion_freed(self, portion: Portion) -> None:
        assert self._durable is not None
        if not self._stopping:
            self._durable.forget(portion.region_id)

    def _record_portions(self, portions: list[Portion]) -> None:
        assert self._durable is not None
        rows = []
        for portion in portions:
            rows.append((portion.region_id, portion.offset, portion.state.held_runs()))
            portion.recorded_missing = portion.state.missing()
        self._durable.record_portions(rows)

    def _record_flushing(self, region: ServedRegion, pages: list[tuple[int, int]]) -> None:
        assert self._durable is not None
        if region.recorded is not None:
            self._durable.flushing(region.id, pages)

    def _watch_program(self) -> None:
        """A private pager stops, once idle, when its program is gone, and
        never before it (re)connected: one started again after its
        predecessor died may have nothing to take over, and its program
        connects only with its next request."""
        assert self._program is not None
        try:
            pidfd = os.pidfd_open(self._program)
        except ProcessLookupError:
            self._loop.call_soon(self._stop_if_idle)
            return
        if os.getppid() != self._program:  # it died, and the pid is another's: it was our parent
            os.close(pidfd)
            self._loop.call_soon(self._stop_if_idle)
            return

        def program_exited() -> None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            self._stop_if_idle()

        self._loop.add_reader(pidfd, program_exited)

    def _stop_if_idle(self) -> None:
        if self._exit_when_idle and not self._connections and not self._table.regions:
            self.stop()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_for_want_of_descriptors()
            return
        pid, uid, gid = peer_credentials(sock)
        if not self._access.admits(pid, uid, gid):
            log.warning("refused connection from pid %d: uid %d (gid %d) is not allowed", pid, uid, gid)
            _refuse(sock, self._access.refusal(uid))
            return
        try:
            self._tenants.check_connect(uid)
        except LimitExceeded as exc:
            log.warning("refused connection from pid %d: %s", pid, exc)
            _refuse(sock, exc)
            return
        sock.setblocking(False)
        log.info("connect: pid %d, uid %d", pid, uid)
        conn = Connection(sock=sock, pid=pid, uid=uid)
        self._connections.add(conn)
        self._tenants.connected(uid)
        self._loop.add_reader(sock.fileno(), self._on_control_readable, conn)
        self._table.spawn(self._serve_connection(conn))

    def _refuse_for_want_of_descriptors(self) -> None:
        """Out of descriptors: the waiting client would hang in the backlog
        and accept() would be ready again at once (a busy loop). The spare
        descriptor kept for this moment lets us accept it and say why, then
        accepting pauses briefly."""
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
            try:
                sock, _ = self._listener.accept()
            except OSError:
                pass
            else:
                _refuse(sock, OSError(errno.EMFILE, "the pager is at its limit of open files (RLIMIT_NOFILE); "
                                                    "close regions or raise the limit (LimitNOFILE=, ulimit -n)"))
            with contextlib.suppress(OSError):
                self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if not self._accept_paused:
            try:
                open_fds = str(len(os.listdir("/proc/self/fd")))
            except OSError:
                open_fds = "all"  # listing them takes a descriptor too
            log.warning("out of file descriptors (%s open); pausing accept() for %.1f s", open_fds, _ACCEPT_PAUSE)
            self._accept_paused = True
            self._loop.remove_reader(self._listener.fileno())
            self._loop.call_later(_ACCEPT_PAUSE, self._resume_accept)

    def _resume_accept(self) -> None:
        if not self._done.done():
            self._accept_paused = False
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _stop_accepting(self) -> None:
        if not self._accept_paused:
            self._accept_paused = True
            self._loop.remove_reader(self._listener.fileno())

    async def _write_back_all(self) -> None:
        """Stopping (SIGTERM, or idle): every region's dirty pages go to its
        store first, while faults are still served, within _STOP_WRITE_BACK
        seconds; what fails is logged (it stays in the clients' memory)."""
        regions = [r for r in self._table.regions.values() if r.fill.tracking != Tracking.NONE]
        if not regions:
            return
        log.info("stopping: writing back %d regions", len(regions))
        flushes = [asyncio.ensure_future(self._flusher.flush(region)) for region in regions]
        done, pending = await asyncio.wait(flushes, timeout=_STOP_WRITE_BACK)
        for future in pending:
            future.cancel()
        failed = [(region, f.exception()) for region, f in zip(regions, flushes)
                  if f in done and f.exception() is not None]
        for region, exc in failed:
            log.error("stopping: region %d of pid %d: write-back failed: %s", region.id, region.owner_pid, exc)
        if pending:
            log.error("stopping: %d regions were still writing back after %.0f s", len(pending), _STOP_WRITE_BACK)
        written = sum(f.result()["pages"] for f in done if f.exception() is None)
        log.info("stopping: %d pages written back", written)

    def _on_control_readable(self, conn: Connection) -> None:
        try:
            message = protocol.recv(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except protocol.DescriptorsDropped as exc:
            log.warning("connection from pid %d: %s", conn.pid, exc)
            conn.inbox.put_nowait(exc)  # answered with the error; the connection stays
            return
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("connection from pid %d: %s", conn.pid, exc)
            message = None
        if message is None:
            self._loop.remove_reader(conn.sock.fileno())
        conn.inbox.put_nowait(message)

    async def _serve_connection(self, conn: Connection) -> None:
        try:
            while (item := await conn.inbox.get()) is not None:
                request, fds = item if not isinstance(item, Exception) else ({"op": None}, [])
                try:
                    if isinstance(item, Exception):
                        raise item
                    op = protocol.check_request(request)
                    if (op == "hello") == conn.greeted:
                        raise protocol.ProtocolError("hello comes first, once" if conn.greeted
                                                     else f"{op} before hello: a connection starts with hello")
                    reply = await self._handlers[op](conn, request, fds)
                except Exception as exc:  # every failure goes back to the client
                    if not isinstance(exc, (OSError, ValueError, KeyError, protocol.ProtocolError)):
                        log.exception("error: pid %d: request %r failed", conn.pid, request.get("op"))
                    else:  # the client's to handle: it gets the error
                        log.info("error: pid %d: %s: %s: %s", conn.pid, request.get("op"), type(exc).__name__, exc)
                    reply = protocol.error_reply(exc)
                finally:
                    for fd in fds:  # what a request carried and its handler did not take
                        os.close(fd)
                if not conn.greeted:
                    with contextlib.suppress(OSError):
                        protocol.send(conn.sock, reply)
                    break  # a client that does not start with hello gets one answer
                reply, out_fds = reply if isinstance(reply, tuple) else (reply, [])
                try:
                    protocol.send(conn.sock, reply, out_fds)
                except OSError as exc:
                    log.warning("cannot reply to pid %d: %s", conn.pid, exc)
                    break
                finally:
                    for fd in out_fds:
                        os.close(fd)
        finally:
            self._drop_connection(conn)

    def _drop_connection(self, conn: Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        self._tenants.disconnected(conn.uid)
        log.info("close: pid %d: connection closed, %d regions released", conn.pid, len(conn.regions))
        try:
            self._loop.remove_reader(conn.sock.fileno())
        except (ValueError, OSError):
            pass
        for region in list(conn.regions.values()):
            self._table.release_region(region)
        if conn.agent is not None:
            conn.agent.close()
        conn.sock.close()
        self._stop_if_idle()

    async def _op_hello(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        protocol.check_version(request)
        conn.greeted = True
        return {"ok": True, "v": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "uid": os.geteuid(),
                "max_resident": (self._pageout.total_cap or self._pageout.tenant_cap) * PAGE_SIZE, "takeover": self._durable is not None}

    async def _op_map(self, conn: Connection, request: dict[str, Any], fds: list[int], *,
                      region_id: int | None = None) -> dict[str, Any]:
        """A region of the client: its uffd, registered over address..+size
        and the tag page past it, and its store's descriptor, opened by the
        client with its own rights (the pager never opens a path for a
        client). The descriptors it keeps are taken out of fds."""
        named = protocol.named_descriptors(request, fds, protocol.MAP_DESCRIPTORS, protocol.REQUIRED_MAP_DESCRIPTORS)
        size, offset, address = (_require_int(request, k) for k in ("size", "offset", "address"))
        check_geometry(size, offset)
        if address % PAGE_SIZE or not 0 < address < _MAX_ADDRESS - size - PAGE_SIZE:
            raise ValueError(f"address {address:#x} is not a page-aligned user address for {size} bytes")
        tracking = parse_tracking(request.get("tracking", "async"))
        interval = parse_writeback_interval(request.get("writeback_interval"))
        policy = parse_fork_policy(request.get("fork_policy", "on-write"))
        read_ahead = parse_read_ahead(request.get("read_ahead", "adaptive"))
        max_resident = parse_max_resident(request.get("max_resident"))
        if "agent" in named and conn.agent is not None:
            raise protocol.ProtocolError("a connection hands its page-out agent once")
        if max_resident and conn.agent is None and "agent" not in named:
            raise ValueError("max_resident needs the client's page-out agent, which this client did not give")
        keep = request.get("keep_child_portions", False)
        if not isinstance(keep, bool):
            raise ValueError(f"keep_child_portions must be true or false, not {keep!r}")
        url, children_url = request.get("url"), request.get("children")
        if not isinstance(url, str) or (children_url is not None and not isinstance(children_url, str)):
            raise ValueError("url (and children, if given) must be store URLs")
        if (children_url is not None and not is_remote(children_url)) != ("children" in named):
            raise protocol.ProtocolError("children comes with its store's descriptor when it is a file, and only then")
        self._tenants.check_map(conn.uid, size)
        uffd_fd = named["uffd"]
        if conn.sock is not None:  # a region taken over was checked by the pager that mapped it
            self._check_uffd_of(conn, uffd_fd, address + size)
        kept = {name: identity_of(fd) for name, fd in named.items() if name not in ("uffd", "agent")}
        opened: list[OpenStore] = []
        pagemap_fd = -1
        try:
            store, child_store = await self._open_stores(url, children_url, named, fds, opened)
            if tracking == Tracking.ASYNC_WP:
                pagemap_fd = os.open(f"/proc/{conn.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            portion = Portion(store.store, store.allocator, size)
            portion.place_at(offset)
            fill = FillRange(address, size, portion.state, tracking, read_ahead_pages=read_ahead.pages,
                             read_ahead_fixed=read_ahead.fixed)
            region = self._table.add_region(Uffd(uffd_fd), fill, portion, owner_pid=conn.pid, fork_policy=policy,
                                            child_store=child_store, keep_child_portions=keep, region_id=region_id)
        except BaseException:
            for each in opened:
                self._table.release_store(each)
            if pagemap_fd >= 0:
                os.close(pagemap_fd)
            raise
        fds.remove(uffd_fd)  # the region's now
        if "agent" in named:
            conn.agent = Agent(self._loop, socket.socket(fileno=_claim(fds, named["agent"])))
        region.agent = conn.agent
        region.max_resident = max_resident
        region.fill.resident_limit = max_resident and max_resident + READ_AHEAD_MAX // PAGE_SIZE
        store.allocator.reserve(offset, size)
        region.pagemap_fd = pagemap_fd
        region.connection = conn
        region.uid = conn.uid
        region.holds_children_store = children_url is not None
        region.writable = _writable(store.store) and _writable(child_store.store)
        conn.regions[region.id] = region
        self._tenants.add(conn.uid, size)
        self._lineage.sync_defer_missing((region,))
        if interval:
            region.timer = self._loop.create_task(self._flusher.flush_periodically(region, interval))
        if self._durable is not None and conn.sock is not None:
            start = process_start(conn.pid)
            if start is not None:
                recorded = {k: v for k, v in request.items() if k != "op"}
                recorded["fds"] = [n for n in recorded.get("fds", []) if n != "agent"]
                region.recorded = RegionRecord(region.id, conn.pid, start, conn.uid, recorded, kept)
                self._durable.record(region.recorded)
        log.info("map: pid %d: region %d, %s, %d bytes at offset %d, %s tracking%s", conn.pid, region.id, url, size,
                 offset, tracking_name(tracking), ", encrypted" if region.encrypted else "")
        return {"ok": True, "region": region.id}

    async def _open_stores(self, url: str, children_url: str | None, named: dict[str, int], fds: list[int],
                           opened: list[OpenStore]) -> tuple[OpenStore, OpenStore]:
        """A map's store and its children's store (the same one unless
        children= names another), from the descriptors the client passed
        (those kept are taken out of fds); each is added to opened as soon as
        it is, for the caller to release on failure."""
        key = _key_from_memfd(named["key"]) if "key" in named else None
        if key is not None and any((u is not None and not is_remote(u)) != (n in named)
                                   for u, n in ((url, "catalog"), (children_url, "children_catalog"))):
            raise protocol.ProtocolError("an encrypted map carries the catalog descriptor of each file store")
        catalog = _claim(fds, named["catalog"]) if "catalog" in named else None
        store = await self._table.open_store(url, key, _claim(fds, named["store"]) if "store" in named else None,
                                             catalog)
        opened.append(store)
        child_store = store
        if children_url is not None:
            catalog = _claim(fds, named["children_catalog"]) if "children_catalog" in named else None
            child_store = await self._table.open_store(children_url, key, _claim(fds, named["children"])
                                                       if "children" in named else None, catalog)
            opened.append(child_store)
        return store, child_store

    def _record_child(self, region: ServedRegion) -> None:
        """A forked child's copy gets a row once its process is known: the
        root's request and descriptors (the child holds them too), its
        parent's row and its portion."""
        assert region.parent is not None
        parent, start = region.parent.recorded, process_start(region.owner_pid)
        if self._durable is None or parent is None or start is None:
            return
        region.recorded = dataclasses.replace(
            parent, id=region.id, pid=region.owner_pid, pid_start=start, parent=parent.id,
            offset=region.portion.offset, materialized=region.portion.state.held_runs(), released=False,
            flushing=page_runs(region.retry_pages))  # the parent's write-back in progress at fork
        region.portion.recorded_missing = region.portion.state.missing()
        self._durable.record(region.recorded)

    async def _op_reattach(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """A client whose pager died claims the regions taken over for its
        process (by id); answers the ids it now holds on this connection."""
        ids = request.get("regions")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("reattach: regions must be a list of region ids")
        named = protocol.named_descriptors(request, fds, ("agent",), ()) if "fds" in request else {}
        if "agent" in named and conn.agent is None:
            conn.agent = Agent(self._loop, socket.socket(fileno=_claim(fds, named["agent"])))
        held = []
        for region_id in ids:
            region = self._table.regions.get(region_id)
            if region is None or region.connection is not None or region.owner_pid != conn.pid \
                    or region.tenant_uid != conn.uid:
                continue
            region.connection = conn
            conn.regions[region.id] = region
            held.append(region.id)
            if conn.agent is not None and region.recorded is not None and region.agent is None:
                # Its cap again, now that its process gave a page-out agent.
                cap = parse_max_resident(region.recorded.request.get("max_resident"))
                if cap:
                    region.agent, region.max_resident = conn.agent, cap
                    region.fill.resident_limit = cap + READ_AHEAD_MAX // PAGE_SIZE
        self._taken_over["reattached"] += len(held)
        log.info("reattach: pid %d: regions %s", conn.pid, held)
        return {"ok": True, "regions": held}

    def _check_uffd_of(self, conn: Connection, fd: int, tag_address: int) -> None:
        """Trusts a descriptor as a client's uffd only if it is a userfaultfd
        of the sending process's own address space: anything else (a pipe
        with forged messages, another process's uffd) would have us act on
        what we read from it. A random token is copied into the tag page
        through the uffd, then must be what the sender's memory holds there,
        read through /proc/<pid>/mem (which never waits on a userfault: a
        missing page there reads as EIO). The client drops the page again."""
        if not is_userfaultfd(fd):
            raise ValueError("map: the descriptor given as the region's uffd is not a userfaultfd")
        token = secrets.token_bytes(32).ljust(PAGE_SIZE, b"\0")
        try:
            Uffd(fd).copy(tag_address, token)
        except OSError as exc:
            raise ValueError(f"map: the userfaultfd cannot fill the region's tag page ({exc.strerror}): "
                             "it does not have the region registered, or the tag page is in use") from None
        mem = os.open(f"/proc/{conn.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)  # EMFILE is an answer too
        try:
            seen = os.pread(mem, 32, tag_address)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EFAULT):
                raise
            seen = b""  # not present in the sender: the token went to another address space
        finally:
            os.close(mem)
        if seen != token[:32]:
            raise ValueError(f"map: the userfaultfd is not of pid {conn.pid}'s own address space")

    async def _op_unmap(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Writes back what is dirty, then releases the region. If the
        write-back fails the region stays, so that nothing is lost."""
        region = self._own_region(conn, request)
        await self._flusher.flush(region)
        self._table.release_region(region)
        log.info("unmap: pid %d: region %d", conn.pid, region.id)
        # Where the registration is mapped now, for the client to unmap:
        # the program may have moved or unmapped parts of it itself.
        return {"ok": True, "spans": region.spans}

    async def _op_reopen(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The client opened its region's store anew, for writing (after a
        flush said StoreReadOnly): the same file, or it is refused."""
        region = self._own_region(conn, request)
        named = protocol.named_descriptors(request, fds, ("store",), ("store",))
        store = region.portion.store
        if region.parent is not None or region.child_store.store is not store or not isinstance(store, FileStore):
            raise ValueError(f"region {region.id}: only a root region over one plain file store is reopened")
        new = FileStore.from_fd(store.url, _claim(fds, named["store"]))
        try:
            if not new.writable:
                raise protocol.StoreReadOnly(errno.EBADF, f"{store.url}: the descriptor sent is not open for writing")
            store.upgrade(new)
        finally:
            new.close()
        region.writable = True
        return {"ok": True}

    async def _op_flush(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        written = await self._flusher.flush(region)
        log.debug("flush: pid %d: region %d: %d pages, %d bytes written", conn.pid, region.id, written["pages"],
                  written["bytes"])
        return {"ok": True, **written}

    async def _op_prefetch(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        offset, length = _require_int(request, "offset"), _require_int(request, "length")
        size = region.fill.length
        if not 0 <= offset <= size or not 0 <= length <= size - offset:
            raise ValueError(f"prefetch: [{offset}, {offset}+{length}) is not within the region's {size} bytes")
        await self._lineage.settled(region)
        if not length:
            return {"ok": True, "pages": 0}
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        return {"ok": True, "pages": await self._faults.prefetch(region, first, end)}

    async def _op_stats(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        await self._lineage.settled(region)
        return {"ok": True, "stats": region.stats()}

    async def _op_backing(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        await self._lineage.settled(region)
        return {"ok": True, "url": region.portion.store.url, "offset": region.portion.offset}

    async def _op_adopt(self, conn: Connection, request: dict[str, Any],
                        fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A forked child claims its copy of a region its parent held (by
        that region's id, and the token its tag page's fault was filled
        with: only the process of that uffd read it), and gets a descriptor
        of its own uffd back: the kernel made that uffd in our fd table only,
        and a child that does not hold it would read zeros once we are gone.
        From then on the child is the process on this connection (its pid as
        SO_PEERCRED gives it, translated into our pid namespace)."""
        ancestor_id = _require_int(request, "region")
        token = _require_token(request)
        named = protocol.named_descriptors(request, fds, ("agent",), ()) if "fds" in request else {}
        for region in self._table.regions.values():
            if region.parent is not None and hmac.compare_digest(region.claim_token, token) \
                    and self._lineage.descends(region, ancestor_id):
                if conn.uid not in (0, region.tenant_uid):
                    raise PermissionError(f"region {region.id} is uid {region.tenant_uid}'s, not uid {conn.uid}'s")
                if region.pidfd < 0:
                    self._lineage.watch_child(region, conn.pid, peer_pidfd(conn.sock, conn.pid))
                    self._record_child(region)
                elif region.owner_pid != conn.pid:
                    raise PermissionError(f"region {region.id} was claimed by pid {region.owner_pid} already")
                if region.connection is not None and region.connection is not conn:
                    region.connection.regions.pop(region.id, None)
                region.connection = conn
                conn.regions[region.id] = region
                if "agent" in named and conn.agent is None:
                    conn.agent = Agent(self._loop, socket.socket(fileno=_claim(fds, named["agent"])))
                if conn.agent is not None and region.max_resident:  # capped in the child as in its parent
                    region.agent = conn.agent
                    region.fill.resident_limit = region.max_resident + READ_AHEAD_MAX // PAGE_SIZE
                handed_fd = os.dup(region.uffd.fd)
                if not region.handed:
                    region.handed = True
                    self._lineage.sync_defer_missing()
                    if region.pending:
                        self._loop.call_soon(self._faults.retry_now, region)
                log.info("adopt: pid %d: region %d, forked from region %d", conn.pid, region.id, ancestor_id)
                return {"ok": True, "region": region.id}, [handed_fd]
        raise KeyError(f"no forked copy of region {ancestor_id} has this claim token (pid {conn.pid})")

    async def _op_status(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The pager's counts, its tenants and a line per region, as many as
        fit one message: regions with ids above `after`, and `more_regions`
        if some were left for the next request (Pager.status() asks for
        them all). Root and the pager's own uid see every tenant's; another
        uid its own only."""
        after = request.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"status: after must be a region id (0 or more), not {after!r}")
        sees_all = conn.uid in (0, os.getuid())
        pids: dict[int, set[int]] = {}
        for each in self._connections:
            pids.setdefault(each.uid, set()).add(each.pid)
        tenants, used, _ = _fit(({"uid": uid, "regions": count, "mapped": mapped, "connections": len(pids.get(uid, ())),
                                  "pids": sorted(pids.get(uid, ()))[:_STATUS_PIDS]}
                                 for uid, (count, mapped) in sorted(self._tenants.usage().items())
                                 if sees_all or uid == conn.uid), _STATUS_BUDGET // 4)
        lines, _, more = _fit((region.summary() for region in self._table.regions.values()
                               if region.id > after and (sees_all or region.tenant_uid == conn.uid)),
                              _STATUS_BUDGET - used)
        return {
            "ok": True,
            "pid": os.getpid(),
            "connections": len(self._connections),
            "regions": len(self._table.regions),
            "portions": sum(len(s.allocator.in_use) for s in self._table.stores.values()),
            "stores": len(self._table.stores),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks(self._loop)),
            "rss_kib": _rss_kib(),
            "fetches": self._fetch_counters(),
            "internal_errors": self._internal_errors,
            "takeover": dict(self._taken_over),  # regions taken over at start, reattached, ranges woken
            "tenants": tenants,
            "region_list": lines,
            "more_regions": more,
        }

    def _fetch_counters(self) -> dict[str, int]:
        """The fetch path's counters, with the pages the stores' C paths
        (native/remote.c) placed (in "pages", and alone in "native") and have
        in flight, the pages they handed back to the fetch path, and their
        connections up."""
        fetched = self._faults.fetcher.counters()
        native = [remote_counters(s.store.remote) for s in self._table.stores.values() if s.store.remote is not None]
        placed = sum(c["placed"] for c in native)
        return {**fetched, "pages": fetched["pages"] + placed, "native": placed,
                "in_flight": fetched["in_flight"] + sum(c["in_flight"] for c in native),
                "native_handed_back": sum(c["handed_back"] for c in native),
                "native_connections": sum(c["attached"] for c in native)}

    def _own_region(self, conn: Connection, request: dict[str, Any]) -> ServedRegion:
        region = conn.regions.get(_require_int(request, "region"))
        if region is None:
            raise KeyError(f"no region {request.get('region')} on this connection")
        return region


# Bytes of a status reply's tenants and region lines; the rest of a message
# is room for its counts.
_STATUS_BUDGET = protocol.MAX_MESSAGE - 4096
_STATUS_PIDS = 16  # pids listed per tenant (all its connections are counted)


def _fit(lines: Iterable[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], int, bool]:
    """As many of lines as fit in budget bytes of JSON: (them, the bytes
    they take, whether any were left out). Lines past the first that does
    not fit are not even made (a region's line scans its dirty pages)."""
    taken: list[dict[str, Any]] = []
    used = 0
    for line in lines:
        cost = len(json.dumps(line, separators=(",", ":"))) + 1
        if used + cost > budget:
            return taken, used, True
        taken.append(line)
        used += cost
    return taken, used, False


def _hold(region: ServedRegion) -> None:
    region.holds += 1  # let go with RegionTable.let_go


def _claim(fds: list[int], fd: int) -> int:
    """Takes fd out of a request's descriptors: its new owner closes it."""
    fds.remove(fd)
    return fd


def _writable(store: Store) -> bool:
    return bool(getattr(store, "writable", True))


def _key_from_memfd(fd: int) -> Key:
    """The key a client sent in a sealed memfd (see client._key_memfd): it
    never travels as text in a message."""
    if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") and fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_WRITE:
        return Key(os.pread(fd, 64, 0))
    raise ValueError("map: the key must come in a sealed memfd")


def _refuse(sock: socket.socket, why: OSError) -> None:
    """Tells a just-accepted client why it is turned away, then hangs up:
    its error is clear (the client reads it even after its hello met the
    hang-up). It may be gone already; we never wait on it."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        protocol.send(sock, protocol.error_reply(why))
    sock.close()


def _raise_descriptor_limit() -> None:
    """Each region costs the pager three descriptors (uffd, pagemap, pidfd)
    besides its connection: lift the soft RLIMIT_NOFILE (often 1024) to the
    hard one, which is what the hard limit is for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def _require_int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, not {value!r}")
    return value


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
