"""Hostile and unprivileged clients for tests/test_hostile.py, as importable code.

Run one as ``python hostile_clients.py NAME ARGS...`` (through setpriv when
it must run as another user or without some capability). A client reports
on stdout, one JSON object a line, each with a "what" key; one that takes
orders reads them from stdin, one line each. A client that fails reports
"error" with its traceback (the plumbing, shared with tests/scenarios.py,
is tests/child.py). Every client ends with os._exit: whatever it leaves (a
region, a connection) goes with the process, as it would with a client
that crashes.

The module also holds what both sides speak: `Raw`, the control protocol
spoken by hand, and `registered_uffd`, a userfaultfd of this process
registered the way the library registers a region.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import uffd_pager
from child import Registry, order, report
from uffd_pager.client import REGION_FEATURES
from uffd_pager.uffd import Feature, RegisterMode, Uffd, buffer_address

PAGE = uffd_pager.PAGE_SIZE
REGION_REGISTER_MODE = RegisterMode.MISSING | RegisterMode.WP
REGION_UFFD_FEATURES = REGION_FEATURES | Feature.WP_ASYNC  # what map(dirty_tracking="async") creates
MAX_MESSAGE = 64 * 1024

CLIENTS = Registry()
client = CLIENTS.register


# --- outcomes -------------------------------------------------------------------------


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """What a call did: {"ok": True, "seconds"} or the exception it raised."""
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return {"ok": False, "seconds": time.monotonic() - started, **described(exc)}
    return {"ok": True, "seconds": time.monotonic() - started}


def described(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "errno": getattr(exc, "errno", None),
            "is_permission": isinstance(exc, PermissionError), "is_value": isinstance(exc, ValueError),
            "is_oserror": isinstance(exc, OSError)}


def capabilities() -> dict[str, bool]:
    """This process's effective capabilities that the tests drop or keep."""
    with open("/proc/self/status") as f:
        effective = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    bits = {"dac_override": 1, "dac_read_search": 2, "fowner": 3, "sys_ptrace": 19}
    return {name: bool(effective >> bit & 1) for name, bit in bits.items()}


# --- memory at a chosen address ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED_NOREPLACE = 0x100000
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_at(address: int, length: int) -> None:
    """Anonymous private read-write memory at exactly `address`."""
    got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE, -1, 0)
    if got == _MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap at {address:#x}: {os.strerror(err)}")


def unmap_at(address: int, length: int) -> None:
    _libc.munmap(address, length)


# --- a userfaultfd registered like a region's ----------------------------------------------


@dataclass
class RegisteredUffd:
    """A userfaultfd of this process registered over `size` bytes at
    `address` and the tag page past them, as `Pager.map` registers a region."""

    uffd: Uffd
    address: int
    size: int

    @property
    def fd(self) -> int:
        return self.uffd.fd


@contextlib.contextmanager
def registered_uffd(pages: int = 1, *, address: int | None = None) -> Iterator[RegisteredUffd]:
    """A new userfaultfd registered over new memory (at `address`, if
    given). While a range is registered and no pager reads its uffd, a
    fork() of this process would block for good: fork nothing inside."""
    length = (pages + 1) * PAGE
    memory = None
    if address is None:
        memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        address = buffer_address(memory)
    else:
        map_at(address, length)
    try:
        uffd = Uffd.create(REGION_UFFD_FEATURES)
        try:
            uffd.register(address, length, REGION_REGISTER_MODE)
            try:
                yield RegisteredUffd(uffd, address, pages * PAGE)
            finally:
                with contextlib.suppress(OSError):
                    uffd.unregister(address, length)  # before the unmap, which would wait for its event
        finally:
            uffd.close()
    finally:
        if memory is not None:
            memory.close()
        else:
            unmap_at(address, length)


# --- the control protocol by hand -----------------------------------------------------------


def encode(message: dict[str, Any] | bytes) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message).encode()


