"""The client library: `Pager` (an embedded pager process, or a daemon reached
with `connect`) and its `map()` call.

The faulting process never serves its own faults: a thread blocked in a
fault keeps the GIL, so the pager always runs in another process. The client
creates the mapping and the userfaultfd (a uffd acts on the address space of
the process that created it), registers the range, and passes the uffd to
the pager. The client keeps its own copy of the uffd open, so that if the
pager dies, a thread touching a missing page waits instead of reading zeros.

fork() and the uffd
-------------------
A fork() of a process with a registered range queues a FORK event and
blocks, GIL held, until the pager reads it. So no range may be registered
while no pager reads its uffd: map() registers and hands the uffd over, and
close() unregisters before the pager lets go of it, both under `fork_lock`,
which every os.fork() of this process takes first (os.register_at_fork).
A forked child's uffd is made by the kernel in the pager's fd table only: the
child's at-fork hook claims it back at once (`Region._adopt_in_child`), and
until it has, the pager does not serve the child's pages.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
import weakref
from typing import Any, Callable

from uffd_pager import protocol
from uffd_pager.crypto import Key
from uffd_pager.layout import (
    DEFAULT_WRITEBACK_INTERVAL,
    check_geometry,
    parse_fork_policy,
    parse_max_resident,
    parse_read_ahead,
    parse_tracking,
    parse_writeback_interval,
)
from uffd_pager.region import Region, RegionMapping, allow_page_out, fork_lock, start_agent
from uffd_pager.catalog import ensure_state_dir, open_catalog_file
from uffd_pager.durable import remove_state, state_path
from uffd_pager.logs import parse_log_level
from uffd_pager.stores import is_remote
from uffd_pager.stores.file import file_path, open_store_file
from uffd_pager.restart import LISTEN_FD, MAX_RESTARTS, MAX_RESTARTS_LIMIT, PagerProcess
from uffd_pager.uffd import PAGE_SIZE, Feature, RegisterMode, Tracking, Uffd, available_features, buffer_address

# What every region's uffd asks of the kernel: follow fork/mremap/madvise/
# munmap of the region, report the faulting thread, and write-protect pages
# to see writes. WP_ASYNC (asynchronous tracking) is per uffd, chosen at
# UFFDIO_API time: synchronous and asynchronous WP cannot mix on one uffd.
REGION_FEATURES = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
    | Feature.THREAD_ID | Feature.PAGEFAULT_FLAG_WP
)
TRACKING_FEATURES = {Tracking.ASYNC_WP: Feature.WP_ASYNC, Tracking.SYNC_WP: Feature(0)}
REGION_REGISTER_MODE = RegisterMode.MISSING | RegisterMode.WP

DEFAULT_TIMEOUT = 60.0  # seconds a control request may wait for its answer


class Connection:
    """A control connection. Thread-safe: one request at a time. After fork()
    the child gets its own connection on its first request."""

    def __init__(self, address: str | bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.address = address
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1
        self._unanswered = 0  # requests that timed out: their late replies come first
        self.agent_started = False  # this process's page-out agent was handed over on this connection
        self.pager_cap = 0  # the pager's cap on all regions together (bytes; 0: none), from its hello
        self.pager_pid = 0
        self.takes_over = False  # the pager keeps durable state: a new one takes its regions over if it dies
        # Whether a pager may still come to take over at this (abstract) address: a private pager's restarter runs.
        self.successor: Callable[[], bool] | None = None
        # This process's live region ids, to claim from a pager that took over (set by connect()).
        self.reattach: Callable[[], list[int]] | None = None
        self.request("hello", v=protocol.PROTOCOL_VERSION, pid=os.getpid())

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except TimeoutError:
            sock.close()
            raise protocol.PagerTimeout(f"the pager at {_printable(self.address)} did not accept a connection "
                                        f"within {self.timeout:g} s") from None
        except FileNotFoundError:
            sock.close()
            raise FileNotFoundError(
                f"no pager socket at {_printable(self.address)}: start one with "
                f"`uffd-pager serve --socket {_printable(self.address)}`, or use uffd_pager.Pager() "
                "for a private pager"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise protocol.PagerGone(f"nothing is listening on {_printable(self.address)}: the pager is not running") from None
        try:
            _check_peer(sock, self.address)
        except BaseException:
            sock.close()
            raise
        self._sock, self._pid, self._unanswered = sock, os.getpid(), 0
        return sock

    def request(self, op: str, pass_fds: tuple[int, ...] = (), **fields: Any) -> dict[str, Any]:
        reply, received = self.request_fds(op, pass_fds, **fields)
        for fd in received:
            os.close(fd)
        return reply

    def request_fds(self, op: str, pass_fds: tuple[int, ...] = (),
                    **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """A request whose answer carries descriptors: (reply, fds), the
        caller owns the fds."""
        with self._lock:
            sock = self._sock if self._pid == os.getpid() else None
            if sock is None:
                sock = self._connect_retrying() if self._may_wait_for_takeover() else self._connect()
                if op != "hello":
                    hello, _ = self._exchange(sock, {"op": "hello", "v": protocol.PROTOCOL_VERSION,
                                                     "pid": os.getpid()}, ())
                    self._greeted(hello)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    reply, received = self._exchange(sock, {"op": op, **fields}, pass_fds)
                    break
                except protocol.PagerGone:
                    # A map may have been recorded before the pager died: the
                    # new one would hold it twice. Everything else is asked
                    # again, of each pager that takes over (it may die too),
                    # for as long as the timeout allows.
                    if op in ("hello", "map") or not self._may_wait_for_takeover() \
                            or time.monotonic() > deadline:
                        raise
                while True:
                    try:
                        sock = self._reattach()
                        break
                    except protocol.PagerGone:
                        if time.monotonic() > deadline:
                            raise
            if op == "hello":
                self._greeted(reply)
            return reply, received

    def _may_wait_for_takeover(self) -> bool:
        if self.successor is not None:
            return self.takes_over and self.successor()
        return self.takes_over and isinstance(self.address, str)

    def _connect_retrying(self) -> socket.socket:
        """Connects, waiting up to the timeout for a pager to listen: the
        one taking over from a dead one may be starting."""
        deadline, delay = time.monotonic() + self.timeout, 0.01
        while True:
            try:
                return self._connect()
            except (protocol.PagerGone, FileNotFoundError):
                if time.monotonic() + delay > deadline or not self._may_wait_for_takeover():
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _reattach(self) -> socket.socket:
        """The pager died; a new one took over its regions from durable
        state: connect to it and claim this process's regions there."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        sock = self._connect_retrying()
        hello, _ = self._exchange(sock, {"op": "hello", "v": protocol.PROTOCOL_VERSION, "pid": os.getpid()}, ())
        self._greeted(hello)
        regions = self.reattach() if self.reattach is not None else []
        if regions:
            # The agent's socket went with the dead pager (and the thread with
            # it): capped regions need a new one to be capped again.
            agent = start_agent() if self.agent_started else -1
            try:
                reply, _ = self._exchange(sock, {"op": "reattach", "regions": regions,
                                                 "fds": ["agent"] if agent >= 0 else []},
                                          (agent,) if agent >= 0 else ())
            finally:
                if agent >= 0:
                    os.close(agent)
            lost = sorted(set(regions) - set(reply["regions"]))
            if lost:
                log.error("uffd_pager: the pager that took over does not serve regions %s of this process", lost)
        return sock

    def _greeted(self, hello: dict[str, Any]) -> None:
        self.pager_pid = hello.get("pid", 0)
        self.pager_cap = int(hello.get("max_resident", 0))
        self.takes_over = bool(hello.get("takeover", False))

    def _exchange(self, sock: socket.socket, message: dict[str, Any],
                  fds: tuple[int, ...]) -> tuple[dict[str, Any], list[int]]:
        try:
            while self._unanswered:
                for fd in self._receive(sock, message)[1]:  # a late answer to a request that timed out
                    os.close(fd)
                self._unanswered -= 1
            protocol.send(sock, message, fds)
            reply, received = self._receive(sock, message)
        except TimeoutError:
            self._unanswered += 1
            raise protocol.PagerTimeout(
                f"the pager (pid {self.pager_pid or '?'}) did not answer {message.get('op')!r} within "
                f"{self.timeout:g} s; it may be overloaded or stuck (Pager(timeout=...) sets the limit)") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._raise_last_words(sock)
            raise protocol.PagerGone(f"the pager closed the connection: {exc}") from None
        try:
            return protocol.raise_for_error(reply), received
        except BaseException:
            for fd in received:
                os.close(fd)
            raise

    @staticmethod
    def _raise_last_words(sock: socket.socket) -> None:
        """Raises the error a pager said before it hung up on us (a refusal
        at connect: a queued message stays readable after the peer closed)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return
        said = None
        with contextlib.suppress(OSError, protocol.ProtocolError):
            said = protocol.recv(sock)
        if said is not None and not said[0].get("ok", True):
            for fd in said[1]:
                os.close(fd)
            protocol.raise_for_error(said[0])

    @staticmethod
    def _receive(sock: socket.socket, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        received = protocol.recv(sock)
        if received is None:
            raise protocol.PagerGone(f"the pager closed the connection during {message.get('op')!r} "
                                     "(it exited or was killed)")
        return received

    def peer_alive(self) -> bool:
        """Whether the pager is still there, as far as this process can tell
        without a request: the connection is not hung up, its pid exists."""
        sock = self._sock if self._pid == os.getpid() else None
        if sock is not None and not self._unanswered:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLHUP)
            if poller.poll(0):
                return False  # no request is out: readable means end of stream
        if self.pager_pid:
            try:
                os.kill(self.pager_pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return True

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's socket without a word on it."""
        self._lock = threading.Lock()
        self.agent_started = False  # the parent's agent thread is not in the child
        if self._sock is not None:
            self._sock.close()  # the child's descriptor only: no shutdown reaches the pager
        self._sock = None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
            self._sock = None


