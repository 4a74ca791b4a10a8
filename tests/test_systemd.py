"""The daemon under systemd: socket activation (LISTEN_FDS/LISTEN_PID) and
sd_notify (READY, STOPPING, WATCHDOG), with the test in systemd's place: it
makes the listening socket, passes it the way systemd does
(tests/systemd_children.py), and listens on NOTIFY_SOCKET itself."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import uffd_pager
from support import map_and_check, run_cli

SYSTEMD_CHILDREN = Path(__file__).with_name("systemd_children.py")
SIZE = 16 * uffd_pager.PAGE_SIZE


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket that
    also learns each sender's pid (SO_PASSCRED)."""

    def __init__(self, directory: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"uffd-test-notify-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(directory / "notify")
            self.sock.bind(self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float) -> tuple[str, int] | None:
        """The next message and its sender's pid, or None within `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pids = [struct.unpack("3i", cdata)[0] for level, kind, cdata in ancillary
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
        return data.decode(), pids[0]

    def wait_for(self, state: str, timeout: float = 20) -> int:
        """Waits for the message `state`: its sender's pid."""
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is None:
                break
            if message[0] == state:
                return message[1]
            seen.append(message[0])
        raise AssertionError(f"no {state} on NOTIFY_SOCKET within {timeout} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify(request, socket_dir, monkeypatch):
    """A NotifyListener, its address in $NOTIFY_SOCKET for what the test starts."""
    listener = NotifyListener(socket_dir, abstract=request.param == "abstract")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    yield listener
    listener.close()


def listening_socket(path: Path, kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
    """What a socket unit's ListenSequentialPacket=PATH makes."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def activated(fd: int) -> list[str]:
    """The wrapper that starts a command as systemd starts a socket unit's service."""
    return [sys.executable, str(SYSTEMD_CHILDREN), "activate", str(fd)]


@pytest.mark.timeout(90)
def test_socket_activated_daemon_serves_and_reports_ready_and_stopping(start_daemon, socket_dir, notify,
                                                                       random_file, tmp_path):
    store = random_file(SIZE)
    path = socket_dir / "activated.sock"
    listener = listening_socket(path)
    log = tmp_path / "daemon.log"
    try:
        daemon = start_daemon("activated.sock", wrapper=activated(listener.fileno()), options=[],
                              args=["--socket-mode", "0660"], pass_fds=[listener.fileno()], stderr=log)
        assert notify.wait_for("READY=1") == daemon.process.pid, "READY=1 came from another process"
    finally:
        listener.close()  # from here only the daemon's copy accepts
    with daemon.connect() as pager, map_and_check(pager, store, SIZE) as region:
        assert region.stats()["faults"] > 0
    daemon.stop()  # SIGTERM: status 0
    assert notify.wait_for("STOPPING=1") == daemon.process.pid
    assert path.exists(), "the daemon removed the socket unit's path"
    assert "not applied to a socket systemd made" in log.read_text(), "--socket-mode ignored without a word"


@pytest.mark.timeout(90)
def test_systemds_own_socket_activate_starts_a_daemon_that_serves(start_daemon, socket_dir, notify, random_file):
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    store = random_file(SIZE)
    path = socket_dir / "activated.sock"
    # It listens, waits for a first connection (start_daemon's probe), then execs the daemon with
    # LISTEN_FDS/LISTEN_PID set and, of the environment, only what -E names.
    wrapper = [tool, "--seqpacket", "--listen", str(path), "-E", "NOTIFY_SOCKET", "-E", "UFFD_PAGER_STATE_DIR"]
    daemon = start_daemon("activated.sock", wrapper=wrapper, options=[])
    assert notify.wait_for("READY=1") == daemon.process.pid
    with daemon.connect() as pager, map_and_check(pager, store, SIZE):
        pass
    daemon.stop()
    assert notify.wait_for("STOPPING=1") == daemon.process.pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watchdog_pid, pings", [(None, True), ("1", False)], ids=["ours", "another-pid"])
def test_watchdog_keep_alives_at_half_the_interval(start_daemon, notify, monkeypatch, watchdog_pid, pings):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    if watchdog_pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", watchdog_pid)
    daemon = start_daemon()  # plain --socket: notification needs no activation
    notify.wait_for("READY=1")
    start = time.monotonic()
    count = 0
    while (left := start + 1.0 - time.monotonic()) > 0 and (message := notify.next(left)) is not None:
        assert message == ("WATCHDOG=1", daemon.process.pid), message
        count += 1
    # every 0.1 s: about 10 within the second; the loop may stall a little on a busy machine
    assert (count >= 4) if pings else count == 0, f"{count} WATCHDOG=1 in 1 s"
    daemon.stop()
    assert notify.wait_for("STOPPING=1") == daemon.process.pid


@pytest.mark.timeout(60)
def test_sockets_passed_to_another_pid_are_not_taken(socket_dir):
    listener = listening_socket(socket_dir / "not-ours.sock")
    try:
        result = run_cli("serve", env={**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"},
                         pass_fds=[listener.fileno()])
    finally:
        listener.close()
    assert result.returncode == 2 and "no socket to listen on" in result.stderr, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "datagram"])
def test_a_passed_socket_of_the_wrong_kind_is_refused(socket_dir, kind):
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(socket_dir / "wrong.sock"))
    if kind == socket.SOCK_STREAM:
        sock.listen(1)
    try:
        result = subprocess.run([*activated(sock.fileno()), sys.executable, "-m", "uffd_pager", "serve"],
                                pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
    finally:
        sock.close()
    assert result.returncode == 1 and "ListenSequentialPacket" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_the_librarys_private_pager_never_notifies(notify, random_file):
    store = random_file(SIZE)
    with uffd_pager.Pager() as pager, map_and_check(pager, store, SIZE):
        pass
    assert notify.next(0.5) is None, "the application's NOTIFY_SOCKET heard from its private pager"


UNITS = Path(uffd_pager.__file__).with_name("systemd")


@pytest.mark.timeout(60)
def test_shipped_units_are_valid_and_activate_the_daemon(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    socket_unit = (UNITS / "uffd-pager.socket").read_text()
    service = (UNITS / "uffd-pager.service").read_text()
    assert "\nListenSequentialPacket=/" in socket_unit, "the pager serves on a SOCK_SEQPACKET socket only"
    assert "\nType=notify\n" in service and "\nExecStart=/usr/local/bin/uffd-pager serve\n" in service
    # verify wants the command to exist: this run's own
    command = Path(sys.executable).with_name("uffd-pager")
    (tmp_path / "uffd-pager.socket").write_text(socket_unit)
    (tmp_path / "uffd-pager.service").write_text(service.replace("/usr/local/bin/uffd-pager", str(command)))
    result = subprocess.run([analyze, "verify", str(tmp_path / "uffd-pager.socket"),
                             str(tmp_path / "uffd-pager.service")], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
