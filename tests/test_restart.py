"""The embedded pager restarts by itself (issue 12): a program with a
`Pager()` keeps running across a `kill -9` of its private pager. A native
thread of the program notices the death through a pidfd and starts a new
pager, which takes every region over from the durable state the dead one
kept: even a thread stuck in a fault holding the GIL goes on. Restarts are
bounded; close() leaves no process and no state file behind; a forked
child runs no restarter.
"""
from __future__ import annotations

import hashlib
import os
import select
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import uffd_pager
from support import ChildScript
from uffd_pager.restart import MAX_RESTARTS

CHILDREN_PY = Path(__file__).with_name("restart_children.py")
PAGE = uffd_pager.PAGE_SIZE
PAGES = 64


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def kill_pager(pid: int) -> None:
    """SIGKILL to the program's pager, and wait until it has died."""
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert select.select([pidfd], [], [], 10)[0], f"pager {pid} did not die within 10 s of SIGKILL"
    finally:
        os.close(pidfd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def program(tmp_path: Path, random_file):
    """Starts tests/restart_children.py program over a fresh 64-page store
    with its own state directory; yields a function (tracking) -> (child,
    store path, original bytes, "mapped" report)."""
    started: list[ChildScript] = []
    state_dir = tmp_path / "state"

    def start(tracking: str = "async") -> tuple[ChildScript, Path, bytes, dict]:
        store = Path(random_file(PAGES * PAGE))
        original = store.read_bytes()
        child = ChildScript(CHILDREN_PY, "program", f"file://{store}", tracking, state_dir)
        started.append(child)
        return child, store, original, child.expect("mapped")

    start.state_dir = state_dir  # type: ignore[attr-defined]
    yield start
    for child in started:
        child.kill(join_readers=True)


def read_page(child: ChildScript, page: int) -> str:
    child.send(f"read {page}")
    return child.expect("page", timeout=30)["sha256"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_a_program_keeps_running_across_a_kill_of_its_private_pager(program, tracking):
    child, store, original, mapped = program(tracking)
    first = mapped["pager"]
    kill_pager(first)

    for page in (8, 9, 40):  # missing pages, served by the new pager byte-exact
        assert read_page(child, page) == sha(original[page * PAGE:(page + 1) * PAGE]), f"page {page} read wrong"
    child.send("pid")
    now = child.expect("pid")
    assert now["alive"] and now["pager"] not in (0, first), now
    child.send("write 24 7")
    child.expect("written")
    child.send("flush")
    flushed = child.expect("flushed", timeout=40)
    assert flushed["pages"] >= 5, flushed  # pages 0-3, never flushed by the dead pager, and page 24
    data = store.read_bytes()
    assert data[:4 * PAGE] == b"\x5a" * (4 * PAGE), "writes made before the kill were lost"
    assert data[24 * PAGE:25 * PAGE] == b"\x07" * PAGE, "a write made after the restart was lost"
    assert data[4 * PAGE:24 * PAGE] == original[4 * PAGE:24 * PAGE]
    assert data[25 * PAGE:] == original[25 * PAGE:]
    assert gone(first)


@pytest.mark.timeout(120)
def test_a_thread_stuck_in_a_fault_holding_the_gil_goes_on_once_the_new_pager_is_up(program):
    child, store, original, mapped = program()
    first = mapped["pager"]
    os.kill(first, signal.SIGSTOP)  # reads nothing: the fault below stays unanswered
    child.send("stuck 30")
    touching = child.expect("touching")
    assert child.next(1.5) is None, "a page was served by a stopped pager"
    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    byte = child.expect("byte", timeout=30)
    assert byte["value"] == original[30 * PAGE], "the page read wrong after the restart"
    # No Python code of the program ran while it waited (the GIL stayed
    # held): its counting thread, at ~1000 a second, barely moved.
    assert byte["beats_after"] - touching["beats"] < 30, (touching, byte)
    child.send("beats")
    before = child.expect("beats")["beats"]
    time.sleep(0.5)
    child.send("beats")
    assert child.expect("beats")["beats"] - before > 50, "the counting thread does not count: the check above is void"
    child.send("pid")
    assert child.expect("pid")["pager"] not in (0, first)
    print(f"\nrestart: the stuck thread was served {1000 * (byte['served_at'] - killed_at):.0f} ms after the kill; "
          f"Pager() start-up {1000 * mapped['startup']:.0f} ms")


@pytest.mark.timeout(180)
def test_repeated_kills_are_all_survived(program):
    child, store, original, mapped = program()
    pids = [mapped["pager"]]
    for round in range(MAX_RESTARTS):
        kill_pager(pids[-1])
        page = 10 + round
        assert read_page(child, page) == sha(original[page * PAGE:(page + 1) * PAGE]), f"round {round}: read wrong"
        child.send(f"write {40 + round} {round + 1}")
        child.expect("written")
        child.send("pid")
        pids.append(child.expect("pid")["pager"])
    assert len(set(pids)) == MAX_RESTARTS + 1 and 0 not in pids, pids
    child.send("flush")
    child.expect("flushed", timeout=40)
    data = store.read_bytes()
    assert data[:4 * PAGE] == b"\x5a" * (4 * PAGE)
    for round in range(MAX_RESTARTS):
        page = 40 + round
        assert data[page * PAGE:(page + 1) * PAGE] == bytes([round + 1]) * PAGE, f"the write of round {round} was lost"


@pytest.mark.timeout(120)
def test_a_pager_that_cannot_start_is_restarted_a_bounded_number_of_times(program):
    child, store, original, mapped = program()
    (state_file,) = program.state_dir.glob("*.sqlite3")
    with sqlite3.connect(state_file) as db:  # every new pager refuses a state of a newer format, and exits
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    kill_pager(mapped["pager"])
    deadline = time.monotonic() + 60
    while "not starting it again" not in child.stderr():
        assert time.monotonic() < deadline, f"the restarter did not give up{child.context()}"
        time.sleep(0.1)
    time.sleep(1.0)  # nothing is started after giving up
    stderr = child.stderr()
    assert stderr.count("newer than this pager's") == MAX_RESTARTS, stderr
    assert stderr.count("not starting it again") == 1, stderr
    # Requests fail at once (the address is unbound), never after the timeout.
    child.send("flush")
    refused = child.expect("gone", timeout=20)
    assert refused["after"] < 5, refused
    child.send("pid")
    assert child.expect("pid") == {"what": "pid", "pid": child.process.pid, "pager": 0, "alive": False}


@pytest.mark.timeout(120)
def test_close_after_a_restart_leaves_no_pager_and_no_state(program):
    child, store, original, mapped = program()
    first = mapped["pager"]
    assert len(list(program.state_dir.glob("*.sqlite3"))) == 1
    kill_pager(first)
    assert read_page(child, 12) == sha(original[12 * PAGE:13 * PAGE])
    child.send("close")
    closed = child.expect("closed", timeout=30)
    second = closed["pager"]
    assert second not in (0, first)
    assert gone(first) and gone(second), "a pager process was left"
    assert closed["threads"] == mapped["threads"] - 1, "the restarter thread was left running"
    assert list(program.state_dir.iterdir()) == [], "a state file was left"
    assert store.read_bytes()[:4 * PAGE] == b"\x5a" * (4 * PAGE)


@pytest.mark.timeout(120)
def test_a_forked_child_runs_no_restarter_and_the_parent_still_restarts(program):
    child, store, original, mapped = program()
    kill_pager(mapped["pager"])
    assert read_page(child, 5) == sha(original[5 * PAGE:6 * PAGE])
    child.send("pid")
    second = child.expect("pid")["pager"]
    child.send("fork")
    forked = child.expect("forked", timeout=30)
    assert forked["threads"] == 1, forked  # threads do not survive fork: no restarter in the child
    reaped = child.expect("reaped", timeout=30)
    assert reaped["status"] == 0 and reaped["alive"] and reaped["pager"] == second, reaped  # the child closed its use only
    kill_pager(second)
    assert read_page(child, 6) == sha(original[6 * PAGE:7 * PAGE]), "the parent's restarter stopped after the fork"
    child.send("pid")
    assert child.expect("pid")["pager"] not in (0, second)