class Pager:
    """A pager serving this process's regions.

    ``Pager()`` starts a private pager process (stopped by `close()`);
    ``connect(path)`` attaches to a daemon started with ``uffd-pager serve``.
    Both are context managers. `timeout`: seconds a control request may wait
    for its answer (then PagerTimeout). `state_dir`: the private pager's
    state directory (encrypted stores' rollback anchors; default
    $UFFD_PAGER_STATE_DIR, else /var/lib/uffd-pager for root, else
    $XDG_STATE_HOME/uffd-pager). `max_resident`: the private pager's cap
    in bytes on all its regions together
    (`uffd-pager serve --max-resident`; see the README's "Page-out").
    `log_level`: how much the private pager logs to this process's stderr
    (DEBUG, INFO, WARNING, ERROR, any case; `uffd-pager --log-level`);
    default WARNING. `restarts`: how many times within 30 s a private pager
    that dies (a signal, a non-zero exit) is started again by a native
    thread of this process; the new one takes every region over from the
    state file it keeps in `state_dir` (removed by close()), so a thread
    stuck in a fault goes on. Past that it gives up, said once on stderr:
    requests raise PagerGone at once, threads waiting on missing pages keep
    waiting. 0: never restarted. See the README's "Taking over".
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, state_dir: str | os.PathLike[str] | None = None,
                 max_resident: int | None = None, log_level: str | None = None,
                 restarts: int = MAX_RESTARTS) -> None:
        if max_resident is not None and (isinstance(max_resident, bool) or not isinstance(max_resident, int)
                                         or max_resident < 0 or max_resident % PAGE_SIZE):
            raise ValueError(f"max_resident must be a number of bytes, a multiple of {PAGE_SIZE}, not {max_resident!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= MAX_RESTARTS_LIMIT:
            raise ValueError(f"restarts must be a number from 0 to {MAX_RESTARTS_LIMIT}, not {restarts!r}")
        level = parse_log_level(log_level) if log_level is not None else None
        address = f"\0uffd-pager-{os.getpid()}-{secrets.token_hex(8)}".encode()
        # The pager's durable state, which a restarted one takes the regions
        # over from: a file per Pager, named after its address, removed by
        # close(). An unusable directory: the pager says it keeps none.
        self._state_file: str | None = None
        with contextlib.suppress(OSError):
            state_dir = ensure_state_dir(state_dir)
            self._state_file = state_path(state_dir, address)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(address)
            listener.listen(128)
            # The listening socket exists before the pager does, so connecting
            # never races its start-up, nor its restart (we keep it bound).
            # -P: the pager is this installed package, never a uffd_pager/ in
            # the application's working directory.
            self._process: PagerProcess | None = PagerProcess(
                [sys.executable, "-P", "-m", "uffd_pager", "serve", "--listen-fd", str(LISTEN_FD),
                 "--parent-pid", str(os.getpid()), "--exit-when-idle",
                 *(["--state-dir", os.fspath(state_dir)] if state_dir is not None else []),
                 *(["--max-resident", str(max_resident)] if max_resident else []),
                 *(["--log-level", level] if level is not None else [])],
                listener, max_restarts=restarts)
        except BaseException:
            listener.close()
            raise
        self._owner_pid = os.getpid()
        self._restarts = restarts
        self._regions: "weakref.WeakSet[Region]" = weakref.WeakSet()
        try:
            self._conn = Connection(address, timeout)
            self._conn.reattach = self._live_region_ids
            self._conn.successor = self._successor_may_come
            if restarts and self._conn.takes_over:  # without durable state, a new pager could not serve the regions
                self._process.restart_when_it_dies()
            else:
                self._process.never_restart()
        except BaseException:
            self._stop_process()
            raise
        _live_pagers.add(self)

    @classmethod
    def _attach(cls, address: str, timeout: float) -> "Pager":
        pager = cls.__new__(cls)
        pager._process = None
        pager._state_file = None
        pager._owner_pid = os.getpid()
        pager._regions = weakref.WeakSet()
        pager._conn = Connection(address, timeout)
        pager._conn.reattach = pager._live_region_ids
        _live_pagers.add(pager)
        return pager

    def _live_region_ids(self) -> list[int]:
        """The ids this process's open regions have at the pager."""
        return sorted(r.pager_id for r in list(self._regions) if not r.closed and r.served_here)

    def _successor_may_come(self) -> bool:
        """Whether a restarted pager may still take this one's place (in a
        forked child: the parent's restarter may start it)."""
        if self._process is not None:
            return self._process.successor_may_come()
        return self._restarts > 0 and self._conn.takes_over

    def alive(self) -> bool:
        """Whether the pager is still there (without asking it); a private
        pager that died is not, until the one started after it is."""
        if self._process is not None and os.getpid() == self._owner_pid:
            return self._process.status().alive
        return self._conn.peer_alive()

    @property
    def pid(self) -> int:
        """The pager process's pid (a private pager's: the current one's, or
        the dead one's until it is replaced; 0 once it is gone for good)."""
        if self._process is not None and os.getpid() == self._owner_pid:
            return self._process.status().pid
        return self._conn.pager_pid

    def map(self, store: str, size: int, offset: int = 0, *, dirty_tracking: str | None = None,
            writeback_interval: float | None = DEFAULT_WRITEBACK_INTERVAL, fork_policy: str = "on-write",
            children: str | None = None, keep_child_portions: bool = False,
            key_file: str | os.PathLike[str] | None = None, key: Key | None = None,
            read_ahead: str | int = "adaptive", max_resident: int | None = None) -> Region:
        """Maps `size` bytes whose pages live in `store` (a URL such as
        ``file:///abs/path``) from byte `offset` on; see the README for every
        option. Pages are filled on first touch; holes and bytes past the end
        of a file read as zero. Writes go back on `Region.flush()`, on
        `close()` and every `writeback_interval` seconds. After fork() a
        child's writes go to its own portion (in `children`, or the same
        store), copied from the parent's per `fork_policy`. With `key_file`
        (or a `Key`), pages are encrypted at rest with AES-256-GCM.
        `read_ahead`: "adaptive" (windows that grow while access is
        sequential and close on random access), "off", or a fixed window in
        bytes filled after every missing fault. `max_resident`: a cap in
        bytes on the region's resident pages, kept by dropping clean pages
        (under either tracking; see the README's "Page-out")."""
        check_geometry(size, offset)
        for name, url in (("store", store), ("children", children)):
            if url is not None and not isinstance(url, str):
                raise TypeError(f"{name} must be a URL string, not {type(url).__name__}")
        if dirty_tracking is None and self._conn.pager_cap and not max_resident:
            # A pager's (or tenant's) cap over many regions holds faults of
            # none of them: only "sync" page-out drops fast enough to keep it.
            dirty_tracking = "sync"
        dirty_tracking = _tracking_for(dirty_tracking)
        tracking = parse_tracking(dirty_tracking)
        interval = parse_writeback_interval(writeback_interval)
        parse_fork_policy(fork_policy)
        parse_read_ahead(read_ahead)
        # Pageable: by its own cap, or by the pager's over all regions.
        capped = parse_max_resident(max_resident) > 0 or self._conn.pager_cap > 0
        if key_file is not None and key is not None:
            raise TypeError("give key_file or key, not both")
        if key_file is not None:
            key = Key.from_file(key_file)
        # The pager never opens a path for us: we open the files with our own
        # rights and hand the descriptors over (SCM_RIGHTS).
        # A remote store is the pager's to reach: only its URL is checked here.
        with contextlib.ExitStack() as passed:
            descriptors: dict[str, int] = {}
            for name, url in (("store", store), ("children", children)):
                if url is not None and not is_remote(url):
                    descriptors[name] = open_store_file(url)
                    passed.callback(os.close, descriptors[name])
            if key is not None:
                descriptors["key"] = _key_memfd(key)
                passed.callback(os.close, descriptors["key"])
                for name, url in (("catalog", store), ("children_catalog", children)):
                    if url is not None and not is_remote(url):  # a remote store's is in the pager's state dir
                        descriptors[name] = open_catalog_file(file_path(url))
                        passed.callback(os.close, descriptors[name])
            # Kept by the region where a pager may take over (RegionMapping.kept_fds).
            kept = tuple(descriptors.values())
            if capped and not self._conn.agent_started:
                descriptors["agent"] = start_agent()
                passed.callback(os.close, descriptors["agent"])
            uffd, follows_fork = _region_uffd(TRACKING_FEATURES[tracking])
            mapped = size + PAGE_SIZE  # and the tag page (see Region)
            try:
                memory = RegionMapping.create(mapped, self.alive)
                if not follows_fork:
                    # A child must not see the region at all (an access is a
                    # SIGSEGV), rather than see it unserved or as zeros.
                    memory.madvise(mmap.MADV_DONTFORK)
            except BaseException:
                uffd.close()
                raise
            address = buffer_address(memory)
            fds = {"uffd": uffd.fd, **descriptors}
            with fork_lock:  # registered, and not yet read by the pager
                try:
                    uffd.register(address, mapped, REGION_REGISTER_MODE)
                    memory.uffd, memory.registered = uffd, mapped
                    reply = self._conn.request("map", tuple(fds.values()), url=store, size=size, offset=offset,
                                               address=address, tracking=dirty_tracking,
                                               writeback_interval=interval, fork_policy=fork_policy,
                                               children=children, keep_child_portions=bool(keep_child_portions),
                                               read_ahead=read_ahead, max_resident=max_resident, fds=list(fds))
                    if "agent" in fds:
                        self._conn.agent_started = True
                    if self._conn.takes_over:  # the pager holds the agent's end now; the rest stay with us
                        memory.kept_fds = kept
                        passed.pop_all()
                        if "agent" in descriptors:
                            os.close(descriptors["agent"])
                except protocol.PagerTimeout:
                    memory.orphan()  # the pager may be reading it by now: never unregistered under it
                    raise
                except BaseException:
                    memory.uffd = uffd
                    memory.release_uffd()
                    memory.close()
                    raise
        if capped:
            allow_page_out(address, size, uffd, tracking)
        # The pager filled the tag page to see that the uffd is ours: missing
        # again, so that a forked child's first read of it is a fault.
        memory.madvise(mmap.MADV_DONTNEED, size, PAGE_SIZE)
        region = Region(self._conn, self, reply["region"], memory, address, size, store, offset,
                        page_out=tracking if capped else None, follows_fork=follows_fork)
        self._regions.add(region)
        return region

    def status(self) -> dict[str, Any]:
        """The pager's own view: connections, regions, open fds, tasks, RSS,
        its tenants and a line per region (`region_list`: every region, over
        as many requests as it takes; the counts are the first reply's)."""
        status = self._conn.request("status")
        while status.pop("more_regions", False) and status["region_list"]:
            more = self._conn.request("status", after=status["region_list"][-1]["id"])
            status["region_list"] += more["region_list"]
            status["more_regions"] = more["more_regions"]
        return status

    def close(self) -> None:
        """Closes every region of this process, then the connection; stops a
        private pager. In a forked child it ends the child's use only.

        If the pager is gone, raises PagerGone after trying every region:
        those regions stay open and mapped with their unflushed data, and
        their threads waiting on missing pages keep waiting."""
        gone: protocol.PagerGone | None = None
        for region in list(self._regions):
            try:
                region.close()
            except protocol.PagerGone as exc:
                gone = exc
        if gone is not None:
            raise gone
        self._conn.close()
        if os.getpid() == self._owner_pid:
            self._stop_process()
        _live_pagers.discard(self)

    def _stop_process(self) -> None:
        """Stops the restarter, then the pager (it exits once its last client
        is gone), and removes its state."""
        if self._process is None:
            return
        self._process.stop(grace=5)
        self._process = None
        if self._state_file is not None:
            remove_state(self._state_file)

    def __enter__(self) -> "Pager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Pager:
    """Attaches to a pager daemon listening on the Unix socket at `path`;
    a request not answered within `timeout` seconds raises PagerTimeout."""
    return Pager._attach(path, timeout)


