"""A daemon that dies is taken over (issue 12): a pager started again on the
same socket finds the regions in its durable state, takes their
descriptors from the clients themselves (pidfd_getfd), wakes the threads
the dead pager left waiting, and finds the writes it never flushed. A
client whose only thread is stuck in a fault, holding the GIL, goes on
without running any code of its own; its next request reconnects and
claims its regions back.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import uffd_pager
from conftest import Daemon
from support import ChildScript, accepts
from uffd_pager.durable import FORMAT_VERSION, DurableState, state_path

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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy,fate,children", [("on-write", "alive", False), ("at-fork", "alive", False),
                                                  ("on-access", "alive", False), ("on-write", "gone", False),
                                                  ("on-write", "gone", True)])
def test_a_forked_child_is_taken_over_with_its_own_portion(start_daemon, tmp_path, policy, fate, children):
    """The parent rewrote pages 0-15 after the fork: the child's view of them
    is in its own portion only (copied there before the parent's write),
    which the new pager must know; pages 16-31 it still reads through its
    parent's portion, even once the parent is gone (and once the child is
    gone too, nothing of either stays open)."""
    store = tmp_path / "store"
    store.write_bytes(b"\x11" * PAGES * PAGE)
    kids = tmp_path / "kids"
    kids.write_bytes(b"")
    go = tmp_path / "go"
    os.mkfifo(go)
    first = start_daemon("family.sock")
    family = ChildScript(CHILDREN_PY, "family", first.path, f"file://{store}", policy, go, fate,
                         f"file://{kids}" if children else "")
    try:
        # The child's report (once it claimed its copy) and the parent's, in either order.
        reports = {message["what"]: message for message in (family.next(30), family.next(30)) if message}
        assert set(reports) == {"child-forked", "parent-flushed"}, reports
        assert reports["parent-flushed"]["pages"] == 16
        if fate == "gone":
            family.process.wait(timeout=20)
            with first.connect() as monitor:  # the pager saw the parent go (its pidfd), the child stays
                deadline = time.monotonic() + 20
                while len(monitor.status()["region_list"]) != 1:
                    assert time.monotonic() < deadline, "the pager did not release the parent's region"
                    time.sleep(0.05)
        kill(first)
        second = start_daemon("family.sock")
        with second.connect() as monitor:
            assert monitor.status()["takeover"]["regions"] == (2 if fate == "alive" else 1)
        fd = os.open(go, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if the child is not waiting on it
        os.write(fd, b"go\n")
        os.close(fd)
        seen = family.expect("child-read", timeout=30)["bytes"]
        assert seen == [0x11] * PAGES, f"the child's view changed across the takeover: {seen}"
        flushed = family.expect("child-flushed", timeout=30)
        assert flushed["pages"] >= 1 and flushed["offset"] is not None, flushed
        if fate == "alive":
            family.send("read")
            assert family.expect("parent-read")["bytes"] == [0x22] * 16 + [0x11] * 16
            family.send("write 24 7")
            family.expect("written")
            family.send("flush")
            family.expect("flushed", timeout=30)
            family.send("close")
            family.expect("closed", timeout=30)
        else:
            family.process.wait(timeout=20)  # the child exited after its flush: the lineage is gone
            with second.connect() as monitor:
                deadline = time.monotonic() + 20
                while (status := monitor.status())["region_list"] or status["stores"]:
                    assert time.monotonic() < deadline, f"a gone lineage left regions or stores open: {status}"
                    time.sleep(0.05)
        data = store.read_bytes()
        root = data[:PAGES * PAGE]
        assert root[:16 * PAGE] == b"\x22" * (16 * PAGE) and root[16 * PAGE:24 * PAGE] == b"\x11" * (8 * PAGE)
        if fate == "alive":
            assert root[24 * PAGE] == 7
        own = (kids.read_bytes() if children else data)[flushed["offset"]:flushed["offset"] + PAGES * PAGE]
        expected = bytearray(b"\x11" * PAGES * PAGE)
        expected[20 * PAGE] = 0x33
        assert own == bytes(expected), "the child's portion does not hold its view"
    finally:
        family.kill(join_readers=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["during", "after-failing"])
def test_a_write_back_its_pager_did_not_finish_is_written_by_the_next_pager(start_daemon, private_redis_server, when):
    """The write-back took the dirty pages (write-protected again: the kernel
    no longer reports them) and the server stopped answering: the pager is
    killed while it waits ("during"), or after the flush failed, keeping
    them to retry ("after-failing": its durable state keeps them too). The
    next pager writes them at the next flush."""
    url = private_redis_server.url_for(f"unfinished-{when}") + ("?timeout=0.5" if when == "after-failing" else "")
    daemon = start_daemon("unfinished.sock")
    client = ChildScript(CHILDREN_PY, "client", daemon.path, url, "async")
    try:
        client.expect("mapped")
        client.expect("written")  # pages 0-3, never flushed
        os.kill(private_redis_server.pid, signal.SIGSTOP)
        try:
            client.send("flush")
            if when == "during":
                time.sleep(0.5)  # the pager is waiting on the server with the pages taken
                kill(daemon)
            else:
                assert client.next(timeout=30)["what"] == "flush-failed"
        finally:
            os.kill(private_redis_server.pid, signal.SIGCONT)
        if when == "after-failing":
            kill(daemon)
        daemon = start_daemon("unfinished.sock")
        if when == "after-failing":
            client.send("flush")  # ("during": the flush under way reconnects and is asked again)
        flushed = client.expect("flushed", timeout=60)
        assert flushed["pages"] >= 4, flushed
        with uffd_pager.connect(daemon.path) as pager, pager.map(url, PAGES * PAGE) as region:
            view = region.view()
            assert [view[p * PAGE] for p in range(4)] == [0x5A] * 4, "the unfinished write-back's pages were lost"
            del view
    finally:
        client.kill(join_readers=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_writes_a_pager_took_over_and_died_before_flushing_reach_the_store_through_the_next(
        start_daemon, tmp_path, tracking):
    """Pages written, never flushed; the pager is killed, the next one takes
    the region over (with "sync" tracking it learns the written pages from
    the page tables) and is killed before any write-back: the third still
    finds them. (Protecting them again at takeover had them clean in the
    page tables while only the second pager's memory knew them dirty.)"""
    store = tmp_path / "store"
    original = os.urandom(PAGES * PAGE)
    store.write_bytes(original)
    daemon = start_daemon("twice.sock")
    client = ChildScript(CHILDREN_PY, "client", daemon.path, f"file://{store}", tracking)
    try:
        client.expect("mapped")
        client.expect("written")  # pages 0-3, never flushed
        for _ in range(2):
            kill(daemon)
            daemon = start_daemon("twice.sock")
            with daemon.connect() as monitor:
                assert monitor.status()["takeover"]["regions"] == 1
        client.send("flush")
        flushed = client.expect("flushed", timeout=40)
        assert flushed["pages"] >= 4, flushed
        data = store.read_bytes()
        assert data[:4 * PAGE] == b"\x5a" * (4 * PAGE), "writes the second pager took over were lost"
        assert data[4 * PAGE:] == original[4 * PAGE:]
    finally:
        client.kill(join_readers=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exit_seen", [True, False], ids=["exit-seen", "exit-unseen"])
def test_a_portion_kept_for_an_exited_child_is_never_handed_out_by_the_next_pager(start_daemon, tmp_path, exit_seen):
    """keep_child_portions: an exited child's portion stays in the store,
    never handed out again, after a takeover too: whether the dead pager saw
    the child exit or not (stopped before it could, its successor finds no
    live process for the child's row). The store is sparse past page 0 and
    the child wrote only page 0, so the store's end says nothing of the
    portion's length: only the durable state keeps its place."""
    store = tmp_path / "store"
    with open(store, "wb") as f:
        f.write(b"\x01" * PAGE)
        f.truncate(PAGES * PAGE)
    daemon = start_daemon("kept.sock")
    client = ChildScript(CHILDREN_PY, "keeper", daemon.path, f"file://{store}")
    try:
        client.expect("mapped")
        client.send("fork 17")
        first = client.expect("forked")["offset"]
        assert first >= PAGES * PAGE
        if not exit_seen:
            daemon.process.send_signal(signal.SIGSTOP)
        client.send("exit")
        client.expect("exited")
        if exit_seen:
            with daemon.connect() as pager:
                deadline = time.monotonic() + 20
                while pager.status()["regions"] > 1:  # the child's region goes when the pager sees it exit
                    assert time.monotonic() < deadline, "the pager never saw the child exit"
                    time.sleep(0.02)
        kill(daemon)
        daemon = start_daemon("kept.sock")
        client.send("fork 68")
        second = client.expect("forked", timeout=40)["offset"]
        client.send("exit")
        client.expect("exited")
        assert second >= first + PAGES * PAGE or second + PAGES * PAGE <= first, \
            f"a new child's portion at {second} overlaps the kept one at {first}"
        with open(store, "rb") as f:
            f.seek(first)
            kept = f.read(PAGES * PAGE)
        assert kept[:PAGE] == b"\x11" + b"\x01" * (PAGE - 1) and kept[PAGE:] == bytes(len(kept) - PAGE), \
            "the kept portion's bytes changed"
        client.send("close")
        client.expect("closed")
    finally:
        client.kill(join_readers=True)


@pytest.mark.timeout(120)
def test_a_capped_region_taken_over_is_capped_again_once_its_process_is_back(start_daemon, tmp_path):
    """The new pager counts the pages the process holds (its page tables
    say), and caps the region again when the process reattaches with a new
    page-out agent (the old one's socket went with the dead pager)."""
    pages, cap = 1024, 64 * PAGE
    store = tmp_path / "store"
    store.write_bytes(os.urandom(pages * PAGE))
    first = start_daemon("capped.sock")
    client = ChildScript(CHILDREN_PY, "capped", first.path, f"file://{store}", pages, cap)
    try:
        before = client.expect("mapped", timeout=30)
        assert before["max_resident"] == cap and before["evictions"] > 0, before
        kill(first)
        second = start_daemon("capped.sock")
        client.send("stats")  # reconnects and reattaches
        again = client.expect("stats", timeout=30)
        assert again["max_resident"] == cap, f"the cap was not restored after the takeover: {again}"
        assert again["resident_pages"] > 0, "the pages the process holds were not counted"
        client.send("scan")
        scanned = client.expect("scanned", timeout=60)
        assert scanned["same"], "a page read differently after the takeover"
        assert scanned["evictions"] > 0, scanned
        assert scanned["resident_pages"] <= cap // PAGE + 256, scanned  # the cap and one read-ahead window
        client.send("close")
        client.expect("closed", timeout=30)
        with second.connect() as monitor:
            assert monitor.status()["takeover"]["reattached"] == 1
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
    assert f"format '99', newer than this pager's {FORMAT_VERSION}" in result.stderr and path in result.stderr, \
        result.stderr
    assert not (socket_dir / "newer.sock").exists() or not accepts(socket_dir / "newer.sock")


def test_a_state_file_of_format_1_is_brought_up_to_date_and_keeps_its_regions(tmp_path):
    """A pager of this version takes over from one of the first format
    (no forked children's rows, no write-backs in progress)."""
    path = str(tmp_path / "v1.sqlite3")
    request = {"url": "file:///x", "size": 8 * PAGE, "offset": 0, "address": 1 << 32, "fds": ["uffd", "store"]}
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('format', '1')")
        db.execute("CREATE TABLE regions (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, pid_start INTEGER NOT NULL, "
                   "uid INTEGER NOT NULL, request TEXT NOT NULL, descriptors TEXT NOT NULL)")
        db.execute("INSERT INTO regions VALUES (7, 4242, 99, 1000, ?, ?)",
                   (json.dumps(request), json.dumps({"store": [1, 2]})))
    db.close()
    state = DurableState(path)
    (record,) = state.regions()
    assert (record.id, record.pid, record.uid, record.request, record.descriptors) == (7, 4242, 1000, request,
                                                                                     {"store": (1, 2)})
    assert record.parent is None and record.materialized == [] and not record.released and record.flushing == []
    state.flushing(7, [(2, 3)])
    state.close()
    again = DurableState(path)
    assert again.regions()[0].flushing == [(2, 3)]
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == (str(FORMAT_VERSION),)



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
