"""A daemon that dies is taken over (issue 12): a pager started again on the
same socket finds the regions in its durable state, takes their
descriptors from the clients themselves (pidfd_getfd), wakes the threads
the dead pager left waiting, and finds the writes it never flushed. A
client whose only thread is stuck in a fault, holding the GIL, goes on
without running any code of its own; its next request reconnects and
claims its regions back.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import uffd_pager
from conftest import Daemon
from support import ChildScript, accepts
from uffd_pager.durable import state_path

CHILDREN_PY = Path(__file__).with_name("takeover_children.py")
PAGE = uffd_pager.PAGE_SIZE
PAGES = 32


def kill(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    daemon.stopped = True


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    subprocess.run([sys.executable, "-m", "uffd_pager", "keygen", "--out", str(path)], check=True, timeout=30)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["async", "sync", "encrypted"])
def test_a_killed_daemon_is_taken_over_by_the_next_one_on_its_socket(start_daemon, tmp_path, key_file, case):
    store = tmp_path / "store"
    original = os.urandom(PAGES * PAGE)
    store.write_bytes(original)
    first = start_daemon("takeover.sock")
    extra = [str(key_file)] if case == "encrypted" else []
    if case == "encrypted":  # an encrypted store is written through the pager: start from its ciphertext
        with uffd_pager.connect(first.path) as pager, \
                pager.map(f"file://{store}", PAGES * PAGE, key_file=str(key_file), writeback_interval=0) as region:
            region.view()[:] = original
    client = ChildScript(CHILDREN_PY, "client", first.path, f"file://{store}",
                         "sync" if case == "sync" else "async", *extra)
    try:
        mapped = client.expect("mapped")
        assert mapped["read"] == [original[p * PAGE] for p in range(8, 16)]
        client.expect("written")
        kill(first)

        client.send("touch 20")  # a missing page: the thread waits, holding the GIL
        assert client.next(1.0) is None, "a page was served with no pager running"
        second = start_daemon("takeover.sock")
        assert client.expect("byte", timeout=20)["value"] == original[20 * PAGE], "the taken-over fault read wrong"

        with second.connect() as thief:  # another process may not claim the region
            status = thief.status()
            assert status["takeover"]["regions"] == 1 and status["takeover"]["woken"] >= 1, status["takeover"]
            (taken,) = status["region_list"]
            assert thief._conn.request("reattach", regions=[taken["id"]])["regions"] == []
        client.send("write 24 7")  # after the takeover: tracked by the new pager
        client.expect("written")
        client.send("flush")  # reconnects and claims the region back, then writes what the dead pager never did
        flushed = client.expect("flushed", timeout=40)
        assert flushed["pages"] >= 5, flushed
        if case != "encrypted":
            data = store.read_bytes()
            assert data[:4 * PAGE] == b"\x5a" * (4 * PAGE), "writes made before the kill were lost"
            assert data[24 * PAGE] == 7 and data[4 * PAGE:24 * PAGE] == original[4 * PAGE:24 * PAGE]
        with second.connect() as monitor:
            status = monitor.status()
        (region,) = status["region_list"]
        assert region["pid"] == client.process.pid
        client.send("close")
        client.expect("closed")
        if case == "encrypted":  # what reached the store reads back through a fresh region
            with uffd_pager.connect(second.path) as pager, \
                    pager.map(f"file://{store}", PAGES * PAGE, key_file=str(key_file)) as again:
                view = again.view()
                assert view[:4 * PAGE] == b"\x5a" * (4 * PAGE) and view[24 * PAGE] == 7
                del view
    finally:
        client.kill(join_readers=True)


@pytest.mark.timeout(60)
def test_a_state_file_of_a_newer_format_is_refused_clearly(start_daemon, tmp_path, socket_dir):
    first = start_daemon("newer.sock")
    first.stop()
    state_dir = Path(os.environ["UFFD_PAGER_STATE_DIR"])
    path = state_path(str(state_dir), str(socket_dir / "newer.sock"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    result = subprocess.run([sys.executable, "-m", "uffd_pager", "serve", "--socket", str(socket_dir / "newer.sock")],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "format '99', newer than this pager's 1" in result.stderr and path in result.stderr, result.stderr
    assert not (socket_dir / "newer.sock").exists() or not accepts(socket_dir / "newer.sock")



@pytest.mark.timeout(60)
def test_a_daemon_whose_state_directory_is_unusable_serves_and_says_it_cannot_be_taken_over(
        start_daemon, tmp_path, random_file):
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("a file where the state directory should be")
    log = tmp_path / "daemon.log"
    daemon = start_daemon("no-state.sock", args=["--state-dir", str(not_a_directory)], stderr=log)
    store = random_file(4 * PAGE)
    with daemon.connect() as pager, pager.map(f"file://{store}", 4 * PAGE) as region:
        assert bytes(region.view()[:PAGE]) == Path(store).read_bytes()[:PAGE]
    assert "keeping no durable state" in log.read_text(), log.read_text()
