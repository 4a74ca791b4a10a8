"""Plain helpers shared by the test modules and conftest.py (not fixtures:
a test module may not import conftest.py). `tests/` is on sys.path when
pytest runs, so `from support import ...` works from any of them."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import pytest


def accepts(path: Path) -> bool:
    """Whether a socket at `path` accepts a SOCK_SEQPACKET connection (a daemon listens there)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def run_cli(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`uffd-pager ARGS...` (as `python -m uffd_pager`), its output as text."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "uffd_pager", *args], stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kwargs)


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """The command refused its arguments (status 2, no traceback) before
    doing anything, naming each of `words`."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "error:" in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, f"{word!r} not in: {result.stderr}"
    assert not result.stdout, "it started working before refusing"


def map_and_check(pager: Any, store: Path, size: int) -> Any:
    """pager.map() of the first `size` bytes of the file `store`, read back
    whole and compared byte for byte: the region, still open."""
    region = pager.map(f"file://{store}", size)
    with open(store, "rb") as f:
        expected = f.read(size)
    assert bytes(region.view()) == expected + bytes(size - len(expected)), "the region differs from its file"
    return region


def describe_returncode(code: int | None) -> str:
    """A Popen return code in words: "still running", "killed by SIGBUS", "exit 1"."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def stop_daemon(path: str, process: subprocess.Popen[bytes]) -> None:
    """A daemon fixture's teardown: SIGTERM, and the daemon must exit with
    status 0 within 10 s (else it is killed), having run through the test."""
    crashed = process.poll()
    process.terminate()
    try:
        status = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the daemon on {path} ignored SIGTERM for 10 s")
    assert crashed is None, f"the daemon on {path} died during the test ({describe_returncode(crashed)})"
    assert status == 0, f"the daemon on {path} ended with {describe_returncode(status)} on SIGTERM"


def one(messages: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """The one message of kind `what` among a child's messages (fails unless there is exactly one)."""
    found = [m for m in messages if m["what"] == what]
    assert len(found) == 1, f"expected one {what!r} message, got {len(found)}: {messages[-5:]}"
    return found[0]


class ChildScript:
    """A running ``python SCRIPT NAME ARGS...`` (tests/scenarios.py,
    tests/hostile_clients.py: see tests/child.py), through `wrapper` (e.g.
    setpriv) if given, the leader of its own session. Threads of its own
    read its messages (one JSON object a line on stdout; any other line
    becomes {"what": "text"}) into a queue and its stderr into a list."""

    def __init__(self, script: Path, name: str, *args: Any, wrapper: Sequence[str] = (),
                 stdin: Any = subprocess.PIPE, pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, str(script), name, *map(str, args)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            cwd="/",  # `python -m uffd_pager` (the private pager) imports from the working directory first
            pass_fds=pass_fds,
        )
        self.seen: list[dict[str, Any]] = []
        self._messages: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
        self._stderr: list[bytes] = []
        self._readers = [threading.Thread(target=self._read_messages, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_messages(self) -> None:
        for raw in self.process.stdout:  # type: ignore[union-attr]
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                message = json.loads(line)
            except ValueError:
                message = {"what": "text", "line": line}
            self._messages.put(message)
        self._messages.put(None)

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:  # type: ignore[union-attr]
            self._stderr.append(raw)

    def next(self, timeout: float, *, end_fails: bool = True) -> dict[str, Any] | None:
        """The next message, or None if none comes within `timeout` s. Once
        the output has ended: an AssertionError (end_fails), else None. A
        child's "error" report fails here, with its traceback."""
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if message is None:
            self._messages.put(None)
            if end_fails:
                raise AssertionError(f"{self.name}: its output ended "
                                     f"({describe_returncode(self.process.poll())}){self.context()}")
            return None
        self.seen.append(message)
        if message["what"] == "error":
            raise AssertionError(
                f"{self.name}: process {message['pid']} failed:\n{message['traceback']}{self.context()}")
        return message

    def unread(self) -> list[dict[str, Any]]:
        """Every message not read yet (all of them once the output ended: after kill(join_readers=True))."""
        out = []
        while not self._messages.empty():
            message = self._messages.get_nowait()
            if message is not None:
                self.seen.append(message)
                out.append(message)
        return out

    def expect(self, what: str, timeout: float = 30) -> dict[str, Any]:
        """The next message, which must be a `what` report within `timeout` s."""
        message = self.next(timeout)
        assert message is not None, \
            f"{self.name}: no {what!r} within {timeout} s ({describe_returncode(self.process.poll())}){self.context()}"
        assert message["what"] == what, f"{self.name}: expected {what!r}, got {message}{self.context()}"
        return message

    def send(self, line: str) -> None:
        """One line on the child's stdin (an order, for child.order())."""
        self.process.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def stderr(self) -> str:
        """What it wrote on stderr so far (all of it once its output ended)."""
        return b"".join(self._stderr).decode(errors="replace")

    def context(self) -> str:
        """Its last messages and the end of its stderr, for a failure message."""
        text = ""
        if self.seen:
            text += "\nlast messages:\n" + "\n".join(f"  {json.dumps(m)[:600]}" for m in self.seen[-6:])
        stderr = b"".join(self._stderr).decode(errors="replace").strip()
        if stderr:
            text += f"\nstderr (end):\n{stderr[-3000:]}"
        return text

    def kill(self, *, join_readers: bool = False) -> None:
        """SIGKILL to the whole session (a private pager, forked children);
        with `join_readers`, waits (10 s at most each) for the reading threads
        to see the output end, so that every message is in the queue."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        if join_readers:
            for reader in self._readers:
                reader.join(timeout=10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            with contextlib.suppress(OSError, AttributeError):  # stdin is None unless a pipe
                stream.close()  # type: ignore[union-attr]


def descriptor_kind(fd: int) -> str:
    """What a descriptor of this process is: "uffd", "memfd", "file", or its /proc link text."""
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link == "anon_inode:[userfaultfd]":
        return "uffd"
    if link.startswith("/memfd:"):
        return "memfd"
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return "file"
    return link
