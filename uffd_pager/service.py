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
REMOVE, UNMAP). While an event is unread, UFFDIO_COPY, ZEROPAGE,
WRITEPROTECT, CONTINUE, POISON and MOVE fail with EAGAIN (the kernel's
``mmap_changing``); WAKE and (UN)REGISTER do not. The client that caused the
event (forking, mremapping, unmapping) is blocked until the event is read.
So a fault that fails with EAGAIN is kept, the uffd is drained, the events
are applied, and the fault is retried; events never wait behind a slow
fetch. After a FORK event is read, ``mmap_changing`` stays raised until the
forking thread itself runs again, and nothing new need arrive on the uffd to
bring us back: a fault deferred by EAGAIN is therefore retried on a timer
(backing off to a few milliseconds) until it is served.

A FORK event carries the child's new uffd, already installed in *our* fd
table when we read it, but no pid; the forking parent is blocked until we
read it. Every fault on that uffd comes from the child, so its first fault's
thread id (UFFD_FEATURE_THREAD_ID) names it; a child's library makes sure
there is one by reading the region's tag page (the page past the region,
which the root process never touches) before it first talks to the pager.
There is no exit event: after a process exits, ioctls on its uffd fail with
ESRCH, so owners are watched with a pidfd (readable when the process exits),
control connections with EOF, and children not yet known by a periodic
probe of their uffd.

The hot path (read a batch, pread, UFFDIO_COPY) runs in C (`FillRange.serve`);
this module handles what C hands back: a page of a store without a local
descriptor comes back as -EOPNOTSUPP and is fetched (fetch.py), then
placed with `FillRange.place`.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
import secrets
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from uffd_pager import protocol
from uffd_pager.fetch import Fetcher, Result
from uffd_pager.layout import (
    Portion,
    PortionAllocator,
    check_geometry,
    copy_to_children,
    cut_span,
    move_span,
    parse_fork_policy,
    parse_tracking,
    parse_writeback_interval,
)
from uffd_pager.crypto import Key, PageAuthError
from uffd_pager.served import OpenStore, ServedRegion
from uffd_pager.stores import FileStore, Store, is_remote, open_store
from uffd_pager.stores.base import BadPage, UnauthenticPage
from uffd_pager.tenants import TenantLimits, Tenants
from uffd_pager.uffd import (
    PAGE_SIZE,
    is_userfaultfd,
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
    present_pages,
)
from uffd_pager.writeback import merge_runs, pages_of, runs_of_pages, write_back

log = logging.getLogger("uffd_pager.pager")

# Faults that lost their target (the process exited, or the page's mapping
# changed under the copy): wake the range so any thread still waiting
# refaults. A fault outside the region (EFAULT: it was grown or partly moved
# with mremap) has no backing page and is failed like an unreadable one.
_STALE_FAULT = (-errno.ESRCH, -errno.ENOENT)

# How often forked children not yet known by pid are probed for exit.
_CHILD_PROBE_INTERVAL = 1.0

# How long a forked child's faults wait for it to claim its uffd (see
# PagerService._wait_for_hand).
_HAND_TIMEOUT = 30.0

# fcntl(2) memfd seals (the fcntl module of 3.11 lacks them on some builds).
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)

# Highest user address plus one (x86-64, 5-level page tables at most).
_MAX_ADDRESS = 1 << 56

# How long accept() pauses when the pager is out of descriptors.
_ACCEPT_PAUSE = 0.5


