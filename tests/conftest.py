"""Shared fixtures: store files, a private pager, a daemon, client processes
driven line by line, and a look at this process's descriptors and mappings.

A thread blocked in a page fault holds the GIL and retries the fault after
every signal, so neither pytest-timeout's SIGALRM handler nor its timer
thread can ever run: a test of this process that deadlocks on a fault would
hang the run. `_hard_watchdog` arms faulthandler's watchdog (a C thread that
needs no GIL) a little after pytest-timeout's limit, and between tests; it
dumps every thread's stack and ends the run (exit status 1). Whatever is
*expected* to block on a fault runs in a client subprocess (`spawn_client`)
and is only ever waited for with timeouts.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

import uffd_pager
from support import accepts, stop_daemon

# Real redis-server processes for the remote-store tests (started only when used).
pytest_plugins = ["redis_fixtures"]

WATCHDOG_MARGIN = 30.0  # seconds after pytest-timeout's own limit
BETWEEN_TESTS = 120.0  # seconds for what runs after a test: wider fixtures, the interpreter's exit


# --- the hard watchdog ---------------------------------------------------------


def _test_timeout(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = request.config.getoption("timeout", None) or request.config.getini("timeout")
    return float(value or 0)


_terminal: int | None = None


def _terminal_fd(config: pytest.Config) -> int:
    """A descriptor of the run's real stderr, for the watchdog's dump: while a
    test runs, fd 2 is pytest's capture file, whose contents are lost when the
    watchdog ends the process."""
    global _terminal
    if _terminal is None:
        capture = config.pluginmanager.getplugin("capturemanager")
        try:
            real = capture._global_capturing.err.targetfd_save  # pytest internals; fd 2 otherwise
        except AttributeError:
            real = sys.__stderr__.fileno()
        _terminal = os.dup(real)  # ours: pytest closes its own when capturing stops
    return _terminal


@pytest.fixture(autouse=True)
def _hard_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Armed for each test, a little after its pytest-timeout; then, until the
    next test re-arms it, for what runs between tests and at exit (a region
    left to the garbage collector or to the interpreter's exit can block there)."""
    seconds = _test_timeout(request)
    if seconds <= 0 or request.config.getoption("usepdb", False):
        yield
        return
    terminal = _terminal_fd(request.config)
    faulthandler.dump_traceback_later(seconds + WATCHDOG_MARGIN, exit=True, file=terminal)
    yield
    faulthandler.dump_traceback_later(BETWEEN_TESTS, exit=True, file=terminal)


def _userfaultfds() -> set[int]:
    """This process's open userfaultfds."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]":
                found.add(int(name))
    return found


@pytest.fixture(autouse=True)
def _no_userfaultfd_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves a region's uffd open in this process fails, and
    the uffd goes: its last reference gone, the kernel unregisters the
    range. Kept, with EVENT_FORK and its pager gone, every later fork() of
    this process (subprocess.Popen) would wait for ever, in the kernel, for
    a reader of the FORK event (dup_userfaultfd_complete), which no timeout
    can interrupt. /dev/null takes the number, so that whoever owns it can
    still close it."""
    before = _userfaultfds()
    yield
    left = sorted(_userfaultfds() - before)
    if left:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fd in left:
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    assert not left, f"the test left userfaultfds {left} open in the test process"


# --- the pagers' state directory ------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Pagers of the run (private ones and daemons inherit the environment)
    keep encrypted stores' anchors in a directory of the run's own, never in
    the machine's /var/lib/uffd-pager."""
    state = tmp_path_factory.mktemp("state")
    state.chmod(0o700)
    previous = os.environ.get("UFFD_PAGER_STATE_DIR")
    os.environ["UFFD_PAGER_STATE_DIR"] = str(state)
    yield
    if previous is None:
        os.environ.pop("UFFD_PAGER_STATE_DIR", None)
    else:
        os.environ["UFFD_PAGER_STATE_DIR"] = previous


# --- store files -----------------------------------------------------------------


