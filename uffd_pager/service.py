"""The pager: an asyncio (uvloop) service that serves page faults of client
processes and answers their control requests.

Kernel facts the service relies on
----------------------------------
A userfaultfd is bound to the address space (mm) of the process that created
it, not to the process holding the descriptor: clients create and register
it, then pass it here over the control socket, and every UFFDIO_* ioctl issued
from this process acts on the client's memory. A faulting client thread
sleeps in the kernel until a UFFDIO_COPY/ZEROPAGE/WAKE covers its address,
holding whatever it held (the GIL included), so nothing here may ever wait
for a client.

``read()`` on a uffd returns pending page faults before events (FORK, REMAP,
REMOVE, UNMAP). While an event is unread, every ioctl on that uffd fails with
EAGAIN, and the client that caused the event (forking, mremapping, unmapping)
is blocked until the event is read. So a fault that fails with EAGAIN is
kept, the uffd is drained, the events are applied, and the fault is retried;
events never wait behind a slow fetch. The descriptors are level-triggered in
the event loop, so anything still unread brings us back.

A FORK event carries the child's new uffd, already installed in *our* fd
table when we read it, but no pid: the child is known from its first fault's
thread id (UFFD_FEATURE_THREAD_ID). There is no exit event: after a client
exits, ioctls on its uffd fail with ESRCH, so owners are watched with a pidfd
(readable when the process exits) and control connections with EOF.

The hot path (read a batch, pread, UFFDIO_COPY) runs in C (`FillRange.serve`);
this module handles what C hands back.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from uffd_pager import protocol
from uffd_pager.stores import Store, open_store
from uffd_pager.layout import check_geometry
from uffd_pager.uffd import (
    PAGE_SIZE,
    Deferred,
    FillRange,
    ForkEvent,
    PageFault,
    RemapEvent,
    RemoveEvent,
    Uffd,
    UnmapEvent,
)

log = logging.getLogger("uffd_pager.pager")

# Faults that lost their target (the process exited, or the page's mapping
# changed or went away): wake the range so any thread still waiting refaults.
_STALE_FAULT = (-errno.ESRCH, -errno.ENOENT, -errno.EFAULT)


@dataclass(eq=False)
class ServedRegion:
    """One registered range of one client address space."""

    id: int
    uffd: Uffd
    fill: FillRange
    store: Store
    owner_pid: int
    parent: "ServedRegion | None" = None
    connection: "Connection | None" = None
    pidfd: int = -1
    pending: list[PageFault] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=lambda: {"fork": 0, "remap": 0, "remove": 0, "unmap": 0})
    errors: int = 0
    poisoned: int = 0

    def stats(self) -> dict[str, Any]:
        return {
            **self.fill.counters(),
            "events": dict(self.events),
            "errors": self.errors,
            "poisoned": self.poisoned,
            "pending": len(self.pending),
        }


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    pid: int
    uid: int
    regions: dict[int, ServedRegion] = field(default_factory=dict)
    inbox: "asyncio.Queue[tuple[dict[str, Any], list[int]] | None]" = field(default_factory=asyncio.Queue)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class PagerService:
    def __init__(self, listener: socket.socket, *, exit_when_idle: bool = False) -> None:
        self._listener = listener
        self._listener.setblocking(False)
        self._exit_when_idle = exit_when_idle
        self._loop = asyncio.get_running_loop()
        self._connections: set[Connection] = set()
        self._regions: dict[int, ServedRegion] = {}
        self._next_region_id = 1
        self._done = self._loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, Callable[[Connection, dict[str, Any], list[int]], Awaitable[dict[str, Any]]]] = {
            "hello": self._op_hello,
            "map": self._op_map,
            "unmap": self._op_unmap,
            "stats": self._op_stats,
            "status": self._op_status,
        }

    async def serve(self, *, idle_timeout: float = 10.0) -> None:
        """Runs until stopped; an embedded pager also stops once idle."""
        self._loop.add_reader(self._listener.fileno(), self._accept)
        if self._exit_when_idle:
            # An embedded pager whose parent died before connecting stops too.
            self._loop.call_later(idle_timeout, self._stop_if_idle)
        try:
            await self._done
        finally:
            self._loop.remove_reader(self._listener.fileno())
            for region in list(self._regions.values()):
                self._release_region(region)
            for conn in list(self._connections):
                self._drop_connection(conn)

    def stop(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _stop_if_idle(self) -> None:
        if self._exit_when_idle and not self._connections and not self._regions:
            self.stop()

    # --- control connections -------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _gid = peer_credentials(sock)
        if uid not in (0, os.getuid()):
            log.warning("refused connection from pid %d: uid %d is neither root nor %d", pid, uid, os.getuid())
            sock.close()
            return
        sock.setblocking(False)
        conn = Connection(sock=sock, pid=pid, uid=uid)
        self._connections.add(conn)
        self._loop.add_reader(sock.fileno(), self._on_control_readable, conn)
        task = self._loop.create_task(self._serve_connection(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_control_readable(self, conn: Connection) -> None:
        try:
            message = protocol.recv(conn.sock)
        except (BlockingIOError, InterruptedError):
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
                request, fds = item
                handler = self._handlers.get(str(request.get("op")))
                try:
                    if handler is None:
                        raise protocol.ProtocolError(f"unknown request {request.get('op')!r}")
                    reply = await handler(conn, request, fds)
                except Exception as exc:  # every failure goes back to the client
                    for fd in fds:
                        os.close(fd)
                    if not isinstance(exc, (OSError, ValueError, protocol.ProtocolError)):
                        log.exception("request %r failed", request.get("op"))
                    reply = protocol.error_reply(exc)
                try:
                    protocol.send(conn.sock, reply)
                except OSError as exc:
                    log.warning("cannot reply to pid %d: %s", conn.pid, exc)
                    break
        finally:
            self._drop_connection(conn)

    def _drop_connection(self, conn: Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        try:
            self._loop.remove_reader(conn.sock.fileno())
        except (ValueError, OSError):
            pass
        for region in list(conn.regions.values()):
            self._release_region(region)
        conn.sock.close()
        self._stop_if_idle()

    # --- requests ---------------------------------------------------------------

    async def _op_hello(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        version = request.get("v")
        if version != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                f"client speaks protocol version {version}, this pager speaks {protocol.PROTOCOL_VERSION}"
            )
        return {"ok": True, "v": protocol.PROTOCOL_VERSION, "pid": os.getpid()}

    async def _op_map(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            raise protocol.ProtocolError(f"map carries exactly one userfaultfd, got {len(fds)} descriptors")
        size, offset, address = (_require_int(request, k) for k in ("size", "offset", "address"))
        check_geometry(size, offset)
        if address % PAGE_SIZE:
            raise ValueError(f"address {address:#x} is not page aligned")
        store = open_store(request.get("url"))  # type: ignore[arg-type]
        try:
            uffd = Uffd(fds[0])
            fill = FillRange(address, size, store.fill_fd, offset)
        except BaseException:
            store.close()
            raise
        region = self._add_region(uffd, fill, store, owner_pid=conn.pid)
        region.connection = conn
        conn.regions[region.id] = region
        return {"ok": True, "region": region.id}

    async def _op_unmap(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        self._release_region(region)
        return {"ok": True}

    async def _op_stats(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"ok": True, "stats": self._own_region(conn, request).stats()}

    async def _op_status(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "connections": len(self._connections),
            "regions": len(self._regions),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks(self._loop)),
            "rss_kib": _rss_kib(),
        }

    def _own_region(self, conn: Connection, request: dict[str, Any]) -> ServedRegion:
        region = conn.regions.get(_require_int(request, "region"))
        if region is None:
            raise KeyError(f"no region {request.get('region')} on this connection")
        return region

    # --- regions and faults ---------------------------------------------------

    def _add_region(self, uffd: Uffd, fill: FillRange, store: Store, owner_pid: int,
                    parent: ServedRegion | None = None) -> ServedRegion:
        region = ServedRegion(id=self._next_region_id, uffd=uffd, fill=fill, store=store,
                              owner_pid=owner_pid, parent=parent)
        self._next_region_id += 1
        self._regions[region.id] = region
        os.set_blocking(uffd.fd, False)
        self._loop.add_reader(uffd.fd, self._on_faults, region)
        return region

    def _release_region(self, region: ServedRegion) -> None:
        if self._regions.pop(region.id, None) is None:
            return
        self._loop.remove_reader(region.uffd.fd)
        if region.pidfd >= 0:
            self._loop.remove_reader(region.pidfd)
            os.close(region.pidfd)
        if region.connection is not None:
            region.connection.regions.pop(region.id, None)
        region.uffd.close()
        region.fill.close()
        # A forked child's region shares its parent's store object.
        if region.parent is None and not any(r.store is region.store for r in self._regions.values()):
            region.store.close()
        self._stop_if_idle()

    def _on_faults(self, region: ServedRegion) -> None:
        try:
            _served, deferred = region.fill.serve(region.uffd)
        except OSError as exc:
            log.warning("region %d: %s; releasing it", region.id, exc)
            self._release_region(region)
            return
        for item in deferred:
            self._take(region, item)
        if region.pending:
            self._retry_pending(region)
        if region.parent is not None and region.pidfd < 0 and region.id in self._regions:
            self._watch_child(region)

    def _take(self, region: ServedRegion, item: Deferred) -> None:
        event = item.event
        if isinstance(event, PageFault):
            region.pending.append(event)
        elif isinstance(event, ForkEvent):
            region.events["fork"] += 1
            self._adopt_fork_child(region, event)
        elif isinstance(event, RemapEvent):
            region.events["remap"] += 1
            self._apply_remap(region, event)
        elif isinstance(event, RemoveEvent):
            region.events["remove"] += 1
            region.fill.forget(event.start, event.end)
        elif isinstance(event, UnmapEvent):
            region.events["unmap"] += 1
            region.fill.forget(event.start, event.end)
            if event.start <= region.fill.base and event.end >= region.fill.base + region.fill.length:
                self._release_region(region)

    def _retry_pending(self, region: ServedRegion) -> None:
        still: list[PageFault] = []
        for fault in region.pending:
            if fault.wp:
                rc = self._unprotect(region, fault.page)
            else:
                rc = region.fill.fill_page(region.uffd, fault.address)
            if rc == 0:
                continue
            if rc == -errno.EAGAIN:
                still.append(fault)  # an event is unread; its readiness brings us back
            elif rc in _STALE_FAULT:
                _wake_quietly(region.uffd, fault.page)
            else:
                self._fail_page(region, fault, rc)
        region.pending = still

    def _unprotect(self, region: ServedRegion, page: int) -> int:
        try:
            region.uffd.writeprotect(page, PAGE_SIZE, protect=False)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def _fail_page(self, region: ServedRegion, fault: PageFault, rc: int) -> None:
        """The page's data could not be produced. It is never handed out as
        zeros: poison it, so the access raises SIGBUS in the client."""
        region.errors += 1
        log.error("region %d: page %#x of pid %d cannot be filled: %s; poisoning it",
                  region.id, fault.page, region.owner_pid, os.strerror(-rc))
        try:
            region.uffd.poison(fault.page, PAGE_SIZE)
            region.poisoned += 1
        except OSError as exc:
            log.error("region %d: UFFDIO_POISON failed too: %s", region.id, exc)

    def _apply_remap(self, region: ServedRegion, event: RemapEvent) -> None:
        fill = region.fill
        if event.old == fill.base and event.length == fill.length:
            fill.move(event.new)
            return
        # Only part of the range moved: the moved pages keep their contents in
        # the client and are no longer ours; forget them so faults on what is
        # left are served from the store.
        log.warning("region %d: partial mremap of %#x+%#x; the moved part is no longer paged",
                    region.id, event.old, event.length)
        fill.forget(event.old, event.old + event.length)

    def _adopt_fork_child(self, parent: ServedRegion, event: ForkEvent) -> None:
        """A child inherits the mapping: the kernel shares the pages resident
        at fork copy-on-write; its missing pages fault into the new uffd,
        served from the parent's store."""
        child_uffd = Uffd(event.uffd)
        try:
            fill = FillRange(parent.fill.base, parent.fill.length, parent.store.fill_fd, parent.fill.src_offset)
        except BaseException:
            child_uffd.close()
            raise
        self._add_region(child_uffd, fill, parent.store, owner_pid=0, parent=parent)

    def _watch_child(self, region: ServedRegion) -> None:
        """Learns a forked child's pid from its first fault and watches it."""
        tid = region.fill.last_thread_id
        if not tid:
            return
        pid = _thread_group(tid)
        if pid is None:
            return
        try:
            region.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._release_region(region)
            return
        region.owner_pid = pid
        self._loop.add_reader(region.pidfd, self._release_region, region)


def _require_int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, not {value!r}")
    return value


def _wake_quietly(uffd: Uffd, page: int) -> None:
    try:
        uffd.wake(page, PAGE_SIZE)
    except OSError:
        pass


def _thread_group(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

