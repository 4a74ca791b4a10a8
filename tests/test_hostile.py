"""Adversarial regression tests for issue 9: the control socket and who may
do what through it.

A daemon serves many clients, and any of them may send it anything: any
bytes, any descriptors, any numbers. These tests speak the protocol by hand
(`hostile_clients.Raw`) with requests shaped like the library's own (the
shape is learned from a real `Pager.map`, so the tests follow the protocol
as it changes), then change one thing at a time. Whatever needs another
user, fewer capabilities, or could block on a fault runs as a child process
(tests/hostile_clients.py), waited for with a timeout.

Every test that attacks a daemon ends by checking that the daemon is alive,
answers `status` within 2 s and still serves a normal client byte-exact;
the daemon fixtures then check that it exits with status 0 on SIGTERM.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

import uffd_pager
from hostile_clients import PAGE, Raw, map_at, refused, registered_uffd, unmap_at
from support import ChildScript, accepts, describe_returncode, descriptor_kind, one, stop_daemon

HOSTILE_CLIENTS = Path(__file__).with_name("hostile_clients.py")
NOBODY = 65534
# An ordinary user who may still create a userfaultfd that follows fork()
# (vm.unprivileged_userfaultfd is 0 here), and whose pager may read such a
# client's pagemap (ptrace rules: the same uid and the same capabilities).
AS_NOBODY_WITH_PTRACE = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace")
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all")
# Root that may not override file permissions (but may still ptrace, which
# a userfaultfd with EVENT_FORK needs).
ROOT_WITHOUT_DAC = ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner")
PROMPT = 1.0  # seconds any refusal may take
LIMIT_WORDS = ("max", "largest", "limit", "exceed", "at most", "too large", "too big")


# --- child processes (tests/hostile_clients.py) ---------------------------------------------


class Child(ChildScript):
    """A running `hostile_clients.py NAME ARGS...`, the leader of its own session."""

    def __init__(self, name: str, *args: Any, **options: Any) -> None:
        super().__init__(HOSTILE_CLIENTS, name, *args, **options)

    def finish(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Every message until the child exits (which must be with status 0)."""
        with contextlib.suppress(OSError, AttributeError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s{self.context()}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        self.unread()
        errors = [m for m in self.seen if m["what"] == "error"]
        assert not errors, f"{self.name} failed:\n{errors[0]['traceback']}{self.context()}"
        assert code == 0, f"{self.name} ended with {describe_returncode(code)}{self.context()}"
        return self.seen


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """spawn(name, *args, wrapper=(), ...) -> a running Child, killed (its whole session) at teardown."""
    children: list[Child] = []

    def start(name: str, *args: Any, **options: Any) -> Child:
        child = Child(name, *args, **options)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def run_child(spawn: Callable[..., Child], name: str, *args: Any, timeout: float = 30,
              **options: Any) -> list[dict[str, Any]]:
    return spawn(name, *args, **options).finish(timeout)


# --- daemons ------------------------------------------------------------------------------------


@dataclass
class ServeProcess:
    """A `python -m uffd_pager serve --socket PATH OPTIONS...` process."""

    path: str
    process: subprocess.Popen[bytes]
    as_nobody: bool = False
    started: bool = False

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A short directory that nobody (uid 65534) owns and everyone may read."""
    path = Path(tempfile.mkdtemp(prefix="uffd-hostile-"))
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(socket_dir: Path) -> Iterator[Callable[..., ServeProcess]]:
    """serve(*options, wrapper=(), directory=None) -> a listening daemon
    started with those `serve` options (through `wrapper`, e.g. setpriv);
    stopped with SIGTERM at teardown, when it must exit with status 0."""
    daemons: list[ServeProcess] = []

    def start(*options: str, wrapper: Sequence[str] = (), directory: Path | None = None) -> ServeProcess:
        path = (directory or socket_dir) / f"serve-{len(daemons)}.sock"
        process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "uffd_pager", "serve", "--socket", str(path), *options],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
        )
        daemon = ServeProcess(str(path), process, as_nobody=bool(wrapper))
        daemons.append(daemon)
        deadline = time.monotonic() + 20
        while not accepts(path):
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
                raise AssertionError(f"`uffd-pager serve {' '.join(options)}` exited with status "
                                     f"{process.returncode} at start:\n{stderr[-2000:]}")
            assert time.monotonic() < deadline, f"the daemon is not listening on {path} after 20 s"
            time.sleep(0.02)
        daemon.started = True
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        return daemon

    yield start
    for daemon in daemons:
        if daemon.started:
            stop_daemon(daemon.path, daemon.process)


def _drain(stream: Any) -> None:
    for _line in stream:
        pass


@pytest.fixture
def store(random_file: Callable[..., Path]) -> Path:
    """What a normal client maps at the end of every test: 8 random pages."""
    return random_file(8 * PAGE, name="normal-client.bin")


def status_of(daemon: Any, timeout: float = 2.0) -> dict[str, Any]:
    """The daemon's status, asked as a user would (a raw connection for a
    daemon of another uid, which the library rightly refuses to talk to)."""
    if getattr(daemon, "as_nobody", False):
        with Raw(daemon.path, timeout=timeout) as raw:
            return raw.status(timeout)
    with uffd_pager.connect(daemon.path, timeout=timeout) as pager:
        return pager.status()


def assert_still_serves(daemon: Any, spawn: Callable[..., Child], store: Path, *,
                        wrapper: Sequence[str] = ()) -> None:
    """Alive, answers status within 2 s, and serves a normal client's region byte-exact."""
    code = daemon.process.poll()
    assert code is None, f"the daemon died ({describe_returncode(code)})"
    started = time.monotonic()
    try:
        status_of(daemon)
    except (TimeoutError, AssertionError) as exc:
        pytest.fail(f"the daemon did not answer status within 2 s: {exc}")
    took = time.monotonic() - started
    assert took < 2.0, f"status took {took:.2f} s"
    read = one(run_child(spawn, "normal-client", daemon.path, store, wrapper=wrapper, timeout=30), "read")
    assert read["same"], "a normal client's region does not read as its file"


