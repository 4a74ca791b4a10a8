"""A daemon serves several client processes, forgets every trace of a client
that goes away however it goes, and a client whose pager was killed waits
for missing pages instead of reading zeros."""
from __future__ import annotations

import os
import signal
import time

import pytest

import uffd_pager

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
COUNTS = ("connections", "regions", "open_fds", "tasks")


def counts(pager: uffd_pager.Pager) -> dict[str, int]:
    status = pager.status()
    return {key: status[key] for key in COUNTS}


def counts_once_settled(pager: uffd_pager.Pager, expected: dict[str, int] | None = None,
                        timeout: float = 5.0) -> dict[str, int]:
    """The daemon's counts once they equal `expected` (or, without it, once
    only `pager`'s own connection is left), or the last seen after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        now = counts(pager)
        if (now == expected) if expected is not None else (now["connections"] == 1):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def kill_pager(pid: int) -> None:
    """SIGKILL, then wait until it is dead (a zombie of its client, or gone)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"the pager {pid} survived SIGKILL for 10 s")


@pytest.mark.timeout(60)
def test_one_daemon_serves_two_clients_mapping_different_files_at_once(daemon, spawn_client, random_file):
    files = [random_file(16 * MiB), random_file(16 * MiB)]
    clients = [spawn_client(daemon.path), spawn_client(daemon.path)]
    for client, path in zip(clients, files):
        assert client.ask(f"map file://{path} {16 * MiB}") == "mapped"
    with daemon.connect() as monitor:
        assert counts(monitor)["regions"] == 2  # both mapped at once
        for client in clients:
            client.send(f"read 0 {16 * MiB // PAGE}")  # both read at once
        assert [client.reply() for client in clients] == ["same", "same"]
        assert counts(monitor)["regions"] == 2
    assert all(client.alive for client in clients)


def close_and_exit(client):
    assert client.ask("close") == "closed"
    client.send("exit")
    assert client.wait(timeout=10) == 0


def exit_without_closing(client):
    client.send("exit")
    assert client.wait(timeout=10) == 0


def drop_without_closing(client):
    assert client.ask("drop", timeout=10) == "dropped"
    client.send("exit")
    assert client.wait(timeout=10) == 0


def kill_while_reading(client):
    client.send(f"read {8 * MiB // PAGE} {16 * MiB // PAGE} 0.002")  # about 4 s of faults
    time.sleep(0.5)
    assert client.alive
    client.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("leave", [close_and_exit, exit_without_closing, drop_without_closing, kill_while_reading])
def test_a_client_going_away_leaves_nothing_behind_in_the_daemon(daemon, spawn_client, random_file, leave):
    path = random_file(16 * MiB)
    with daemon.connect() as monitor:
        idle = counts_once_settled(monitor)
        assert (idle["connections"], idle["regions"]) == (1, 0)
        client = spawn_client(daemon.path)
        assert client.ask(f"map file://{path} {16 * MiB}") == "mapped"
        assert client.ask(f"read 0 {8 * MiB // PAGE}") == "same"
        busy = counts(monitor)
        assert (busy["connections"], busy["regions"]) == (2, 1)

        leave(client)

        assert counts_once_settled(monitor, idle) == idle


@pytest.fixture
def orphaned_client(spawn_client, tmp_path):
    """A client with a private pager, a region over a file of 0xa5 bytes, its
    first page read; then its pager is killed, for good (no restart: see
    test_restart.py for a pager that is started again). -> (client, file path)"""
    path = tmp_path / "nonzero.bin"
    path.write_bytes(b"\xa5" * 64 * PAGE)
    client = spawn_client(None, restarts=0)
    assert client.ask(f"map file://{path} {64 * PAGE}") == "mapped"
    assert client.ask("touch 0") == "byte 165"
    kill_pager(client.pager_pid)
    return client, path


@pytest.mark.timeout(60)
def test_after_the_pager_is_killed_a_missing_page_is_waited_for_never_read_as_zeros(orphaned_client):
    client, _ = orphaned_client
    client.send("touch 40")
    assert client.said_nothing_for(3.0), f"the client read a page with no pager: {client.reply()}"
    assert client.alive


@pytest.mark.timeout(60)
def test_after_the_pager_is_killed_resident_pages_stay_readable(orphaned_client):
    client, _ = orphaned_client
    assert client.ask("touch 0") == "byte 165"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["map", "stats"])
def test_after_the_pager_is_killed_requests_raise_pager_gone(orphaned_client, call):
    client, path = orphaned_client
    command = f"map file://{path} {64 * PAGE}" if call == "map" else "stats"
    assert client.ask(command).startswith("error PagerGone ")
    assert issubclass(uffd_pager.PagerGone, ConnectionError)


def close_fails_and_exit(client):
    """close() says the pager is gone (the region stays, its writes with it); the process still exits."""
    assert client.ask("close").startswith("error PagerGone")
    client.send("exit")
    assert client.wait(timeout=10) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("leave", [close_fails_and_exit, exit_without_closing, drop_without_closing])
def test_a_client_whose_pager_was_killed_can_still_let_go_of_its_region_and_exit(orphaned_client, leave):
    client, _ = orphaned_client
    leave(client)


@pytest.mark.timeout(60)
def test_sigterm_to_the_daemon_writes_every_region_back_first(daemon, spawn_client, random_file):
    """A clean stop loses nothing: pages written and never flushed (no
    timed write-back) are in the store once the daemon has exited."""
    paths = [random_file(64 * PAGE), random_file(64 * PAGE)]
    clients = [spawn_client(daemon.path), spawn_client(daemon.path)]
    for n, (client, path) in enumerate(zip(clients, paths)):
        assert client.ask(f"map file://{path} {64 * PAGE} 0") == "mapped"
        assert client.ask(f"write {n} 64 {0xA0 + n}") == "written"
    before = [path.read_bytes() for path in paths]
    daemon.stop()  # SIGTERM; exit status 0
    for n, (path, old) in enumerate(zip(paths, before)):
        data = path.read_bytes()
        changed = [p for p in range(64) if data[p * PAGE] != (0xA0 + n if p >= n else old[p * PAGE])]
        assert not changed, f"file {n}: pages {changed[:10]} do not hold what was written"
        assert data[1:PAGE] == old[1:PAGE]  # only what was written changed