# A request's answer, with the descriptors it hands over (adopt: a uffd).
Reply = dict[str, Any] | tuple[dict[str, Any], list[int]]


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    pid: int
    uid: int
    regions: dict[int, ServedRegion] = field(default_factory=dict)
    greeted: bool = False  # its hello was answered
    # Requests with their descriptors; an exception to answer with; None at EOF.
    inbox: "asyncio.Queue[tuple[dict[str, Any], list[int]] | Exception | None]" = field(default_factory=asyncio.Queue)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class PagerService:
    def __init__(self, listener: socket.socket, *, exit_when_idle: bool = False,
                 limits: TenantLimits | None = None, state_dir: str | None = None) -> None:
        self._listener = listener
        self._listener.setblocking(False)
        self._exit_when_idle = exit_when_idle
        self._loop = asyncio.get_running_loop()
        self._connections: set[Connection] = set()
        self._regions: dict[int, ServedRegion] = {}
        self._stores: dict[tuple[object, ...], OpenStore] = {}
        self._next_region_id = 1
        self._done = self._loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._child_probe: asyncio.TimerHandle | None = None
        self._accept_paused = False
        self._tenants = Tenants(limits or TenantLimits())
        self._fetcher = Fetcher(self._loop, self._fetched)
        self._state_dir = state_dir  # encrypted stores' anchors (None: catalog.default_state_dir())
        _raise_descriptor_limit()
        self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self._handlers: dict[str, Callable[[Connection, dict[str, Any], list[int]], Awaitable[Reply]]] = {
            "hello": self._op_hello,
            "map": self._op_map,
            "unmap": self._op_unmap,
            "flush": self._op_flush,
            "stats": self._op_stats,
            "backing": self._op_backing,
            "adopt": self._op_adopt,
            "reopen": self._op_reopen,
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
            if not self._accept_paused:
                self._loop.remove_reader(self._listener.fileno())
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
            self._fetcher.close()
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
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_for_want_of_descriptors()
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
        self._spawn(self._serve_connection(conn))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                with contextlib.suppress(OSError):
                    protocol.send(sock, protocol.error_reply(OSError(
                        errno.EMFILE, "the pager is at its limit of open files (RLIMIT_NOFILE); "
                                      "close regions or raise the limit (LimitNOFILE=, ulimit -n)")))
                sock.close()
            with contextlib.suppress(OSError):
                self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if not self._accept_paused:
            log.warning("out of file descriptors (%s open); pausing accept() for %.1f s",
                        len(os.listdir("/proc/self/fd")), _ACCEPT_PAUSE)
            self._accept_paused = True
            self._loop.remove_reader(self._listener.fileno())
            self._loop.call_later(_ACCEPT_PAUSE, self._resume_accept)

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if not self._done.done():
            self._loop.add_reader(self._listener.fileno(), self._accept)

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
                        log.exception("request %r failed", request.get("op"))
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
        protocol.check_version(request)
        conn.greeted = True
        return {"ok": True, "v": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "uid": os.geteuid()}

    async def _op_map(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
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
        keep = request.get("keep_child_portions", False)
        if not isinstance(keep, bool):
            raise ValueError(f"keep_child_portions must be true or false, not {keep!r}")
        url, children_url = request.get("url"), request.get("children")
        if not isinstance(url, str) or (children_url is not None and not isinstance(children_url, str)):
            raise ValueError("url (and children, if given) must be store URLs")
        if (children_url is None) != ("children" not in named):
            raise protocol.ProtocolError("children comes with its store's descriptor, and only then")
        self._tenants.check_map(conn.uid, size)
        uffd_fd = named["uffd"]
        self._check_uffd_of(conn, uffd_fd, address + size)
        key = _key_from_memfd(named["key"]) if "key" in named else None
        opened: list[OpenStore] = []
        pagemap_fd = -1
        try:
            if key is not None and any((u is not None and not is_remote(u)) != (n in named)
                                       for u, n in ((url, "catalog"), (children_url, "children_catalog"))):
                raise protocol.ProtocolError("an encrypted map carries the catalog descriptor of each file store")
            catalog = _claim(fds, named["catalog"]) if "catalog" in named else None
            store = await self._open_store(url, key, _claim(fds, named["store"]) if "store" in named else None,
                                           catalog)
            opened.append(store)
            child_store = store
            if children_url is not None:
                catalog = _claim(fds, named["children_catalog"]) if "children_catalog" in named else None
                child_store = await self._open_store(children_url, key, _claim(fds, named["children"])
                                                     if "children" in named else None, catalog)
                opened.append(child_store)
            if tracking == Tracking.ASYNC_WP:
                pagemap_fd = os.open(f"/proc/{conn.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            portion = Portion(store.store, store.allocator, size)
            portion.place_at(offset)
            fill = FillRange(address, size, portion.state, tracking)
            region = self._add_region(Uffd(uffd_fd), fill, portion, owner_pid=conn.pid, fork_policy=policy,
                                      child_store=child_store, keep_child_portions=keep)
        except BaseException:
            for each in opened:
                self._release_store(each)
            if pagemap_fd >= 0:
                os.close(pagemap_fd)
            raise
        fds.remove(uffd_fd)  # the region's now
        store.allocator.reserve(offset, size)
        region.pagemap_fd = pagemap_fd
        region.connection = conn
        region.uid = conn.uid
        region.holds_children_store = children_url is not None
        region.writable = _writable(store.store) and _writable(child_store.store)
        conn.regions[region.id] = region
        self._tenants.add(conn.uid, size)
        self._sync_defer_missing()
        if interval:
            region.timer = self._loop.create_task(self._flush_periodically(region, interval))
        return {"ok": True, "region": region.id}

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
        await self.flush(region)
        self._release_region(region)
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
        return {"ok": True, **(await self.flush(self._own_region(conn, request)))}

    async def _op_stats(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        await self._settled(region)
        return {"ok": True, "stats": region.stats()}

    async def _op_backing(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        region = self._own_region(conn, request)
        await self._settled(region)
        return {"ok": True, "url": region.portion.store.url, "offset": region.portion.offset}

    async def _op_adopt(self, conn: Connection, request: dict[str, Any],
                        fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A forked child claims its copy of a region its parent held (by
        that region's id), and gets a descriptor of its own uffd back: the
        kernel made that uffd in our fd table only, and a child that does
        not hold it would read zeros once we are gone. Its tag-page fault
        has told us its pid already."""
        ancestor_id = _require_int(request, "region")
        for region in self._regions.values():
            if region.owner_pid == conn.pid and region.parent is not None and self._descends(region, ancestor_id):
                if region.connection is not None and region.connection is not conn:
                    region.connection.regions.pop(region.id, None)
                region.connection = conn
                conn.regions[region.id] = region
                handed_fd = os.dup(region.uffd.fd)
                if not region.handed:
                    region.handed = True
                    self._sync_defer_missing()
                    if region.pending:
                        self._loop.call_soon(self._retry_now, region)
                return {"ok": True, "region": region.id}, [handed_fd]
        raise KeyError(f"pid {conn.pid} holds no forked copy of region {ancestor_id}")

    async def _op_status(self, conn: Connection, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "connections": len(self._connections),
            "regions": len(self._regions),
            "portions": sum(len(s.allocator.in_use) for s in self._stores.values()),
            "stores": len(self._stores),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks(self._loop)),
            "rss_kib": _rss_kib(),
        }

    def _own_region(self, conn: Connection, request: dict[str, Any]) -> ServedRegion:
        region = conn.regions.get(_require_int(request, "region"))
        if region is None:
            raise KeyError(f"no region {request.get('region')} on this connection")
        return region

    @staticmethod
    def _descends(region: ServedRegion, ancestor_id: int) -> bool:
        node = region.parent
        while node is not None:
            if node.id == ancestor_id:
                return True
            node = node.parent
        return False

    # --- stores -------------------------------------------------------------------

    async def _open_store(self, url: str, key: Key | None, fd: int | None,
                          catalog_fd: int | None = None) -> OpenStore:
        store = await open_store(url, key, fd=fd, catalog_fd=catalog_fd, state_dir=self._state_dir)
        try:
            identity = store.identity
            shared = self._stores.get(identity)
            if shared is not None and shared.store.key_id != store.key_id:
                raise PermissionError(errno.EACCES, f"{store.url} is in use with "
                                      f"{'another key' if shared.store.key_id else 'no key'} by another region")
        except BaseException:
            store.close()
            raise
        if shared is None:
            shared = self._stores[identity] = OpenStore(store, PortionAllocator(store))
        else:
            if isinstance(store, FileStore) and isinstance(shared.store, FileStore):
                shared.store.upgrade(store)  # write-back of the regions that may write needs a writable one
            store.close()  # one descriptor per file is enough
        shared.users += 1
        return shared

    def _release_store(self, shared: OpenStore) -> None:
        shared.users -= 1
        if shared.users == 0:
            self._stores.pop(shared.store.identity, None)
            shared.store.close()

    def _store_of(self, portion: Portion) -> OpenStore:
        return self._stores[portion.store.identity]

    # --- regions and faults ---------------------------------------------------

    def _add_region(self, uffd: Uffd, fill: FillRange, portion: Portion, *, owner_pid: int, fork_policy: str,
                    child_store: OpenStore, keep_child_portions: bool,
                    parent: ServedRegion | None = None) -> ServedRegion:
        region = ServedRegion(id=self._next_region_id, uffd=uffd, fill=fill, portion=portion,
                              owner_pid=owner_pid, fork_policy=fork_policy, child_store=child_store,
                              keep_child_portions=keep_child_portions, parent=parent,
                              spans=[(fill.base, fill.base + fill.length + PAGE_SIZE)])
        os.set_blocking(uffd.fd, False)
        self._loop.add_reader(uffd.fd, self._on_faults, region)  # first: if it fails, nothing is left behind
        self._next_region_id += 1
        self._regions[region.id] = region
        return region

    @contextlib.contextmanager
    def _holding(self, region: ServedRegion) -> Iterator[None]:
        """Keeps the region's descriptors, native state and portions alive
        while an operation uses them across an await (or a worker thread):
        a region released meanwhile (its process exited; a child pruned by
        its own flush) is torn down when the last holder lets go, so nothing
        ever acts on freed state or on a descriptor number reused since."""
        region.holds += 1
        try:
            yield
        finally:
            self._let_go(region)

    def _let_go(self, region: ServedRegion) -> None:
        """Ends one hold (see _holding) taken by hand."""
        region.holds -= 1
        if region.released and region.holds == 0:
            self._tear_down(region)

    def _release_region(self, region: ServedRegion) -> None:
        """Stops serving the region at once; its state goes when unused."""
        if self._regions.pop(region.id, None) is None:
            return
        region.released = True
        if region.parent is None and region.uid is not None:
            self._tenants.remove(region.uid, region.fill.length)
        self._loop.remove_reader(region.uffd.fd)
        if region.pidfd >= 0:
            self._loop.remove_reader(region.pidfd)
        if region.timer is not None:
            region.timer.cancel()
        if region.retry_timer is not None:
            region.retry_timer.cancel()
            region.retry_timer = None
        if region.connection is not None:
            region.connection.regions.pop(region.id, None)
        if region.holds == 0:
            self._tear_down(region)
        self._sync_defer_missing()
        self._stop_if_idle()

    def _tear_down(self, region: ServedRegion) -> None:
        for fd in (region.pidfd, region.pagemap_fd):
            if fd >= 0:
                os.close(fd)
        region.pidfd = region.pagemap_fd = -1
        region.uffd.close()
        region.fill.close()
        region.portion.in_use_by_region = False
        if region.copy_lock.locked():
            # A copy in this lineage (in a worker thread, maybe into this very
            # portion) is under way: its native state goes once it is done.
            self._spawn(self._free_after_copies(region))
        else:
            self._free_region_portions(region)

    async def _free_after_copies(self, region: ServedRegion) -> None:
        async with region.copy_lock:
            self._free_region_portions(region)

    def _free_region_portions(self, region: ServedRegion) -> None:
        self._free_portions(region.portion, keep=region.parent is not None and region.keep_child_portions)
        if region.holds_children_store:
            self._release_store(region.child_store)  # the use map(children=...) took, even of the same file

    def _free_portions(self, portion: Portion | None, *, keep: bool) -> None:
        """Frees a portion no region uses and no child inherits from, then
        its parent if that was the parent's last reason to stay."""
        while portion is not None and not portion.in_use_by_region and not portion.children:
            parent = portion.parent
            shared = self._store_of(portion)
            if portion.placed:
                # A root portion is the user's data: never handed out again.
                slot = portion.allocator.release(portion.offset, reuse=parent is not None and not keep)
                if slot is not None:
                    shared.users += 1  # the discard's, until it is done
                    self._spawn(self._discard_slot(shared, *slot))
            if parent is not None:
                parent.children.remove(portion)
            self._release_store(shared)  # each portion holds one use of its store
            portion.state.close()
            portion, keep = parent, False

    async def _discard_slot(self, shared: OpenStore, offset: int, length: int) -> None:
        """An exited child's portion is discarded before its slot is reused
        (it may hold the child's bytes; a new portion must read as zero)."""
        discarded = False
        try:
            await shared.store.discard(offset, length)
            discarded = True
        except OSError as exc:
            log.warning("%s: discarding an exited child's portion at %d failed (the slot is not reused): %s",
                        shared.store.url, offset, exc)
        finally:
            shared.allocator.add_free(offset, length, discarded=discarded)
            self._release_store(shared)

    def _on_faults(self, region: ServedRegion) -> None:
        with self._holding(region):
            self._serve_faults(region)
        self._fetcher.send_all()  # the faults of this read, in one batch per store

    def _serve_faults(self, region: ServedRegion) -> None:
        try:
            _served, deferred = region.fill.serve(region.uffd)
        except OSError as exc:
            log.warning("region %d: %s; releasing it", region.id, exc)
            self._release_region(region)
            return
        for item in deferred:
            self._take(region, item)
            if region.released:
                return
        if region.parent is not None and region.pidfd < 0:
            self._learn_child_pid(region)
            if region.released:
                return
        if region.pending:
            self._retry_pending(region)
        if region.parent is not None and not region.released and not region.portion.placed \
                and region.fill.counters()["faults"] > region.tag_faults:
            region.portion.place()  # claim 7: the child's offset is chosen at its first access

    def _take(self, region: ServedRegion, item: Deferred) -> None:
        event = item.event
        if isinstance(event, PageFault):
            if item.status == -errno.EOPNOTSUPP:
                self._fetch(region, event)  # its page is in a store without a descriptor
            else:
                region.pending.append(event)
        elif isinstance(event, ForkEvent):
            region.events["fork"] += 1
            self._adopt_fork_child(region, event)
        elif isinstance(event, RemapEvent):
            region.events["remap"] += 1
            self._apply_remap(region, event)
        elif isinstance(event, RemoveEvent):
            if (event.start, event.end) != (region.tag_address, region.tag_address + PAGE_SIZE):
                region.events["remove"] += 1  # not the library's own drop of the tag page
            region.fill.forget(event.start, event.end)
        elif isinstance(event, UnmapEvent):
            region.events["unmap"] += 1
            region.fill.forget(event.start, event.end)
            region.spans = cut_span(region.spans, event.start, event.end)
            # A forked child that unmapped its copy is done with it. A root
            # region stays until its client closes it or goes away.
            if not region.spans and region.parent is not None:
                self._release_region(region)

    def _retry_pending(self, region: ServedRegion) -> None:
        still: list[PageFault] = []
        waiting_for_hand = False
        for fault in region.pending:
            if fault.page in region.unfillable:
                rc = self._fail_page(region, fault, region.unfillable[fault.page])
            elif fault.page in region.fetched:
                rc = region.fill.place(region.uffd, fault, region.fetched[fault.page])
                if rc != -errno.EAGAIN:
                    del region.fetched[fault.page]
            elif fault.page == region.tag_address:
                rc = self._serve_tag_page(region, fault)
            elif not region.handed and not fault.wp:
                rc = self._wait_for_hand(region, fault)
                waiting_for_hand = waiting_for_hand or rc == -errno.EAGAIN
            elif region.fork_policy == "on-access" and region.fill.defer_missing and not fault.wp:
                rc = self._serve_deferred(region, fault)
            else:
                rc = region.fill.fill_fault(region.uffd, fault)
            if rc in (0, -errno.EINPROGRESS):  # served, or a task serves it
                continue
            if rc == -errno.EOPNOTSUPP:
                self._fetch(region, fault)
                continue
            if rc == -errno.EAGAIN:
                still.append(fault)
            elif rc in _STALE_FAULT:
                _wake_quietly(region.uffd, fault.page)
            else:
                rc = self._fail_page(region, fault, rc)
                if rc == -errno.EAGAIN:
                    still.append(fault)
        region.pending = still
        if still:
            self._schedule_retry(region, slow=waiting_for_hand)
        else:
            region.retry_delay = 0.0

    def _schedule_retry(self, region: ServedRegion, *, slow: bool = False) -> None:
        """EAGAIN after a FORK event lasts until the forking thread runs
        again, with nothing new to read on the uffd: retry on a timer, from
        50 us backing off to 5 ms (100 ms while a child is not handed its
        uffd yet: its adopt request brings us back sooner)."""
        if region.retry_timer is not None or region.released:
            return
        region.retry_delay = 0.1 if slow else min(max(region.retry_delay * 2, 50e-6), 5e-3)
        region.retry_timer = self._loop.call_later(region.retry_delay, self._retry_now, region)

    def _retry_now(self, region: ServedRegion) -> None:
        region.retry_timer = None
        if not region.released:
            with self._holding(region):
                self._serve_faults(region)

    def _wait_for_hand(self, region: ServedRegion, fault: PageFault) -> int:
        """A forked child's fault before its library took its own uffd back
        (see ServedRegion.handed) waits; after _HAND_TIMEOUT it fails loudly
        (the page is poisoned: SIGBUS), since a process forked without
        os.fork() never claims it, and serving it would leave the child
        reading zeros if this pager died."""
        if self._loop.time() - region.forked_at < _HAND_TIMEOUT:
            return -errno.EAGAIN
        log.error("region %d: pid %d touched its forked copy without claiming it from the pager for %.0f s "
                  "(forked without os.fork()?); failing the access", region.id, region.owner_pid, _HAND_TIMEOUT)
        return -errno.ENOLCK

    def _serve_tag_page(self, region: ServedRegion, fault: PageFault) -> int:
        """The tag page reads as zeros; its fault has served its purpose."""
        region.tag_faults += 1
        try:
            region.uffd.zeropage(fault.page, PAGE_SIZE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                return -(exc.errno or errno.EIO)
            _wake_quietly(region.uffd, fault.page)
        return 0

    def _fetch(self, region: ServedRegion, fault: PageFault) -> None:
        """Fetches a missing page from the store of the portion that holds
        it (see fetch.py); `_fetched` places it. The region is held until
        then, so its store and state outlive the fetch."""
        index = region.page_index(fault.page)
        source = region.portion.source(index)
        assert source.offset is not None  # the C path found it placed
        region.holds += 1
        self._fetcher.want(source.store, source.offset + index * PAGE_SIZE, (region, fault, source))

    def _fetched(self, waiter: tuple[ServedRegion, PageFault, Portion], result: Result) -> None:
        region, fault, source = waiter
        try:
            if region.released or isinstance(result, asyncio.CancelledError):
                return
            if isinstance(result, (BaseException, BadPage)):
                region.fetch_failures += 1
                region.last_error = f"{source.store.url}: {result}"
                rc = -errno.EBADMSG if isinstance(result, (PageAuthError, UnauthenticPage)) else -errno.EIO
                self._settle(region, fault, self._fail_page(region, fault, rc, cause=region.last_error))
                return
            if result is not None and len(result) != PAGE_SIZE:
                region.fetch_failures += 1
                region.last_error = f"{source.store.url}: a page of {len(result)} bytes"
                self._settle(region, fault, self._fail_page(region, fault, -errno.EIO, cause=region.last_error))
                return
            if region.portion.source(region.page_index(fault.page)) is not source:
                self._fetch(region, fault)  # copied into a child's own portion meanwhile: read it there
                return
            region.fetched_pages += 1
            rc = region.fill.place(region.uffd, fault, result)
            if rc == -errno.EAGAIN:
                region.fetched[fault.page] = result
            self._settle(region, fault, rc)
        finally:
            self._let_go(region)

    def _settle(self, region: ServedRegion, fault: PageFault, rc: int) -> None:
        """What became of a fault served outside _retry_pending (a fetch, a
        copy): kept for the retry timer, woken, or failed."""
        if rc == 0:
            return
        if rc == -errno.EAGAIN:
            region.pending.append(fault)
            self._schedule_retry(region)
        elif rc in _STALE_FAULT:
            _wake_quietly(region.uffd, fault.page)
        elif self._fail_page(region, fault, rc) == -errno.EAGAIN:
            region.pending.append(fault)
            self._schedule_retry(region)

    def _fail_page(self, region: ServedRegion, fault: PageFault, rc: int, *, cause: str | None = None) -> int:
        """The page's data could not be produced (the store failed, an
        encrypted page did not authenticate, the address is outside the
        region). It is never handed out as zeros or as unauthenticated
        bytes: poison it, so the access raises SIGBUS in the client.
        Returns -EAGAIN while an event keeps the poisoning from happening."""
        if fault.page not in region.unfillable:
            region.errors += 1
            if rc == -errno.EBADMSG:
                region.auth_failures += 1
                reason = "its ciphertext fails authentication (altered, swapped or replayed in the store)"
            else:
                reason = cause or os.strerror(-rc)
            log.error("region %d: page %#x of pid %d cannot be filled: %s; poisoning it",
                      region.id, fault.page, region.owner_pid, reason)
        try:
            region.uffd.poison(fault.page, PAGE_SIZE)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                region.unfillable[fault.page] = rc
                return -errno.EAGAIN
            if exc.errno == errno.EEXIST:
                _wake_quietly(region.uffd, fault.page)  # filled meanwhile (a stale fault)
            elif exc.errno not in (errno.ESRCH, errno.ENOENT):
                log.error("region %d: UFFDIO_POISON failed too: %s", region.id, exc)
        else:
            region.poisoned += 1
        region.unfillable.pop(fault.page, None)
        return 0

    def _apply_remap(self, region: ServedRegion, event: RemapEvent) -> None:
        fill = region.fill
        region.spans = move_span(region.spans, event.old, event.new, event.length)
        if event.old == fill.base and event.length in (fill.length, fill.length + PAGE_SIZE):
            fill.move(event.new)
            return
        # Only part of the range moved: the moved pages keep their contents in
        # the client and are no longer ours; forget them so faults on what is
        # left are served from the store.
        log.warning("region %d: partial mremap of %#x+%#x; the moved part is no longer paged",
                    region.id, event.old, event.length)
        fill.forget(event.old, event.old + event.length)

    # --- write-back ---------------------------------------------------------------

    async def flush(self, region: ServedRegion) -> dict[str, int]:
        """Writes every page dirtied before the call to the region's portion
        and syncs it (msync(MS_SYNC) semantics). On failure the pages stay
        dirty and the error is raised; the next flush retries them.

        A child's portion is completed in the same step: every page it still
        inherits is copied in, so that the portion alone holds the child's
        view. Before pages of a portion change, children that still inherit
        them get a copy of the old bytes first (claim 2)."""
        with self._holding(region):
            async with region.flush_lock:
                return await self._flush_held(region)

    async def _flush_held(self, region: ServedRegion) -> dict[str, int]:
        if region.fill.tracking == Tracking.NONE or region.released:
            return {"pages": 0, "bytes": 0}
        portion = region.portion
        if region.parent is not None:
            portion.place()
        runs = await self._take_dirty(region)
        if runs and not region.writable:
            # Its client may not write the store (whoever else may): kept dirty.
            region.retry_pages |= pages_of(runs, region.fill.base)
            raise protocol.StoreReadOnly(errno.EBADF, f"{portion.store.url} was opened read-only by this client; "
                                                      "reopen it for writing to write back")
        # From here until written, these pages are clean in the kernel's
        # eyes but not in the store: a fork meanwhile must know (see
        # _adopt_fork_child), and a failure puts them back.
        region.in_flight = pages_of(runs, region.fill.base)
        try:
            await self._preserve_for_children(region, runs)
            if not runs and region.parent is None:
                return {"pages": 0, "bytes": 0}
            result = await write_back(portion.store, region.owner_pid, runs)
        except OSError as exc:
            region.retry_pages |= region.in_flight
            region.writeback["writeback_errors"] += 1
            region.last_error = str(exc)
            raise
        finally:
            region.in_flight = set()
        async with region.copy_lock:  # one thread at a time changes a portion's page sets
            for run in runs:
                portion.state.mark(region.page_index(run.addr), run.length // PAGE_SIZE)
        region.writeback["flushes"] += 1
        region.writeback["pages_written"] += result.pages
        region.writeback["bytes_written"] += result.bytes
        return {"pages": result.pages, "bytes": result.bytes}

    async def _take_dirty(self, region: ServedRegion) -> list[Run]:
        """The dirty pages, write-protected again in the same step; pages a
        failed flush left behind are added (those still resident)."""
        fill = region.fill
        if fill.tracking == Tracking.SYNC_WP:
            runs: list[Run] = []
            while True:
                taken, err = fill.take_dirty(region.uffd)
                runs += taken
                region.in_flight |= pages_of(taken, fill.base)  # a fork while we wait must see them
                if not err:
                    break
                if err != errno.EAGAIN:
                    region.retry_pages |= region.in_flight
                    region.in_flight = set()
                    raise OSError(err, f"UFFDIO_WRITEPROTECT of dirty pages: {os.strerror(err)}")
                # An event (a fork, say) is unread: let the loop read it first.
                await asyncio.sleep(0.001)
                if region.released:
                    region.retry_pages |= region.in_flight
                    region.in_flight = set()
                    raise ProcessLookupError(errno.ESRCH, f"region {region.id}: its process exited during the flush")
        else:
            runs = fill.scan_written(self._pagemap_fd(region), region.paged_spans, protect=True)
        if region.retry_pages:
            retry = present_pages(self._pagemap_fd(region), fill.base, region.retry_pages)
            region.retry_pages.clear()
            runs = merge_runs(runs + runs_of_pages(retry, fill.base, region.portion.offset or 0))
        return runs

    def _pagemap_fd(self, region: ServedRegion) -> int:
        if region.pagemap_fd < 0:
            if not region.owner_pid:
                raise ProcessLookupError(errno.ESRCH, f"region {region.id}: its process is not known yet")
            region.pagemap_fd = os.open(f"/proc/{region.owner_pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return region.pagemap_fd

    async def _flush_periodically(self, region: ServedRegion, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(region)
            except OSError as exc:
                log.warning("region %d: periodic write-back failed (will retry): %s", region.id, exc)

    # --- fork: lineage and copy policies --------------------------------------------

    def _adopt_fork_child(self, parent: ServedRegion, event: ForkEvent) -> None:
        """A child inherits the mapping: the kernel shares the pages resident
        at fork copy-on-write (with their write-protect bits, so unflushed
        writes stay dirty in the child too); its missing pages fault into the
        new uffd and are read through the parent's portion. The child's own
        portion is placed lazily, unless the policy copies at fork."""
        child_uffd = Uffd(event.uffd)
        child_store = parent.child_store
        try:
            portion = Portion(child_store.store, child_store.allocator, parent.fill.length, parent=parent.portion)
            fill = FillRange(parent.fill.base, parent.fill.length, portion.state, parent.fill.tracking)
        except BaseException:
            child_uffd.close()
            raise
        child_store.users += 1
        fill.inherit_dirty(parent.fill)
        child = self._add_region(child_uffd, fill, portion, owner_pid=0, fork_policy=parent.fork_policy,
                                 child_store=child_store, keep_child_portions=parent.keep_child_portions,
                                 parent=parent)
        child.handed, child.forked_at = False, self._loop.time()
        # Pages the parent's write-back has taken but not yet stored are clean
        # in the child's page tables too: the child writes them itself.
        child.retry_pages |= parent.in_flight | parent.retry_pages
        child.copy_lock = parent.copy_lock
        if parent.fork_policy == "at-fork":
            portion.place()  # claim 3: the copy is made at fork, so the portion is placed then
            self._spawn(self._copy_at_fork(parent, child))
        self._sync_defer_missing()
        self._schedule_child_probe()
        log.debug("region %d: forked child region %d", parent.id, child.id)

    async def _preserve_for_children(self, region: ServedRegion, runs: list[Run]) -> None:
        """Before these pages of the region's portion are rewritten, every
        child still inheriting them gets the old bytes (claim 2); a child's
        own portion is completed with every page it still inherits, so that
        it alone holds the child's view. The copies run in a worker thread
        under the lineage's copy lock, before the write-back starts: until a
        page is copied (and marked materialized, after its bytes) a child's
        fault reads it through the parent's portion, which still holds it.

        This places a child's portion that is not placed yet: the old bytes
        must be kept before they are overwritten, and the child's own portion
        is where claim 2 puts them; a child that never touched the region
        gets its portion at its parent's first write-back of a page it
        inherits, never earlier (claim 7's "accessed" is the child's view
        of the page changing place)."""
        if runs:
            self._prune_exited_children()  # copies for a dead child are wasted work
        children = region.portion.inheriting_children() if runs else []
        if not children and region.parent is None:
            return
        spans = [(region.page_index(run.addr), run.length // PAGE_SIZE) for run in runs]
        for child in children:
            child.place()  # the allocator is the loop's
        async with region.copy_lock:
            copied = await copy_to_children(children, spans, region.portion if region.parent is not None else None)
        region.copied_to_children += copied

    async def _copy_at_fork(self, parent: ServedRegion, child: ServedRegion) -> None:
        """fork_policy="at-fork": the child's portion gets every page at once
        (claim 3), in a worker thread: the forking parent and every other
        client go on meanwhile. Requests that report on the copy wait for it
        (see _settled)."""
        with self._holding(parent), self._holding(child):
            async with child.copy_lock:
                if child.released:
                    return
                try:
                    copied = await child.portion.complete()
                except OSError as exc:
                    log.error("region %d: copying the forked child's portion at fork failed (its flush "
                              "completes it): %s", child.id, exc)
                    return
            parent.copied_to_children += copied

    async def _settled(self, region: ServedRegion) -> None:
        """Waits for copies under way in the region's lineage."""
        if region.copy_lock.locked():
            async with region.copy_lock:
                pass

    def _serve_deferred(self, region: ServedRegion, fault: PageFault) -> int:
        """fork_policy="on-access": any access by either process first
        copies the page into the child's portion (claim 4), in a task
        (-EINPROGRESS), which then fills the page."""
        index = region.page_index(fault.page)
        if not 0 <= index < region.fill.length // PAGE_SIZE:
            return -errno.EFAULT
        if fault.page in region.copied:
            region.copied.discard(fault.page)
            rc = region.fill.fill_fault(region.uffd, fault)
            if rc == -errno.EAGAIN:
                region.copied.add(fault.page)
            return rc
        if region.copy_lock.locked():
            return -errno.EAGAIN  # a copy is under way in this lineage: retried on the timer
        region.holds += 1
        self._spawn(self._copy_then_fill(region, fault, index))
        return -errno.EINPROGRESS

    async def _copy_then_fill(self, region: ServedRegion, fault: PageFault, index: int) -> None:
        try:
            async with region.copy_lock:
                if region.released:
                    return
                try:
                    region.copied_to_children += await copy_to_children(
                        region.portion.inheriting_children(), [(index, 1)],
                        region.portion if region.parent is not None else None, own_whole=False)
                except PageAuthError as exc:
                    log.error("region %d: %s", region.id, exc)
                    self._settle(region, fault, -errno.EBADMSG)
                    return
                except OSError as exc:
                    self._settle(region, fault, -(exc.errno or errno.EIO))
                    return
            if not region.released:
                region.copied.add(fault.page)
                region.pending.append(fault)
                self._retry_pending(region)
        finally:
            self._let_go(region)

    def _sync_defer_missing(self) -> None:
        """fork_policy="on-access" regions route their missing faults
        through Python while copies are due: a child until it holds every
        page, a parent while a child inherits from it."""
        for region in self._regions.values():
            region.fill.defer_missing = not region.handed or bool(
                region.fork_policy == "on-access"
                and ((region.parent is not None and region.portion.state.missing())
                     or region.portion.inheriting_children()))

    def _learn_child_pid(self, region: ServedRegion) -> None:
        """Learns a forked child's pid from a fault (any fault on a child's
        uffd is the child's) and watches it for exit."""
        tid = region.fill.last_thread_id
        pid = _thread_group(tid) if tid else None
        if pid is None:
            return
        try:
            region.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._release_region(region)
            return
        region.owner_pid = pid
        self._loop.add_reader(region.pidfd, self._release_region, region)

    def _schedule_child_probe(self) -> None:
        if self._child_probe is None and any(r.parent is not None and r.pidfd < 0 for r in self._regions.values()):
            self._child_probe = self._loop.call_later(_CHILD_PROBE_INTERVAL, self._probe_children)

    def _probe_children(self) -> None:
        self._child_probe = None
        self._prune_exited_children()
        self._schedule_child_probe()

    def _prune_exited_children(self) -> None:
        """Releases forked children that have exited. Known ones have a pidfd
        (readable once the process is gone); for the others an ioctl on their
        uffd fails with ESRCH once their address space is gone."""
        for region in [r for r in self._regions.values() if r.parent is not None]:
            if region.pidfd >= 0:
                exited = bool(select.select([region.pidfd], [], [], 0)[0])
            else:
                try:
                    region.uffd.writeprotect(region.tag_address, PAGE_SIZE, protect=False, wake=False)
                    exited = False
                except OSError as exc:
                    exited = exc.errno == errno.ESRCH
            if exited:
                self._release_region(region)


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