def wait_for_regions(raw: Raw, count: int, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's status once it holds `count` regions (released regions go asynchronously)."""
    deadline = time.monotonic() + timeout
    while (status := raw.status())["regions"] != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


# --- map requests shaped like the library's -----------------------------------------------------


DROP = object()  # a field value meaning: leave the field out


@dataclass(frozen=True)
class MapShape:
    """The map request a real `Pager.map` sends: its fields, and what each
    descriptor it attaches is ("uffd", "file", "memfd" or the link text)."""

    fields: dict[str, Any]
    slots: tuple[str, ...]


@pytest.fixture(scope="session")
def map_shape(tmp_path_factory: pytest.TempPathFactory) -> MapShape:
    """Learned from one real map on a private pager: every socket message
    this process sends during it is looked at on its way out."""
    path = tmp_path_factory.mktemp("shape") / "shape.bin"
    path.write_bytes(bytes(PAGE))
    seen: list[MapShape] = []
    real_sendmsg = socket.socket.sendmsg

    def recording_sendmsg(sock: socket.socket, buffers: Any, ancdata: Any = (), *args: Any) -> int:
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(b"".join(bytes(b) for b in buffers))
            if isinstance(message, dict) and message.get("op") == "map":
                fds = [fd for level, kind, data in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                       for fd in memoryview(data).cast("B").cast("i")]
                seen.append(MapShape(message, tuple(descriptor_kind(fd) for fd in fds)))
        return real_sendmsg(sock, buffers, ancdata, *args)

    socket.socket.sendmsg = recording_sendmsg  # type: ignore[method-assign]
    try:
        with uffd_pager.Pager(timeout=20) as pager, pager.map(f"file://{path}", PAGE):
            pass
    finally:
        socket.socket.sendmsg = real_sendmsg  # type: ignore[method-assign]
    assert len(seen) == 1, f"expected one map request from Pager.map, saw {len(seen)}"
    shape = seen[0]
    assert "uffd" in shape.slots, f"Pager.map sent no userfaultfd: {shape}"
    return shape


@contextlib.contextmanager
def forged_map(shape: MapShape, store: Path | int, *, uffd: int, address: int, size: int = PAGE,
               without: Sequence[str] = (), changes: dict[str, Any] | None = None,
               ) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """(message, fds) of a map like the library's for `size` bytes at
    `address` over `store` (a path, opened read-write here, or a descriptor),
    with `uffd` as the region's uffd; the descriptors of the kinds in
    `without` left out (with their names, if the protocol names them), then
    `changes` applied to the fields (DROP: leave the field out)."""
    names = shape.fields.get("fds")  # the protocol may name each descriptor it carries
    message = {**shape.fields, "url": f"file://{store}" if isinstance(store, Path) else shape.fields["url"],
               "size": size, "offset": 0, "address": address}
    opened: list[int] = []
    fds: list[int] = []
    kept_names: list[Any] = []
    try:
        for index, kind in enumerate(shape.slots):
            if kind in without:
                continue
            if kind == "uffd":
                fds.append(uffd)
            elif kind == "file":
                if isinstance(store, Path):
                    store = os.open(store, os.O_RDWR | os.O_CLOEXEC)
                    opened.append(store)
                fds.append(store)
            else:
                raise AssertionError(f"Pager.map attached a descriptor of an unexpected kind: {kind}")
            if isinstance(names, list) and index < len(names):
                kept_names.append(names[index])
        if isinstance(names, list):
            message["fds"] = kept_names
        for key, value in (changes or {}).items():
            if value is DROP:
                message.pop(key, None)
            else:
                message[key] = value
        yield message, fds
    finally:
        for fd in opened:
            os.close(fd)


def counts(raw: Raw) -> tuple[int, int]:
    status = raw.status()
    return status["regions"], status["open_fds"]


def settled_counts(raw: Raw, expected: tuple[int, int], timeout: float = 2.0) -> tuple[int, int]:
    """counts(raw) once they are `expected`, or after `timeout` s: a
    connection the daemon hangs up on is released asynchronously."""
    deadline = time.monotonic() + timeout
    while (now := counts(raw)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def error_message(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "(the connection was closed)"
    return str((reply.get("error") or {}).get("message", ""))


def assert_refused_promptly(raw: Raw, reply: dict[str, Any] | None, what: str, *,
                            closing_allowed: bool = False) -> None:
    assert refused(reply), f"{what} was served: {reply}"
    if not closing_allowed:
        assert reply is not None, f"{what}: the daemon closed the connection without an error reply"
    assert raw.seconds < PROMPT, f"{what}: the refusal took {raw.seconds:.2f} s"


@contextlib.contextmanager
def served_region(raw: Raw, shape: MapShape, store: Path) -> Iterator[int]:
    """A region the daemon accepted on `raw` from a forged but faithful map."""
    with registered_uffd(1) as uffd:
        with forged_map(shape, store, uffd=uffd.fd, address=uffd.address) as (message, fds):
            reply = raw.request(message, fds)
        assert reply and reply.get("ok"), f"a faithful copy of the library's map was refused: {reply}"
        yield reply["region"]


# === 1. descriptors attached to anything but map are closed ======================================

OWN_REGION = "the id of a region this connection holds"  # filled in by the test
NOT_MAP_REQUESTS = {
    "status": ({"op": "status"}, 300),
    "a second hello": ({"op": "hello", "v": 1, "pid": 1}, 100),
    "an unknown op": ({"op": "no-such-op"}, 100),
    "flush of no region": ({"op": "flush", "region": 987654}, 100),
    "stats of its own region": ({"op": "stats", "region": OWN_REGION}, 100),
    "flush of its own region": ({"op": "flush", "region": OWN_REGION}, 100),
    "backing of its own region": ({"op": "backing", "region": OWN_REGION}, 100),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("request_name", list(NOT_MAP_REQUESTS))
def test_descriptors_sent_with_a_request_other_than_map_are_closed(daemon, spawn, store, map_shape, request_name):
    message, repeats = NOT_MAP_REQUESTS[request_name]
    nulls = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(4)]
    try:
        with Raw(daemon.path) as raw, contextlib.ExitStack() as stack:
            if message.get("region") == OWN_REGION:
                message = {**message, "region": stack.enter_context(served_region(raw, map_shape, store))}
            before = raw.status()["open_fds"]
            for _ in range(repeats):
                assert raw.request(message, nulls) is not None, f"the daemon hung up on {request_name}"
            after = raw.status()["open_fds"]
        assert after <= before + 5, (
            f"{repeats} × {request_name} with 4 descriptors each: the daemon holds {after - before} more "
            f"descriptors ({before} -> {after})")
    finally:
        for fd in nulls:
            os.close(fd)
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["more descriptors than a message may carry", "a message that is not JSON"])
def test_descriptors_sent_with_a_malformed_message_are_closed(daemon, spawn, store, what):
    nulls = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(12)]
    try:
        with Raw(daemon.path) as observer:
            before = observer.status()["open_fds"]
            for _ in range(50):
                with Raw(daemon.path) as raw:  # the daemon may hang up on a malformed message
                    if what == "a message that is not JSON":
                        raw.request(b"\x00not json{", nulls[:4], timeout=5)
                    else:
                        raw.request({"op": "status"}, nulls, timeout=5)
            after = settled_counts(observer, (0, before))[1]
        assert after <= before + 5, f"50 × {what}: the daemon holds {after - before} more descriptors"
    finally:
        for fd in nulls:
            os.close(fd)
    assert_still_serves(daemon, spawn, store)


# === 2. only a userfaultfd of the sender is a region's uffd ========================================


@contextlib.contextmanager
def not_a_userfaultfd(kind: str, tmp_path: Path) -> Iterator[int]:
    """A descriptor of every kind but the one map wants."""
    with contextlib.ExitStack() as stack:
        if kind == "pipe":
            read_end, write_end = os.pipe()
            stack.callback(os.close, read_end)
            stack.callback(os.close, write_end)
            os.write(write_end, b"\0" * 64)  # a forged "fault message" to read
            yield read_end
        elif kind == "socketpair":
            end, other = socket.socketpair()
            stack.enter_context(end)
            stack.enter_context(other)
            yield end.fileno()
        elif kind == "eventfd":
            fd = os.eventfd(1)
            stack.callback(os.close, fd)
            yield fd
        elif kind == "pidfd":
            fd = os.pidfd_open(os.getpid())
            stack.callback(os.close, fd)
            yield fd
        elif kind == "epoll":
            yield stack.enter_context(select.epoll()).fileno()
        elif kind == "regular file":
            path = tmp_path / "not-a-uffd.bin"
            path.write_bytes(bytes(PAGE))
            fd = os.open(path, os.O_RDWR)
            stack.callback(os.close, fd)
            yield fd
        elif kind == "memfd":
            fd = os.memfd_create("not-a-uffd")
            stack.callback(os.close, fd)
            yield fd
        elif kind == "directory":
            fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fd)
            yield fd
        elif kind == "/dev/zero":
            fd = os.open("/dev/zero", os.O_RDWR)
            stack.callback(os.close, fd)
            yield fd
        else:
            raise AssertionError(kind)