class Raw:
    """A control connection spoken by hand: any bytes, any descriptors.
    `request` returns the reply, or None if the pager closed the connection."""

    def __init__(self, address: str | bytes, *, hello: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(address)
        self.seconds = 0.0  # how long the last request waited for its answer
        if hello:
            reply = self.request({"op": "hello", "v": 1, "pid": os.getpid()}, timeout=timeout)
            if not (reply and reply.get("ok")):
                raise AssertionError(f"the pager refused a well-formed hello: {reply}")

    def send(self, message: dict[str, Any] | bytes, fds: Sequence[int] = ()) -> bool:
        """False if the pager has closed the connection."""
        try:
            if fds:
                socket.send_fds(self.sock, [encode(message)], list(fds))
            else:
                self.sock.sendmsg([encode(message)])
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def receive(self, timeout: float) -> dict[str, Any] | None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(f"no answer within {timeout:g} s")
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 16)
        except ConnectionResetError:
            return None
        for fd in fds:
            os.close(fd)
        if not data:
            return None
        return json.loads(data)

    def request(self, message: dict[str, Any] | bytes, fds: Sequence[int] = (),
                timeout: float = 10.0) -> dict[str, Any] | None:
        started = time.monotonic()
        try:
            if not self.send(message, fds):
                return None
            return self.receive(timeout)
        finally:
            self.seconds = time.monotonic() - started

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        reply = self.request({"op": "status"}, timeout=timeout)
        if not (reply and reply.get("ok")):
            raise AssertionError(f"status refused: {reply}")
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refused(reply: dict[str, Any] | None) -> bool:
    """An error reply, or the connection closed: anything but service."""
    return reply is None or reply.get("ok") is False


# --- clients ------------------------------------------------------------------------------


@client("uffd-donor")
def uffd_donor(socket_fd: str, address: str, pages: str) -> None:
    """Registers a region-like range at `address` and hands its uffd over
    the socket `socket_fd` to whoever wants to pass it off as its own; lets
    go when told (a line on stdin)."""
    donee = socket.socket(fileno=int(socket_fd))
    with registered_uffd(int(pages), address=int(address)) as region:
        socket.send_fds(donee, [b"uffd"], [region.fd])
        report("donated", address=region.address, size=region.size)
        order()
    report("done")


@client("bad-maps-to-embedded-pager")
def bad_maps_to_embedded_pager(store_path: str) -> None:
    """Starts an embedded pager, sends it bad maps over a connection of its
    own, then goes away without closing anything."""
    pager = uffd_pager.Pager(timeout=10)
    report("pager", pid=pager.pid)
    address = pager._conn.address  # the embedded pager's socket: nothing public names it
    read_end, write_end = os.pipe()
    fields = {"url": f"file://{store_path}", "size": PAGE, "offset": 0, "address": 1 << 40, "tracking": "async",
              "writeback_interval": 0, "fork_policy": "on-write", "children": None, "keep_child_portions": False}
    attempts: list[tuple[str, bytes, list[int]]] = [
        ("a pipe as the uffd", encode({"op": "map", **fields, "fds": ["uffd", "store"]}), [read_end, write_end]),
        ("a pipe as the uffd, v1 shape", encode({"op": "map", **fields}), [read_end]),
        ("no descriptor", encode({"op": "map", **fields}), []),
        ("a size of 2**60", encode({"op": "map", **fields, "size": 1 << 60}), [read_end]),
        ("not JSON", b"\xff\xfe{map", [read_end]),
    ]
    replies = {}
    for what, data, fds in attempts:
        with Raw(address) as raw:
            replies[what] = raw.request(data, fds, timeout=5)
    report("bad-maps", replies=replies)
    os._exit(0)  # the client goes: its pager must follow


@client("map-without-dac")
def map_without_dac(socket_path: str, private_path: str, public_path: str) -> None:
    """Root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER maps
    another uid's files: one it may not read, one it may read but not write."""
    report("caps", **capabilities())
    pager = uffd_pager.connect(socket_path, timeout=10)

    def map_private() -> None:
        with pager.map(f"file://{private_path}", PAGE) as region:
            report("read-private", sha256=hashlib.sha256(region.view()).hexdigest())

    report("private", **outcome(map_private))
    try:
        region = pager.map(f"file://{public_path}", PAGE)
    except Exception as exc:
        report("public", mapped=False, **described(exc))
        os._exit(0)
    view = region.view()
    sha = hashlib.sha256(view).hexdigest()
    view[0] = view[0] ^ 0xFF
    report("public", mapped=True, sha256=sha, flush=outcome(region.flush))
    os._exit(0)  # region and all: the pager releases it when the connection goes