@pytest.fixture
def random_file(tmp_path: Path) -> Callable[..., Path]:
    """random_file(size) -> the path of a new file of `size` random bytes."""
    count = 0

    def make(size: int, *, name: str | None = None) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / (name or f"random-{count}.bin")
        with open(path, "wb") as f:
            for start in range(0, size, 8 << 20):
                f.write(os.urandom(min(8 << 20, size - start)))
        return path

    return make


@pytest.fixture
def sparse_file(tmp_path: Path) -> Callable[..., Path]:
    """sparse_file(size, {offset: data, ...}) -> the path of a new file of
    `size` bytes, all holes but the data written at those offsets."""
    count = 0

    def make(size: int, writes: dict[int, bytes] | None = None, *, name: str | None = None) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / (name or f"sparse-{count}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.truncate(fd, size)
            for offset, data in (writes or {}).items():
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        return path

    return make


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (a disk that fills up), unmounted at teardown."""
    mountpoint = tmp_path / "small-tmpfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], check=True, timeout=30)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="uffd-test-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# --- pagers ----------------------------------------------------------------------


@pytest.fixture
def pager() -> Iterator[uffd_pager.Pager]:
    """A private pager process, closed (with its regions) at teardown; no
    exception of its own may have escaped to its loop meanwhile (a bug that
    logging alone would hide, the pager serving on)."""
    with uffd_pager.Pager() as p:
        yield p
        if p.alive():
            assert p.status()["internal_errors"] == 0, "the pager logged an internal error (see its stderr)"


class Daemon:
    """A `python -m uffd_pager serve --socket PATH` process."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = str(path)
        self.process = process
        self.stopped = False

    def connect(self) -> uffd_pager.Pager:
        return uffd_pager.connect(self.path)

    def stop(self) -> None:
        """SIGTERM; it must exit with status 0 (support.stop_daemon)."""
        self.stopped = True
        stop_daemon(self.path, self.process)


@pytest.fixture
def start_daemon(socket_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(name="pager.sock", wrapper=(), options=None, args=(), pass_fds=(), stderr=None) ->
    a running Daemon, its command run through `wrapper` (e.g. setpriv) if
    given, with `--socket socket_dir/name` unless `options` say where it
    listens (a --config file; or an inherited socket there), more `serve`
    options `args`, its stderr appended to the file `stderr` if given; waited
    for until its socket accepts, stopped with SIGTERM at teardown (unless
    stopped already), when it must exit cleanly."""
    daemons: list[Daemon] = []

    def start(name: str = "pager.sock", *, wrapper: Sequence[str] = (), options: Sequence[str] | None = None,
              args: Sequence[str] = (), pass_fds: Sequence[int] = (), stderr: Path | None = None) -> Daemon:
        path = socket_dir / name
        with open(stderr, "ab") if stderr is not None else contextlib.nullcontext() as log:
            process = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "uffd_pager", "serve",
                 *(["--socket", str(path)] if options is None else options), *args],
                stdin=subprocess.DEVNULL, cwd="/", pass_fds=pass_fds, stderr=log,
            )
        daemon = Daemon(path, process)
        daemons.append(daemon)
        deadline = time.monotonic() + 20
        while not accepts(path):
            assert process.poll() is None, f"the daemon exited with status {process.returncode}"
            assert time.monotonic() < deadline, f"the daemon is not listening on {path} after 20 s"
            time.sleep(0.02)
        return daemon

    yield start
    for daemon in daemons:
        if not daemon.stopped:
            daemon.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


# --- client processes ----------------------------------------------------------------

# A client (tests/client_child.py) that does what the test tells it on stdin, one command a line,
# and answers one line on stdout for each:
#   map URL SIZE             -> "mapped"       (keeps a view of the region)
#   read FIRST STOP [DELAY]  -> "same" | "differs PAGE": pages [FIRST, STOP) against the file
#   touch PAGE               -> "byte VALUE"    (the page's first byte)
#   stats                    -> "stats"
#   close                    -> "closed"       (the region, then the pager)
#   drop                     -> "dropped"      (lets go of the region without closing it)
#   exit                     -> (none) returns from the script, region or not
# A command that raises answers "error TYPE MESSAGE".
CLIENT_CHILD_PY = Path(__file__).with_name("client_child.py")


class Client:
    """A client process (tests/client_child.py) with a private pager or attached to a daemon."""

    def __init__(self, socket_path: str | None, restarts: int | None = None) -> None:
        """restarts: Pager(restarts=...) of a private pager."""
        self.process = subprocess.Popen(
            [sys.executable, str(CLIENT_CHILD_PY), socket_path or "private",
             *([str(restarts)] if restarts is not None else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        word, pid = self.reply(timeout=30).split()
        assert word == "pager", f"unexpected first line from the client: {word} {pid}"
        self.pager_pid = int(pid)

    def _read_lines(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def reply(self, timeout: float = 30) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"client {self.process.pid} said nothing for {timeout} s; {self.where()}") from None
        if line is None:
            raise AssertionError(f"client {self.process.pid} exited with status {self.process.wait()}")
        return line

    def ask(self, command: str, timeout: float = 30) -> str:
        self.send(command)
        return self.reply(timeout)

    def said_nothing_for(self, seconds: float) -> bool:
        try:
            line = self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        self._lines.put(line)  # type: ignore[arg-type]
        return False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"client {self.process.pid} did not exit within {timeout} s; {self.where()}") from None

    def where(self) -> str:
        """Where the client's main thread sleeps in the kernel."""
        try:
            with open(f"/proc/{self.process.pid}/wchan") as f:
                return f"it sleeps in the kernel at {f.read() or '(running)'}"
        except OSError:
            return "it is gone"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def spawn_client() -> Iterator[Callable[..., Client]]:
    """spawn_client(socket_path, restarts=None) -> a running Client attached
    to that daemon, or with a private pager when socket_path is None (of
    Pager(restarts=...) if given). Killed at teardown."""
    clients: list[Client] = []

    def spawn(socket_path: str | None = None, restarts: int | None = None) -> Client:
        client = Client(socket_path, restarts)
        clients.append(client)
        return client

    yield spawn
    for client in clients:
        client.kill()
        for stream in (client.process.stdin, client.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


# --- this process -------------------------------------------------------------------


class ThisProcess:
    """What /proc says about the test process's descriptors and mappings."""

    @staticmethod
    def uffd_fds() -> int:
        """How many of this process's descriptors are userfaultfds."""
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}"):
                    count += 1
        return count

    @staticmethod
    def mappings() -> set[tuple[int, int]]:
        """(start, end) of every mapping."""
        ranges = set()
        with open("/proc/self/maps") as f:
            for line in f:
                start, end = line.split(None, 1)[0].split("-")
                ranges.add((int(start, 16), int(end, 16)))
        return ranges

    @classmethod
    def maps_all_of(cls, address: int, size: int) -> bool:
        """Whether every byte of [address, address + size) is mapped."""
        covered = address
        for start, end in sorted(cls.mappings()):
            if start <= covered < end:
                covered = end
            if covered >= address + size:
                return True
        return False


@pytest.fixture
def this_process() -> type[ThisProcess]:
    return ThisProcess


@pytest.fixture
def leaves_nothing_behind(this_process: type[ThisProcess]) -> Callable[..., contextlib.AbstractContextManager[None]]:
    """with leaves_nothing_behind(pager): ... -> asserts that the block left no
    userfaultfd and no mapping of 8 MiB or more in this process, and no region
    nor descriptor in the pager (if one is given)."""

    @contextlib.contextmanager
    def check(pager: uffd_pager.Pager | None = None) -> Iterator[None]:
        fds, mappings = this_process.uffd_fds(), this_process.mappings()
        before = pager.status() if pager is not None else None
        yield
        assert this_process.uffd_fds() == fds, "a userfaultfd was left open"
        large_new = [(s, e) for s, e in this_process.mappings() - mappings if e - s >= 8 << 20]
        assert not large_new, f"mappings left behind: {[(hex(s), e - s) for s, e in large_new]}"
        if pager is not None:
            after = pager.status()
            assert (after["regions"], after["open_fds"]) == (before["regions"], before["open_fds"])

    return check