NOT_USERFAULTFDS = ["pipe", "socketpair", "eventfd", "pidfd", "epoll", "regular file", "memfd", "directory",
                    "/dev/zero"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", NOT_USERFAULTFDS)
def test_map_refuses_a_descriptor_that_is_not_a_userfaultfd(daemon, spawn, store, map_shape, tmp_path, kind):
    with Raw(daemon.path) as raw, not_a_userfaultfd(kind, tmp_path) as impostor, registered_uffd(1) as region:
        before = counts(raw)
        with forged_map(map_shape, store, uffd=impostor, address=region.address) as (message, fds):
            reply = raw.request(message, fds, timeout=5)
        assert_refused_promptly(raw, reply, f"map with a {kind} as its uffd")
        assert "userfaultfd" in error_message(reply), \
            f"map with a {kind} as its uffd: the error does not say what is wrong: {error_message(reply)!r}"
        assert counts(raw) == before, f"map with a {kind} as its uffd left a region or descriptors behind"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("decoy", [False, True], ids=["plain", "with-a-present-page-of-its-own-there"])
def test_map_refuses_the_userfaultfd_of_another_process(daemon, spawn, store, map_shape, decoy):
    """A helper process registers a range and hands its uffd to this one,
    which sends it as its own. With a decoy, this process has memory of its
    own, present, at the very addresses the helper registered."""
    address, pages = 0x3A5A_0000_0000 + (os.getpid() % 4096) * (1 << 24), 4
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        donor = spawn("uffd-donor", theirs.fileno(), address, pages, pass_fds=[theirs.fileno()])
        theirs.close()
        donated = donor.expect("donated")
        _data, (uffd_fd,), _flags, _addr = socket.recv_fds(ours, 16, 1)
    assert os.readlink(f"/proc/self/fd/{uffd_fd}") == "anon_inode:[userfaultfd]"
    try:
        with Raw(daemon.path) as raw, contextlib.ExitStack() as stack:
            if decoy:
                map_at(address, (pages + 1) * PAGE)
                stack.callback(unmap_at, address, (pages + 1) * PAGE)
                for page in range(pages + 1):
                    ctypes.memset(address + page * PAGE, 0x78, 1)  # present, and ours
            before = counts(raw)
            with forged_map(map_shape, store, uffd=uffd_fd, address=donated["address"],
                            size=donated["size"]) as (message, fds):
                reply = raw.request(message, fds, timeout=5)
            assert_refused_promptly(raw, reply, "map with another process's userfaultfd")
            assert "userfaultfd" in error_message(reply), error_message(reply)
            assert counts(raw) == before, "map with another process's userfaultfd left a region behind"
    finally:
        os.close(uffd_fd)
        donor.send("exit")
        donor.finish()
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_a_faithful_copy_of_the_librarys_map_is_served(daemon, spawn, store, map_shape):
    """The control for every forged request here: unchanged, it is served."""
    with Raw(daemon.path) as raw:
        regions, _fds = counts(raw)
        with served_region(raw, map_shape, store) as region_id:
            assert raw.status()["regions"] == regions + 1
            assert raw.request({"op": "unmap", "region": region_id}).get("ok")
        assert wait_for_regions(raw, regions)["regions"] == regions
    assert_still_serves(daemon, spawn, store)


# === 3. a failed map leaves nothing, and pagers still exit ==========================================


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.timeout(60)
def test_an_embedded_pager_exits_when_its_client_goes_after_bad_maps(spawn, tmp_path):
    path = tmp_path / "embedded.bin"
    path.write_bytes(bytes(PAGE))
    messages = run_child(spawn, "bad-maps-to-embedded-pager", path, timeout=30)
    pager_pid = one(messages, "pager")["pid"]
    served = {what: reply for what, reply in one(messages, "bad-maps")["replies"].items() if not refused(reply)}
    deadline = time.monotonic() + 15
    while not is_gone(pager_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = not is_gone(pager_pid)
    if alive:
        os.kill(pager_pid, signal.SIGKILL)
    assert not served, f"the embedded pager served bad maps: {served}"
    assert not alive, "the embedded pager still runs 15 s after its only client went away"


@pytest.mark.timeout(60)
def test_a_daemon_exits_cleanly_on_sigterm_after_bad_maps(serve, map_shape, tmp_path):
    daemon = serve()
    store = tmp_path / "store.bin"
    store.write_bytes(bytes(PAGE))
    with Raw(daemon.path) as raw:
        for kind in ("pipe", "eventfd", "memfd"):
            with not_a_userfaultfd(kind, tmp_path) as impostor, \
                    forged_map(map_shape, store, uffd=impostor, address=1 << 40) as (message, fds):
                raw.request(message, fds, timeout=5)
        with registered_uffd(1) as region, \
                forged_map(map_shape, store, uffd=region.fd, address=region.address, without=("uffd",)) as (m, fds):
            raw.request(m, fds, timeout=5)
        daemon.process.terminate()
        code = daemon.process.wait(timeout=10)
    daemon.started = False  # stopped here
    assert code == 0, f"the daemon ended with {describe_returncode(code)} on SIGTERM after bad maps"
    assert not os.path.exists(daemon.path), "the daemon left its socket behind"


# === 4. sizes cost nothing in proportion; tenant limits ==============================================

CLAIMED_SIZES = [1 << shift for shift in range(57, 30, -1)]  # 2**57 ... 2**31
MAX_MAPPABLE = 1 << 46  # registered in full below this: more would not fit this process's address space
RSS_LIMIT_KIB = 200 * 1024


@pytest.mark.timeout(120)
def test_sizes_a_client_names_cost_the_daemon_nothing_in_proportion(daemon, spawn, store, map_shape):
    outcomes: list[tuple[int, dict[str, Any] | None, float]] = []
    slowest_status, largest_rss = 0.0, 0
    with Raw(daemon.path) as raw, Raw(daemon.path) as observer:
        for index in range(120):
            size = CLAIMED_SIZES[index % len(CLAIMED_SIZES)]
            pages = size // PAGE if size <= MAX_MAPPABLE else 1
            with registered_uffd(pages) as region:
                with forged_map(map_shape, store, uffd=region.fd, address=region.address, size=size) as (m, fds):
                    reply = raw.request(m, fds, timeout=10)
            outcomes.append((size, reply, raw.seconds))
            status = observer.status(timeout=5)
            slowest_status = max(slowest_status, observer.seconds)
            largest_rss = max(largest_rss, status["rss_kib"])
            assert daemon.process.poll() is None, f"the daemon died at map #{index} of {size} bytes"
    slow = [(size, round(seconds, 2)) for size, _reply, seconds in outcomes if seconds > 2.0]
    unclear = [(size, reply) for size, reply, _s in outcomes
               if reply is None or (not reply.get("ok") and not error_message(reply))]
    past_the_address_space = [
        (size, reply) for size, reply, _s in outcomes if size > 1 << 47 and (
            not refused(reply) or reply is None
            or (reply["error"].get("type") != "ValueError" and reply["error"].get("errno") is None)
            or not any(word in error_message(reply).lower() for word in LIMIT_WORDS))]
    assert largest_rss < RSS_LIMIT_KIB, f"the daemon grew to {largest_rss // 1024} MiB of RSS"
    assert slowest_status < 2.0, f"status took {slowest_status:.2f} s at worst during the maps"
    assert not slow, f"maps answered only after more than 2 s: {slow}"
    assert not unclear, f"maps answered without an error message: {unclear[:3]}"
    assert not past_the_address_space, \
        f"sizes past 2**47 not refused with an error naming a maximum: {past_the_address_space[:3]}"
    assert_still_serves(daemon, spawn, store)


def names_a_limit(result: dict[str, Any]) -> bool:
    return result.get("errno") == errno.EDQUOT or "limit" in str(result.get("message", "")).lower()


def map_in(child: Child, size: int) -> dict[str, Any]:
    child.send(f"map {size}")
    return child.expect("map")


@contextlib.contextmanager
def two_connections_of_one_uid(serve: Callable[..., ServeProcess], spawn: Callable[..., Child], store: Path,
                               *options: str) -> Iterator[tuple[Child, Child]]:
    """Two `regions` clients of a daemon started with `options`, ready; once
    the block is done, both must end cleanly, their regions go, and the
    daemon still serves."""
    daemon = serve(*options)
    first, second = spawn("regions", daemon.path, store), spawn("regions", daemon.path, store)
    first.expect("ready")
    second.expect("ready")
    yield first, second
    first.finish()
    second.finish()
    with Raw(daemon.path) as raw:
        wait_for_regions(raw, 0)
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_a_uid_holds_at_most_max_regions_regions_across_its_connections(serve, spawn, store):
    with two_connections_of_one_uid(serve, spawn, store, "--max-regions", "5") as (first, second):
        held = [map_in(first, PAGE) for _ in range(3)] + [map_in(second, PAGE) for _ in range(2)]
        assert all(result["ok"] for result in held), f"maps within the limit failed: {held}"
        sixth = map_in(second, PAGE)
        assert not sixth["ok"], "a 6th region was mapped under --max-regions 5 (over two connections of one uid)"
        assert names_a_limit(sixth), f"the 6th map failed without naming the limit: {sixth}"
        first.send("close 0")
        assert first.expect("close")["ok"]
        after_close = map_in(second, PAGE)
        assert after_close["ok"], f"a region closed does not free its place under the limit: {after_close}"


@pytest.mark.timeout(60)
def test_a_uid_maps_at_most_max_mapped_bytes_across_its_connections(serve, spawn, store):
    with two_connections_of_one_uid(serve, spawn, store, "--max-mapped", str(1 << 20)) as (first, second):
        whole = map_in(first, 1 << 20)
        assert whole["ok"], f"a map of exactly --max-mapped bytes failed: {whole}"
        for child in (first, second):
            more = map_in(child, PAGE)
            assert not more["ok"], "a uid mapped more than --max-mapped 1048576 bytes"
            assert names_a_limit(more), f"the map past --max-mapped failed without naming the limit: {more}"
        first.send("close 0")
        assert first.expect("close")["ok"]
        assert map_in(second, PAGE)["ok"], "bytes closed do not free their place under --max-mapped"


# === 5. strict validation ==========================================================================


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["status", "map", "flush"])
def test_a_request_before_hello_is_refused_and_never_served(daemon, spawn, store, map_shape, op):
    with Raw(daemon.path) as observer, registered_uffd(1) as region:
        before = counts(observer)
        with Raw(daemon.path, hello=False) as raw:
            with forged_map(map_shape, store, uffd=region.fd, address=region.address) as (message, fds):
                request = {"status": ({"op": "status"}, []), "flush": ({"op": "flush", "region": 1}, []),
                           "map": (message, fds)}[op]
                reply = raw.request(*request, timeout=5)
            assert_refused_promptly(raw, reply, f"{op} before hello")
            assert refused(raw.request({"op": "status"}, timeout=5)), "a connection that skipped hello was served later"
        assert settled_counts(observer, before) == before, f"{op} before hello left a region or descriptors behind"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [1.0, True, "1", 2, 0, None, [1], {"v": 1}, 2**64], ids=repr)