@client("fake-pager")
def fake_pager(path: str) -> None:
    """Listens on `path` and answers like a pager (claiming to be root),
    recording every message and descriptor it is sent; ends when stdin does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(8)
    report("listening", uid=os.getuid())
    conns: list[socket.socket] = []
    while True:
        readable, _, _ = select.select([listener, 0, *conns], [], [], 30)
        if not readable:
            break
        for each in readable:
            if each is listener:
                conns.append(listener.accept()[0])
            elif each == 0:
                if not os.read(0, 1):
                    report("done")
                    os._exit(0)
            else:
                data, fds, _flags, _addr = socket.recv_fds(each, MAX_MESSAGE, 16)
                kinds = []
                for fd in fds:
                    with contextlib.suppress(OSError):
                        kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
                    os.close(fd)
                if not data:
                    conns.remove(each)
                    each.close()
                    continue
                try:
                    message = json.loads(data)
                except ValueError:
                    message = {"op": None, "raw": data.decode(errors="replace")}
                report("received", op=message.get("op"), fields=sorted(message), fds=len(fds), fd_kinds=kinds,
                       has_key="key" in message)
                if message.get("op") == "hello":
                    reply = {"ok": True, "v": 1, "pid": os.getpid(), "uid": 0}  # a lie: it is not root
                elif message.get("op") == "map":
                    reply = {"ok": False, "error": {"type": "ValueError", "message": "recorded, not served"}}
                else:
                    reply = {"ok": True}
                each.sendmsg([json.dumps(reply).encode()])
    report("done")
    os._exit(0)


@client("map-with-key")
def map_with_key(socket_path: str, store_path: str) -> None:
    """What a root client does with a socket path: connect, map with a key."""
    try:
        pager = uffd_pager.connect(socket_path, timeout=5)
    except Exception as exc:
        report("connect", ok=False, **described(exc))
        os._exit(0)
    report("connect", ok=True)
    report("map", **outcome(lambda: pager.map(f"file://{store_path}", PAGE, key=uffd_pager.Key.generate())))
    os._exit(0)


@client("map-attempts")
def map_attempts(socket_path: str, attempts: str) -> None:
    """Each of a JSON list of Pager.map keyword arguments, in turn (with
    "generated_key": true, under a new key); a region that maps is closed
    untouched."""
    pager = uffd_pager.connect(socket_path, timeout=10)
    for index, arguments in enumerate(json.loads(attempts)):
        if arguments.pop("generated_key", False):
            arguments["key"] = uffd_pager.Key.generate()
        report("attempt", index=index, **outcome(lambda: pager.map(**arguments).close()))
    os._exit(0)


@client("regions")
def regions(socket_path: str, store_path: str) -> None:
    """Maps and closes regions of the store as told: "map SIZE" and "close
    INDEX" (the INDEXth map), one a line; ends with stdin."""
    pager = uffd_pager.connect(socket_path, timeout=10)
    held: list[Any] = []
    report("ready")
    while line := order():
        command, argument = line.split()
        if command == "map":
            def map_one() -> None:
                held.append(pager.map(f"file://{store_path}", int(argument)))
            report("map", index=len(held), **outcome(map_one))
        elif command == "close":
            report("close", **outcome(held[int(argument)].close))
    os._exit(0)


@client("normal-client")
def normal_client(socket_path: str, store_path: str) -> None:
    """Maps the whole file, reads it back, closes."""
    with open(store_path, "rb") as f:
        expected = f.read()
    pager = uffd_pager.connect(socket_path, timeout=10)
    with pager.map(f"file://{store_path}", len(expected)) as region:
        view = region.view()
        same = bytes(view) == expected
        del view
    pager.close()
    report("read", same=same)
    os._exit(0)


@client("tenant")
def tenant(socket_path: str, store_path: str) -> None:
    """Connects, then maps the whole file and reads it back: reports the
    "connect" and "read" outcomes (a refusal is an outcome; "same": the
    region read as the file, or None if this process may not read it)."""
    pager: list[uffd_pager.Pager] = []
    report("connect", **outcome(lambda: pager.append(uffd_pager.connect(socket_path, timeout=10))))
    if pager:
        try:
            with open(store_path, "rb") as f:
                expected: bytes | None = f.read()
        except PermissionError:
            expected = None
        same: list[bool] = []

        def read() -> None:
            with pager[0].map(f"file://{store_path}", os.path.getsize(store_path)) as region:
                view = region.view()
                same.append(bytes(view) == expected)
                del view

        report("read", **outcome(read), same=same[0] if same else None)
    os._exit(0)


if __name__ == "__main__":
    CLIENTS.main()
