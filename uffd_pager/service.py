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
from uffd_pager.layout import check_geometry, parse_tracking, parse_writeback_interval, tracking_name
from uffd_pager.stores import Store, open_store
from uffd_pager.uffd import (
    PAGE_SIZE,
    Deferred,
    FillRange,
    ForkEvent,
    PageFault,
    RemapEvent,
    RemoveEvent,
    Run,
    Tracking,
    Uffd,
    UnmapEvent,
)
from uffd_pager.writeback import merge_runs, pages_of, runs_of_pages, write_back

log = logging.getLogger("uffd_pager.pager")

# Faults that lost their target (the process exited, or the page's mapping
# changed under the copy): wake the range so any thread still waiting
# refaults. A fault outside the region (EFAULT: it was grown or partly moved
# with mremap) has no backing page and is failed like an unreadable one.
_STALE_FAULT = (-errno.ESRCH, -errno.ENOENT)


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
    pagemap_fd: int = -1  # /proc/<owner>/pagemap, for PAGEMAP_SCAN (asynchronous tracking)
    pending: list[PageFault] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=lambda: {"fork": 0, "remap": 0, "remove": 0, "unmap": 0})
    errors: int = 0
    poisoned: int = 0
    # Pages whose write-back failed: the kernel no longer reports them dirty,
    # so they are kept here and written by the next flush.
    retry_pages: set[int] = field(default_factory=set)
    flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: "asyncio.Task[None] | None" = None
    writeback: dict[str, int] = field(default_factory=lambda: {
        "flushes": 0, "pages_written": 0, "bytes_written": 0, "writeback_errors": 0})
    last_error: str = ""

    def stats(self) -> dict[str, Any]:
        counters = self.fill.counters()
        if self.fill.tracking == Tracking.ASYNC_WP and self.pagemap_fd >= 0:
            try:
                counters["dirty_pages"] = sum(r.length for r in self.fill.scan_written(self.pagemap_fd, protect=False)) // PAGE_SIZE
            except OSError:
                pass  # the owner exited
        counters["dirty_pages"] += len(self.retry_pages)
        return {
            **counters,
            **self.writeback,
            "tracking": tracking_name(self.fill.tracking),
            "events": dict(self.events),
            "errors": self.errors,
            "poisoned": self.poisoned,
            "pending": len(self.pending),
            "last_error": self.last_error,
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
            "flush": self._op_flush,
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
        tracking = parse_tracking(request.get("tracking", "async"))
        interval = parse_writeback_interval(request.get("writeback_interval"))
        store = open_store(request.get("url"))  # type: ignore[arg-type]
        pagemap_fd = -1
        try:
            if tracking == Tracking.ASYNC_WP:
                pagemap_fd = os.open(f"/proc/{conn.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            uffd = Uffd(fds[0])
            fill = FillRange(address, size, store.fill_fd, offset, tracking)
        except BaseException:
            store.close()
            if pagemap_fd >= 0:
                os.close(pagemap_fd)
            raise
        region = self._add_region(uffd, fill, store, owner_pid=conn.pid)
        region.pagemap_fd = pagemap_fd
        region.connection = conn
        conn.regions[region.id] = region
        if interval:
            region.timer = self._loop.create_task(self._flush_periodically(region, interval))
        return {"ok": True, "region": region.id}

    async def _op_unmap(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Writes back what is dirty, then releases the region. If the
        write-back fails the region stays, so that nothing is lost."""
        region = self._own_region(conn, request)
        await self.flush(region)
        self._release_region(region)
        return {"ok": True}

    async def _op_flush(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"ok": True, **(await self.flush(self._own_region(conn, request)))}

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
        if region.pagemap_fd >= 0:
            os.close(region.pagemap_fd)
        if region.timer is not None:
            region.timer.cancel()
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
            rc = region.fill.fill_fault(region.uffd, fault)
            if rc == 0:
                continue
            if rc == -errno.EAGAIN:
                still.append(fault)  # an event is unread; its readiness brings us back
            elif rc in _STALE_FAULT:
                _wake_quietly(region.uffd, fault.page)
            else:
                self._fail_page(region, fault, rc)
        region.pending = still

    # --- write-back ---------------------------------------------------------------

    async def flush(self, region: ServedRegion) -> dict[str, int]:
        """Writes every page dirtied before the call to the store and syncs
        it (msync(MS_SYNC) semantics). On failure the pages stay dirty and the
        error is raised; the next flush retries them."""
        async with region.flush_lock:
            if region.fill.tracking == Tracking.NONE or region.id not in self._regions:
                return {"pages": 0, "bytes": 0}
            runs = self._take_dirty(region)
            if not runs:
                return {"pages": 0, "bytes": 0}
            try:
                result = await self._loop.run_in_executor(None, write_back, region.store, region.owner_pid, runs)
            except OSError as exc:
                region.retry_pages |= pages_of(runs, region.fill.base)
                region.writeback["writeback_errors"] += 1
                region.last_error = str(exc)
                raise
            region.writeback["flushes"] += 1
            region.writeback["pages_written"] += result.pages
            region.writeback["bytes_written"] += result.bytes
            return {"pages": result.pages, "bytes": result.bytes}

    def _take_dirty(self, region: ServedRegion) -> list[Run]:
        """The dirty pages, write-protected again in the same step; pages a
        failed flush left behind are added (those still resident)."""
        fill = region.fill
        if fill.tracking == Tracking.SYNC_WP:
            runs = fill.take_dirty(region.uffd)
        else:
            runs = fill.scan_written(region.pagemap_fd, protect=True)
        if region.retry_pages:
            base = fill.base
            retry = {p for p in region.retry_pages if fill.is_resident(base + p * PAGE_SIZE)}
            region.retry_pages.clear()
            runs = merge_runs(runs + runs_of_pages(retry, base, fill.src_offset))
        return runs

    async def _flush_periodically(self, region: ServedRegion, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(region)
            except OSError as exc:
                log.warning("region %d: periodic write-back failed (will retry): %s", region.id, exc)

    def _fail_page(self, region: ServedRegion, fault: PageFault, rc: int) -> None:
        """The page's data could not be produced (the store failed, or the
        address is outside the region). It is never handed out as zeros:
        poison it, so the access raises SIGBUS in the client."""
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
            fill = FillRange(parent.fill.base, parent.fill.length, parent.store.fill_fd, parent.fill.src_offset,
                             parent.fill.tracking)
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