def test_hello_refuses_a_version_that_is_not_the_integer_1(daemon, spawn, store, version):
    with Raw(daemon.path, hello=False) as raw:
        reply = raw.request({"op": "hello", "v": version, "pid": os.getpid()}, timeout=5)
        assert_refused_promptly(raw, reply, f"hello with v={version!r}")
    with Raw(daemon.path, hello=False) as raw:
        reply = raw.request({"op": "hello", "pid": os.getpid()}, timeout=5)
        assert_refused_promptly(raw, reply, "hello without v")
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_message_that_is_not_plain_utf8_json_is_refused(daemon, spawn, store, encoding):
    hello = json.dumps({"op": "hello", "v": 1, "pid": os.getpid()}).encode(encoding)
    with Raw(daemon.path, hello=False) as raw:
        reply = raw.request(hello, timeout=5)
        assert_refused_promptly(raw, reply, f"a {encoding} hello", closing_allowed=True)
    with Raw(daemon.path) as raw:
        reply = raw.request(json.dumps({"op": "status"}).encode(encoding), timeout=5)
        assert_refused_promptly(raw, reply, f"a {encoding} status", closing_allowed=True)
    assert_still_serves(daemon, spawn, store)


DEEP = 10_000
NESTED = {
    "a bare nested list": b"[" * DEEP + b"]" * DEEP,
    "a status with a nested list field": b'{"op":"status","x":' + b"[" * DEEP + b"]" * DEEP + b"}",
    "nested objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "a region id of 5000 digits": b'{"op":"stats","region":' + b"9" * 5000 + b"}",
    "a message past 64 KiB": json.dumps({"op": "status", "pad": "x" * (100 << 10)}).encode(),
    "an empty message": b" ",
    "a JSON array": b'["op", "status"]',
    "a JSON string": b'"status"',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", list(NESTED))