_live_pagers: "weakref.WeakSet[Pager]" = weakref.WeakSet()


def _check_peer(sock: socket.socket, address: str | bytes) -> None:
    """Talks only to a pager run by root or by this process's own user: a
    socket path someone else could have bound (a world-writable directory,
    a daemon's path after it stopped) must not receive our uffds, store
    descriptors or keys, nor fill our pages."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    if uid not in (0, os.geteuid()):
        raise PermissionError(errno.EPERM, f"the process listening on {_printable(address)} runs as uid {uid}, "
                                           f"neither root nor this process's uid {os.geteuid()}: not a pager to trust")


def _key_memfd(key: Key) -> int:
    """The key in a sealed memfd for the pager (see service._key_from_memfd):
    it never travels as text in a message."""
    fd = os.memfd_create("uffd-pager-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, key.secret_bytes())
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE | _F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


# fcntl(2) memfd seals (the fcntl module of 3.11 lacks some of them).
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8


def _printable(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address


def _before_fork() -> None:
    fork_lock.acquire()


def _after_fork_in_parent() -> None:
    fork_lock.release()


def _after_fork_in_child() -> None:
    fork_lock.release()  # the child's only thread is the one that took it
    # The child shares the parent's control socket and uffd descriptions; a
    # word on either would reach the parent's pager state, so drop them, and
    # claim the child's own uffds from the pager before anything touches them.
    for pager in list(_live_pagers):
        pager._conn.forget_after_fork()
        if pager._process is not None:  # the restarter thread is not in the child; the pager is not its child
            pager._process.forget_after_fork()
            pager._process = None
        for region in list(pager._regions):
            region._adopt_in_child()


def _close_at_exit() -> None:
    # A process that exits without closing its regions still gets its writes
    # written back: closing flushes. Regions whose pager is gone stay mapped
    # (see Region.close) and go with the process.
    for pager in list(_live_pagers):
        try:
            pager.close()  # in a forked child, this closes the child's use only
        except (OSError, KeyError, protocol.PagerError) as exc:
            log.warning("uffd_pager: at exit: %s", exc)


log = logging.getLogger("uffd_pager.client")
_told_no_fork = False  # the one line about regions that do not follow fork() was logged
_told_sync = False  # the one line about "sync" tracking chosen for an older kernel was logged


def _tracking_for(asked: object) -> object:
    """dirty_tracking as map() uses it: None is "async" where the kernel has
    UFFD_FEATURE_WP_ASYNC (Linux 6.7+), else "sync", said once; "async"
    asked for on a kernel without it is an error that names "sync"."""
    global _told_sync
    if asked not in (None, "async"):
        return asked
    if Feature.WP_ASYNC in available_features():
        return "async"
    if asked == "async":
        raise OSError(errno.EOPNOTSUPP, 'dirty_tracking="async" needs UFFD_FEATURE_WP_ASYNC (Linux 6.7 and later), '
                                        'which this kernel lacks: use dirty_tracking="sync" (or leave it unset)')
    if not _told_sync:
        _told_sync = True
        log.warning('uffd_pager: this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux < 6.7): dirty_tracking="sync" '
                    "(each page's first write is a fault to the pager)")
    return "sync"


def _region_uffd(tracking: Feature) -> tuple[Uffd, bool]:
    """A uffd for a region, and whether it follows fork(). UFFDIO_API
    refuses UFFD_FEATURE_EVENT_FORK (EPERM) to a process without
    CAP_SYS_PTRACE; such a process still gets regions, which a forked child
    does not inherit (MADV_DONTFORK), and is told so once."""
    global _told_no_fork
    try:
        return Uffd.create(REGION_FEATURES | tracking), True
    except PermissionError:
        uffd = Uffd.create((REGION_FEATURES & ~Feature.EVENT_FORK) | tracking)  # still EPERM: the original cause
    if not _told_no_fork:
        _told_no_fork = True
        log.warning("uffd_pager: no CAP_SYS_PTRACE, so regions do not follow fork(): a forked child does not "
                    "inherit them (an access there is a SIGSEGV); grant CAP_SYS_PTRACE for fork support")
    return uffd, False

os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