def test_a_message_the_parser_cannot_take_is_refused_promptly(daemon, spawn, store, what):
    with Raw(daemon.path) as raw:
        reply = raw.request(NESTED[what], timeout=5)
        assert_refused_promptly(raw, reply, what, closing_allowed=True)
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_map_refuses_a_writeback_interval_below_the_minimum(daemon, spawn, store):
    intervals = [1e-9, 1e-3, 0.05, -1.0]
    attempts = [{"store": f"file://{store}", "size": PAGE, "writeback_interval": seconds} for seconds in intervals]
    results = [m for m in run_child(spawn, "map-attempts", daemon.path, json.dumps(attempts)) if m["what"] == "attempt"]
    accepted = [intervals[r["index"]] for r in results if r["ok"]]
    not_value_errors = [(intervals[r["index"]], r["type"]) for r in results if not r["ok"] and not r["is_value"]]
    assert not accepted, f"map(writeback_interval=...) accepted {accepted}"
    assert not not_value_errors, f"map(writeback_interval=...) raised other than ValueError: {not_value_errors}"
    assert_still_serves(daemon, spawn, store)


# Every field of map, each with values the daemon must refuse. Sizes and
# offsets also past what a file offset or the address space can hold.
BAD_MAP_FIELDS: dict[str, list[Any]] = {
    "size": ["4096", 4096.0, True, -4096, 0, PAGE + 1, None, [PAGE], 1 << 63, 1 << 64, 1 << 200],
    "offset": [1, "0", -PAGE, 0.0, True, None, (1 << 63) - PAGE, 1 << 63, 1 << 64],
    "address": ["0x7f0000000000", 1, 0, -PAGE, 1 << 64, None, 4096.0],
    "tracking": ["bogus", 1, None, ["async"]],
    "fork_policy": ["bogus", 0, None, ["on-write"]],
    "keep_child_portions": ["yes", 1, 0, "false", [True]],
    "children": [7, ["file:///tmp/x"], {}, True, "file:///tmp/children-without-a-descriptor.bin"],
    "url": [7, "", "http://example.com/x", None, "file:///tmp/a%00b", "file://host/tmp/x", "relative/path"],
    "writeback_interval": [1e-9, 0.01, -1, float("nan"), float("inf"), "5", True, [5]],
    "an unknown field": [1, "x", None],
    "op": ["MAP", "map ", None, 7],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", list(BAD_MAP_FIELDS))
def test_map_refuses_a_field_of_the_wrong_type_or_range(daemon, spawn, store, map_shape, field):
    served, closed, slow, left = [], [], [], []
    with contextlib.ExitStack() as connections:
        raw = connections.enter_context(Raw(daemon.path))
        for value in BAD_MAP_FIELDS[field]:
            changes = {"bogus" if field == "an unknown field" else field: value}
            with registered_uffd(1) as region:
                before = counts(raw)
                with forged_map(map_shape, store, uffd=region.fd, address=region.address,
                                changes=changes) as (message, fds):
                    reply = raw.request(message, fds, timeout=5)
                if reply is None:
                    closed.append(value)
                    raw = connections.enter_context(Raw(daemon.path))
                    continue
                if not refused(reply):
                    served.append(value)
                    raw.request({"op": "unmap", "region": reply["region"]}, timeout=5)
                if raw.seconds > PROMPT:
                    slow.append((value, round(raw.seconds, 2)))
                if counts(raw) != before:
                    left.append(value)
        with served_region(raw, map_shape, store):
            pass  # the same request, unchanged, is served: each refusal above was for the one field
    assert not served, f"map served {field} = {served}"
    assert not closed, f"map with {field} = {closed}: the connection was closed without an error reply"
    assert not slow, f"refusals of {field} took more than {PROMPT} s: {slow}"
    assert not left, f"refused maps with {field} = {left} left a region or descriptors behind"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_map_refuses_extra_or_missing_descriptors(daemon, spawn, store, map_shape):
    nulls = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(2)]
    served = []
    try:
        with contextlib.ExitStack() as connections:
            raw = connections.enter_context(Raw(daemon.path))
            before = counts(raw)
            with registered_uffd(1) as region:
                with forged_map(map_shape, store, uffd=region.fd, address=region.address) as (message, fds):
                    for what, attached in (("no descriptor", []), ("an extra /dev/null", [*fds, nulls[0]]),
                                           ("two extra", [*fds, *nulls]), ("the uffd twice", [fds[0], *fds])):
                        reply = raw.request(message, attached, timeout=5)
                        if reply is None:
                            raw = connections.enter_context(Raw(daemon.path))
                        elif not refused(reply):
                            served.append(what)
                            raw.request({"op": "unmap", "region": reply["region"]}, timeout=5)
            after = wait_for_regions(raw, before[0])
        assert not served, f"map served with {served}"
        assert (after["regions"], after["open_fds"]) == before, "refused maps left a region or descriptors"
    finally:
        for fd in nulls:
            os.close(fd)
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["", "MAP", "Status", "_op_status", "__init__", "serve", "stop", None, 7, ["status"]],
                         ids=repr)
def test_an_unknown_op_is_refused(daemon, spawn, store, op):
    with Raw(daemon.path) as raw:
        reply = raw.request({"op": op}, timeout=5)
        assert_refused_promptly(raw, reply, f"op {op!r}")
        reply = raw.request({"no": "op"}, timeout=5)
        assert_refused_promptly(raw, reply, "a request without op", closing_allowed=True)
    assert_still_serves(daemon, spawn, store)


FORGED_REGION_IDS: list[Any] = [1 << 64, 1 << 200, -1, 0, "1", 1.5, True, None, [1], {"id": 1}]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["flush", "stats", "unmap", "backing", "adopt"])
def test_a_forged_or_foreign_region_id_is_refused(daemon, spawn, store, map_shape, op):
    with contextlib.ExitStack() as connections:
        victim = connections.enter_context(Raw(daemon.path))
        theirs = connections.enter_context(served_region(victim, map_shape, store))
        raw = connections.enter_context(Raw(daemon.path))
        served, slow = [], []
        for region_id in [*FORGED_REGION_IDS, theirs]:
            reply = raw.request({"op": op, "region": region_id}, timeout=5)
            if reply is None:
                served.append((region_id, "the connection was closed without an error reply"))
                raw = connections.enter_context(Raw(daemon.path))
            elif not refused(reply):
                served.append((region_id, reply))
            elif raw.seconds > PROMPT:
                slow.append((region_id, round(raw.seconds, 2)))
        assert not served, f"{op} with forged or another connection's region ids: {served}"
        assert not slow, f"{op} refusals took more than {PROMPT} s: {slow}"
        stats = victim.request({"op": "stats", "region": theirs}, timeout=5)
        assert stats and stats.get("ok"), f"the victim's region was harmed: {stats}"
    assert_still_serves(daemon, spawn, store)


# === 6. the daemon never opens a path with its own rights ============================================

OTHER_UID = 12345


@pytest.fixture
def another_uids_files(tmp_path: Path) -> tuple[Path, bytes, Path, bytes]:
    """(private, its bytes, public, its bytes): two pages of uid 12345's,
    mode 0600 and 0644."""
    made = []
    for name, mode in (("private.bin", 0o600), ("public.bin", 0o644)):
        path = tmp_path / name
        data = os.urandom(PAGE)
        path.write_bytes(data)
        os.chown(path, OTHER_UID, OTHER_UID)
        path.chmod(mode)
        made += [path, data]
    return tuple(made)  # type: ignore[return-value]


def map_without_dac(daemon: Any, spawn: Callable[..., Child],
                    files: tuple[Path, bytes, Path, bytes]) -> list[dict[str, Any]]:
    """The messages of a `map-without-dac` client (root without the DAC
    capabilities) that maps another uid's private and public file."""
    private, _secret, public, _data = files
    return run_child(spawn, "map-without-dac", daemon.path, private, public, wrapper=ROOT_WITHOUT_DAC)


@pytest.mark.timeout(60)
def test_a_client_without_dac_capabilities_cannot_read_another_uids_file_through_the_daemon(
        daemon, spawn, store, another_uids_files):
    private, secret, _public, _data = another_uids_files
    messages = map_without_dac(daemon, spawn, another_uids_files)
    caps = one(messages, "caps")
    assert caps["sys_ptrace"] and not (caps["dac_override"] or caps["dac_read_search"] or caps["fowner"]), \
        f"the client's capabilities are not what this test needs: {caps}"
    result = one(messages, "private")
    read = [m for m in messages if m["what"] == "read-private"]
    assert not read, "the client read a 0600 file of another uid through the daemon" + (
        " (the secret itself)" if read and read[0]["sha256"] == hashlib.sha256(secret).hexdigest() else "")
    assert not result["ok"] and result["is_permission"], f"map of another uid's 0600 file: {result}"
    assert str(private) in result["message"], f"the error does not name the file: {result['message']!r}"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_a_client_without_dac_capabilities_cannot_write_another_uids_file_through_the_daemon(
        daemon, spawn, store, another_uids_files):
    _private, _secret, public, data = another_uids_files
    result = one(map_without_dac(daemon, spawn, another_uids_files), "public")
    assert result["mapped"], f"map of another uid's 0644 file (readable) failed: {result}"
    assert result["sha256"] == hashlib.sha256(data).hexdigest(), "the 0644 file did not read as itself"
    flush = result["flush"]
    with Raw(daemon.path) as raw:
        wait_for_regions(raw, 0)  # the client has gone: its region was released (and never written back)
    assert public.read_bytes() == data, "another uid's 0644 file was written through the daemon"
    assert not flush["ok"] and flush["is_permission"], f"flush() of a file the client may not write: {flush}"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_a_map_naming_a_path_without_its_descriptor_is_refused(daemon, spawn, store, map_shape,
                                                               another_uids_files):
    """The daemon (root) must not open the path itself: a map naming a root-
    readable file but carrying only a uffd is refused."""
    private, _secret, _public, _data = another_uids_files
    with Raw(daemon.path) as raw, registered_uffd(1) as region:
        before = counts(raw)
        with forged_map(map_shape, private, uffd=region.fd, address=region.address,
                        without=("file",)) as (message, fds):
            reply = raw.request(message, fds, timeout=5)
        assert_refused_promptly(raw, reply, "map of a path without its descriptor")
        assert counts(raw) == before
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_an_encrypted_map_creates_no_catalog_where_the_client_may_not_write(daemon, spawn, store, tmp_path):
    """The catalog goes beside the store: it must be created with the
    client's rights too, never the daemon's, in a directory of another uid."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    public = theirs / "public.bin"
    public.write_bytes(bytes(PAGE))
    public.chmod(0o644)
    os.chown(public, OTHER_UID, OTHER_UID)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    theirs.chmod(0o755)
    attempts = [{"store": f"file://{public}", "size": PAGE, "generated_key": True}]
    result = one(run_child(spawn, "map-attempts", daemon.path, json.dumps(attempts), wrapper=ROOT_WITHOUT_DAC),
                  "attempt")
    created = sorted(path.name for path in theirs.iterdir() if path != public)
    assert not created, f"the daemon created {created} in a directory of uid {OTHER_UID} for a client that may not"
    assert not result["ok"] and result["is_permission"], f"an encrypted map whose catalog it may not create: {result}"
    assert_still_serves(daemon, spawn, store)


# === 7. the client checks whom it talks to =============================================================


@pytest.mark.timeout(60)
def test_the_client_sends_no_key_nor_descriptor_to_a_pager_run_by_another_uid(spawn, world_dir, tmp_path):
    path = world_dir / "fake.sock"
    fake = spawn("fake-pager", path, wrapper=AS_NOBODY)
    assert fake.expect("listening")["uid"] == NOBODY
    store = tmp_path / "secret-store.bin"
    store.write_bytes(bytes(PAGE))
    messages = run_child(spawn, "map-with-key", path, store, timeout=30)
    received = [m for m in fake.finish() if m["what"] == "received"]
    refusals = [m for m in messages if m.get("ok") is False]
    leaked = [m for m in received if m["has_key"] or m["fds"]]
    assert not leaked, f"a pager of uid {NOBODY} was sent key material or descriptors: {leaked}"
    assert refusals, f"the client talked to a pager of uid {NOBODY} without complaint: {messages}"
    refusal = refusals[0]
    assert refusal["is_permission"], f"the client's refusal is not a PermissionError: {refusal}"
    assert str(NOBODY) in refusal["message"], f"the refusal does not name the peer's uid: {refusal['message']!r}"


# === 8. pseudo files are not stores ====================================================================

SYS_FILE = next((p for p in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/uevent_seqnum",
                             "/sys/kernel/profiling") if os.path.isfile(p)), "/sys/kernel/uevent_seqnum")
PSEUDO_FILES = ["/proc/self/mem", "/proc/self/environ", "/proc/self/fd/0", SYS_FILE, "a link to /proc/self/mem",
                "/proc/self/fd/0 of a regular file"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pseudo", PSEUDO_FILES)
def test_a_pseudo_file_is_refused_as_a_store(daemon, spawn, store, tmp_path, pseudo):
    path = pseudo
    stdin: Any = subprocess.DEVNULL
    if pseudo == "a link to /proc/self/mem":
        path = str(tmp_path / "innocent.bin")
        os.symlink("/proc/self/mem", path)
    elif pseudo == "/proc/self/fd/0 of a regular file":
        path = "/proc/self/fd/0"
        stdin = open(store, "rb")  # the client's fd 0 is a regular file on a real filesystem
    try:
        attempts = [{"store": f"file://{path}", "size": PAGE}]
        result = one(run_child(spawn, "map-attempts", daemon.path, json.dumps(attempts), stdin=stdin), "attempt")
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    assert not result["ok"], f"map of {pseudo} as a store was served"
    assert result["is_value"] or result["is_oserror"], f"map of {pseudo}: {result}"
    assert path in result["message"], f"the error does not name {path}: {result['message']!r}"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pseudo", ["/proc/self/mem", "/proc/self/environ", SYS_FILE])
def test_the_daemon_refuses_a_store_descriptor_of_a_pseudo_file(daemon, spawn, store, map_shape, pseudo):
    assert "file" in map_shape.slots, "Pager.map sends no store descriptor: the daemon opens paths itself"
    fd = os.open(pseudo, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Raw(daemon.path) as raw, registered_uffd(1) as region:
            before = counts(raw)
            with forged_map(map_shape, fd, uffd=region.fd, address=region.address,
                            changes={"url": f"file://{pseudo}"}) as (message, fds):
                reply = raw.request(message, fds, timeout=5)
            assert_refused_promptly(raw, reply, f"a store descriptor of {pseudo}")
            assert counts(raw) == before
    finally:
        os.close(fd)
    assert_still_serves(daemon, spawn, store)


# === 14. a FIFO blocks nobody ============================================================================


@pytest.fixture
def nobody_world(world_dir: Path, serve: Callable[..., ServeProcess]) -> Iterator[tuple[ServeProcess, Path, Path]]:
    """(a daemon running as nobody, a FIFO it may read but not write, a
    store file everyone may read), all in a directory nobody owns. At
    teardown the FIFO gets a writer, so that a reader blocked on it wakes."""
    fifo = world_dir / "store.fifo"
    os.mkfifo(fifo, 0o644)
    data = world_dir / "normal.bin"
    data.write_bytes(os.urandom(8 * PAGE))
    data.chmod(0o644)
    daemon = serve(wrapper=AS_NOBODY_WITH_PTRACE, directory=world_dir)
    yield daemon, fifo, data
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(60)
def test_map_of_a_fifo_is_refused_promptly_and_blocks_no_one(spawn, nobody_world):
    daemon, fifo, data = nobody_world
    attempts = [{"store": f"file://{fifo}", "size": PAGE}]
    client = spawn("map-attempts", daemon.path, json.dumps(attempts), wrapper=AS_NOBODY_WITH_PTRACE)
    try:
        result = client.expect("attempt", timeout=10)
    except AssertionError:
        result = None
    started = time.monotonic()
    try:
        status_of(daemon, timeout=2)
    except (TimeoutError, AssertionError) as exc:
        pytest.fail(f"while a client maps a FIFO, the daemon does not answer status within 2 s ({exc}); "
                    f"the client {'got ' + repr(result) if result else 'got no answer in 10 s'}")
    assert time.monotonic() - started < 2.0
    assert result is not None, "map of a FIFO got no answer within 10 s"
    assert not result["ok"], "map of a FIFO was served"
    assert result["seconds"] < 2.0, f"map of a FIFO was refused only after {result['seconds']:.1f} s"
    assert str(fifo) in result["message"], f"the error does not name the FIFO: {result['message']!r}"
    client.finish()
    assert_still_serves(daemon, spawn, data, wrapper=AS_NOBODY_WITH_PTRACE)


@pytest.mark.timeout(60)
def test_a_raw_map_naming_a_fifo_does_not_block_the_daemon(spawn, nobody_world, map_shape):
    daemon, fifo, data = nobody_world
    # A reader's descriptor (root's, which the daemon could not get itself):
    # no writer appears, so a daemon that opens the path for reading blocks.
    fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with Raw(daemon.path) as raw, registered_uffd(1) as region:
            with forged_map(map_shape, fifo_fd, uffd=region.fd, address=region.address,
                            changes={"url": f"file://{fifo}"}) as (message, fds):
                raw.send(message, fds)
            try:
                reply: dict[str, Any] | None | str = raw.receive(timeout=2)
            except TimeoutError:
                reply = "no answer within 2 s"
            try:
                status_of(daemon, timeout=2)
                answering = True
            except (TimeoutError, AssertionError):
                answering = False
            assert answering, f"a map naming a FIFO blocks the daemon: no status within 2 s (the map: {reply})"
            assert not isinstance(reply, str), f"a map naming a FIFO: {reply}"
            assert refused(reply), f"a map naming a FIFO was served: {reply}"
    finally:
        os.close(fifo_fd)
    assert_still_serves(daemon, spawn, data, wrapper=AS_NOBODY_WITH_PTRACE)


# === 15. offsets, sizes and URLs at their limits ==========================================================


@pytest.mark.timeout(60)
def test_map_refuses_offsets_and_sizes_past_what_a_file_or_address_space_holds(daemon, spawn, store):
    cases = [("offset 2**63 - 4096", PAGE, (1 << 63) - PAGE), ("offset 2**63", PAGE, 1 << 63),
             ("offset 2**64", PAGE, 1 << 64), ("size 2**63", 1 << 63, 0), ("size 2**64", 1 << 64, 0),
             ("size 2**48", 1 << 48, 0)]
    attempts = [{"store": f"file://{store}", "size": size, "offset": offset} for _what, size, offset in cases]
    results = [m for m in run_child(spawn, "map-attempts", daemon.path, json.dumps(attempts)) if m["what"] == "attempt"]
    wrong = [(cases[r["index"]][0], "served" if r["ok"] else f"{r['type']}: {r['message']}")
             for r in results if r["ok"] or r["type"] != "ValueError"]
    assert len(results) == len(cases)
    assert not wrong, f"map() did not raise ValueError for: {wrong}"
    assert_still_serves(daemon, spawn, store)


@pytest.mark.timeout(60)
def test_a_url_with_a_nul_byte_gets_an_error_naming_the_url(daemon, spawn, store):
    url = f"file://{store}%00.bin"
    result = one(run_child(spawn, "map-attempts", daemon.path, json.dumps([{"store": url, "size": PAGE}])), "attempt")
    assert not result["ok"], f"map of {url} was served"
    assert result["is_value"] or result["is_oserror"], result
    assert url in result["message"], f"the error does not name the URL: {result['message']!r}"
    assert_still_serves(daemon, spawn, store)


# --- who may connect: allowed users and groups, the socket's mode and group -------------------------------


# Clients that may create a userfaultfd (see AS_NOBODY_WITH_PTRACE), one in a supplementary group.
AS_NOBODY_IN_GROUP = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--groups=4242",
                      "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace")


def tenant_outcome(spawn: Callable[..., Child], daemon: ServeProcess, data: Path, wrapper: Sequence[str]
                   ) -> dict[str, Any]:
    """What a `tenant` client run through `wrapper` saw: its connect's
    outcome, and whether its map read the file exactly when it got in."""
    messages = {m["what"]: m for m in run_child(spawn, "tenant", daemon.path, str(data), wrapper=wrapper)}
    if messages["connect"]["ok"]:
        read = messages["read"]
        assert read["ok"] and read["same"], f"an admitted tenant's region does not read as its file: {read}"
    return messages["connect"]


@pytest.mark.timeout(90)
def test_only_root_the_pagers_user_and_allowed_users_and_groups_may_connect(spawn, serve, world_dir):
    data = world_dir / "tenant.bin"
    data.write_bytes(os.urandom(4 * PAGE))
    data.chmod(0o644)

    closed = serve(directory=world_dir)  # root and its own uid only: the socket says so too
    assert stat.S_IMODE(os.stat(closed.path).st_mode) == 0o600
    refused_at_the_door = tenant_outcome(spawn, closed, data, AS_NOBODY_WITH_PTRACE)
    assert not refused_at_the_door["ok"] and refused_at_the_door["is_permission"], refused_at_the_door

    by_user = serve("--allow-users", "nobody", directory=world_dir)
    assert stat.S_IMODE(os.stat(by_user.path).st_mode) == 0o666  # the peer's credentials decide
    assert tenant_outcome(spawn, by_user, data, AS_NOBODY_WITH_PTRACE)["ok"]
    in_group = tenant_outcome(spawn, by_user, data, AS_NOBODY_IN_GROUP)
    assert in_group["ok"], in_group

    private = world_dir / "root-only.bin"  # an admitted tenant reads nothing through the daemon it could not itself
    private.write_bytes(b"secret" * PAGE)
    private.chmod(0o600)
    (read,) = (m for m in run_child(spawn, "tenant", by_user.path, str(private), wrapper=AS_NOBODY_WITH_PTRACE)
               if m["what"] == "read")
    assert not read["ok"] and read["is_permission"] and read["same"] is None, read

    by_group = serve("--allow-groups", "4242", directory=world_dir)
    assert tenant_outcome(spawn, by_group, data, AS_NOBODY_IN_GROUP)["ok"]  # a supplementary group
    outsider = tenant_outcome(spawn, by_group, data, AS_NOBODY_WITH_PTRACE)
    assert not outsider["ok"] and outsider["is_permission"], f"{outsider['type']}: {outsider['message']}"
    assert "may not use this pager" in outsider["message"] and "--allow-groups" in outsider["message"], outsider
    assert by_group.process.poll() is None, "the daemon died refusing a tenant"


@pytest.mark.timeout(60)
def test_a_tenant_at_its_quota_is_refused_and_another_tenant_maps_as_usual(spawn, serve, world_dir):
    data = world_dir / "quota.bin"
    data.write_bytes(os.urandom(4 * PAGE))
    data.chmod(0o644)
    daemon = serve("--allow-users", "nobody", "--max-regions", "1", directory=world_dir)
    with uffd_pager.connect(daemon.path, timeout=10) as root, root.map(f"file://{data}", 4 * PAGE):
        with pytest.raises(uffd_pager.LimitExceeded, match="--max-regions"):
            root.map(f"file://{data}", 4 * PAGE)
        assert tenant_outcome(spawn, daemon, data, AS_NOBODY_WITH_PTRACE)["ok"]  # its own quota: untouched


def test_the_socket_takes_the_mode_and_group_asked(serve, world_dir):
    daemon = serve("--socket-mode", "0660", "--socket-group", "users", directory=world_dir)
    st = os.stat(daemon.path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, grp.getgrnam("users").gr_gid)


@pytest.mark.parametrize("option, value, complaint", [
    ("--allow-users", "no-such-user-here", "no user named"),
    ("--allow-groups", "no-such-group-here", "no group named"),
    ("--socket-mode", "0400", "octal mode from 0600"),  # the pager's own user must write it
    ("--socket-mode", "rw", "octal mode"),
    ("--socket-group", "users,nogroup", "one group"),
])
def test_bad_tenant_options_are_refused_before_anything_listens(socket_dir, option, value, complaint):
    path = socket_dir / "never.sock"
    result = subprocess.run([sys.executable, "-m", "uffd_pager", "serve", "--socket", str(path), option, value],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and complaint in result.stderr, result.stderr
    assert not path.exists()
