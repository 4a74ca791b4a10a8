"""Regions over the Redis store, against real servers (tests/redis_servers.py):
a TCP server, a Unix-socket server and a 3-master Redis Cluster. No fakes.

1. a 64 MiB region written (random pages, zero pages, pages never written),
   flushed and closed reads back byte-exact through a new pager;
2. a 64 MiB region spreads over every master of the cluster;
3. a page never written, or written as zeros, is no field on the server;
4. fork under all three policies, and children= across file and Redis:
   each process's portion byte-exact, read straight from the server's keys;
5. a server killed while a client faults: SIGBUS past the deadline, or a
   wait until it is back, never zeros; flush() raises while it is down and
   writes once it is back;
6. a server restarted empty is reported: map() raises StoreLost, a fault is
   SIGBUS, flush() raises -- never zeros;
7. a value of the wrong length is SIGBUS for that page only, and logged;
8. bad URLs and unreachable servers are refused at map() with nothing
   registered.

Whatever may block in a fault, get SIGBUS, fork or outlive a server runs in
a scenario process (tests/redis_scenarios.py) with a private pager whose
log is the scenario's stderr; the test waits for it with timeouts and kills
its whole session at the end. Faults on a healthy server run here, as in
tests/test_fill.py, each test under a timeout.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy
import pytest

import uffd_pager
from pages import differing_pages
from redis_pages import (CHUNK, CHUNK_PAGES, PAGE, all_pattern, chunk_fields, chunk_keys_on,
                         pages_with, pattern, pseudo_file_bytes, raw_values)
from redis_scenarios import CHILD_PAGES, FORK_PAGES, PARENT_PAGES
from redis_servers import RedisCluster, RedisReplyError, RedisServer, free_port
from support import ChildScript, describe_returncode

MiB = 1 << 20
SCENARIOS_PY = Path(__file__).with_name("redis_scenarios.py")
POLICIES = ("on-write", "at-fork", "on-access")
KINDS = ("redis", "redis+unix", "redis+cluster")
FAST = "deadline=1&timeout=1"  # a fault is given up on (SIGBUS) after 1 s without the server


# --- scenario processes ------------------------------------------------------------------------


class Scenario(ChildScript):
    """A running `redis_scenarios.py NAME ARGS...` (its own session: the
    private pager and forked children with it)."""

    def __init__(self, name: str, *args: Any) -> None:
        super().__init__(SCENARIOS_PY, name, *args)

    def next(self, timeout: float, *, end_fails: bool = False) -> dict[str, Any] | None:
        """Here the end of the output is None (a child killed by SIGBUS on purpose)."""
        return super().next(timeout, end_fails=end_fails)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s{self.context()}") from None

    def rest(self) -> list[dict[str, Any]]:
        """Kills what is left of the session; every message not read yet."""
        self.kill(join_readers=True)
        return self.unread()

    @property
    def stderr(self) -> str:
        """The scenario's stderr so far: its private pager's log is there."""
        return b"".join(self._stderr).decode(errors="replace")

    def __enter__(self) -> "Scenario":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill(join_readers=True)


def sigbus(code: int | None) -> bool:
    return code == -signal.SIGBUS


# --- stores ----------------------------------------------------------------------------------


class Remote:
    """A pseudo file on a server or cluster: its URL, and a look at its keys."""

    def __init__(self, server: RedisServer | RedisCluster, name: str) -> None:
        self.server = server
        self.name = name
        self._client: Any = None

    def url(self, options: str = "") -> str:
        base = self.server.url_for(self.name)
        if not options:
            return base
        return f"{base}{'&' if '?' in base else '?'}{options}"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.server.client()
        return self._client

    def reset_client(self) -> None:
        self._client = None  # after a restart: a new connection (the old ones are closed by stop())

    def bytes(self, offset: int, size: int) -> bytes:
        return pseudo_file_bytes(self.client, self.name, offset, size)

    def commands(self) -> list[Callable[..., Any]]:
        """One command() per server that may hold keys (every master of a cluster)."""
        if isinstance(self.server, RedisCluster):
            return [node.command for node in self.server.nodes]
        return [self.server.command]

    def chunks(self) -> list[int]:
        """Every chunk of the pseudo file that some server holds a key for."""
        return sorted(c for command in self.commands() for c in chunk_keys_on(command, self.name))


@pytest.fixture
def remote(request: pytest.FixtureRequest, redis_name: str) -> Callable[[str], Remote]:
    """remote(kind) -> a new pseudo file on the shared server of that kind."""

    def make(kind: str, suffix: str = "") -> Remote:
        server = request.getfixturevalue({"redis": "redis_server", "redis+unix": "redis_unix_server",
                                          "redis+cluster": "redis_cluster"}[kind])
        return Remote(server, redis_name + suffix)

    return make


def populate(url: str, npages: int, holes: tuple[int, ...] = ()) -> None:
    """Pattern "A" on every page of the pseudo file at url but `holes`,
    written through a pager of this process (the server is healthy)."""
    with uffd_pager.Pager() as pager, pager.map(url, npages * PAGE, writeback_interval=0) as region:
        view = region.view()
        for p in range(npages):
            if p not in holes:
                view[p * PAGE:(p + 1) * PAGE] = pattern("A", p)
        assert region.flush()["pages"] == npages - len(holes)
        del view


def warm_up_networking(pager: uffd_pager.Pager) -> None:
    """One failed map of a Redis URL nobody answers: the pager's event loop
    opens a descriptor of its own (/dev/null, kept for good) at its first
    TCP connection, which is not a region's; leaves_nothing_behind checks
    what each map leaves, after that."""
    with pytest.raises(uffd_pager.StoreUnavailable):
        pager.map(f"redis://127.0.0.1:{free_port()}/warm-up?timeout=1", PAGE)


def pager_state(pager: uffd_pager.Pager) -> tuple[int, int, int]:
    status = pager.status()
    return status["regions"], status["portions"], status["open_fds"]


def wait_until_pager_holds(pager: uffd_pager.Pager, expected: tuple[int, int, int], timeout: float = 3.0) -> None:
    """A failed map's connection to the server is closed in the background
    (a store's close() never blocks): the pager's regions, portions and
    descriptors are back to `expected` soon after, not necessarily at once."""
    deadline = time.monotonic() + timeout
    while (now := pager_state(pager)) != expected:
        assert time.monotonic() < deadline, \
            f"the pager still holds (regions, portions, fds) {now} after the failed map, not {expected}"
        time.sleep(0.02)


def in_threads(count: int, work: Callable[[int, int], None], npages: int) -> None:
    """work(first_page, stop_page) on `count` threads, each a stripe of the
    pages (numpy releases the GIL while it copies: the faults are concurrent)."""
    per = -(-npages // count)
    errors: list[BaseException] = []

    def run(first: int) -> None:
        try:
            work(first, min(first + per, npages))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k * per,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# --- 1. a 64 MiB region, written, closed and read back by a new pager ------------------------------

NPAGES_64 = 64 * MiB // PAGE
DATA, SPARSE, ZEROS, ZEROED, READ_ONLY, NEVER = range(6)  # what happens to a page
WEIGHTS = [0.55, 0.05, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS)
def test_a_64_mib_region_reads_back_byte_exact_through_a_new_pager(remote, kind):
    store = remote(kind)
    url = store.url()
    rng = numpy.random.default_rng()
    what = rng.choice(len(WEIGHTS), size=NPAGES_64, p=WEIGHTS)
    first = rng.integers(0, 256, size=NPAGES_64 * PAGE, dtype=numpy.uint8)  # what phase 1 writes
    pages = first.reshape(NPAGES_64, PAGE)
    pages[what == ZEROS] = 0
    sparse = numpy.flatnonzero(what == SPARSE)
    pages[sparse] = 0
    pages[sparse, rng.integers(0, PAGE, size=len(sparse))] = rng.integers(1, 256, size=len(sparse), dtype=numpy.uint8)
    final = first.copy()  # what the pseudo file must hold at the end
    final.reshape(NPAGES_64, PAGE)[numpy.isin(what, (ZEROS, ZEROED, READ_ONLY, NEVER))] = 0
    zero_page = numpy.zeros(PAGE, dtype=numpy.uint8)

    with uffd_pager.Pager() as pager:
        region = pager.map(url, 64 * MiB, writeback_interval=0)
        mapped = numpy.frombuffer(region.view(), dtype=numpy.uint8)

        def write(start: int, stop: int) -> None:
            for p in range(start, stop):
                at = slice(p * PAGE, (p + 1) * PAGE)
                if what[p] in (DATA, SPARSE, ZEROED, ZEROS):
                    mapped[at] = first[at]
                elif what[p] == READ_ONLY:
                    assert not mapped[at].any(), f"page {p}, never written, does not read as zero"

        in_threads(8, write, NPAGES_64)
        written = int(numpy.isin(what, (DATA, SPARSE, ZEROED, ZEROS)).sum())
        assert region.flush()["pages"] == written
        zeroed = numpy.flatnonzero(what == ZEROED)
        for p in zeroed:  # data on the server, then zeros: the field must go
            mapped[p * PAGE:(p + 1) * PAGE] = zero_page
        assert region.flush()["pages"] == len(zeroed)
        stats = region.stats()
        del mapped
        region.close()
    assert stats["errors"] == stats["poisoned"] == stats["fetch_failures"] == 0, stats

    # What the server holds: a field for each page with data, nothing else.
    expected_fields: dict[int, set[int]] = {}
    for p in numpy.flatnonzero(numpy.isin(what, (DATA, SPARSE))):
        expected_fields.setdefault(int(p) // CHUNK_PAGES, set()).add(int(p) % CHUNK_PAGES)
    held = chunk_fields(store.client, store.name, NPAGES_64 // CHUNK_PAGES)
    assert held == expected_fields, "the server's fields are not exactly the pages with data: " + \
        _fields_diff(held, expected_fields)

    with uffd_pager.Pager() as pager, pager.map(url, 64 * MiB, writeback_interval=0) as region:
        mapped = numpy.frombuffer(region.view(), dtype=numpy.uint8)
        wrong: list[int] = []

        def check(start: int, stop: int) -> None:
            at = slice(start * PAGE, stop * PAGE)
            differs = (mapped[at] != final[at]).reshape(-1, PAGE).any(axis=1)
            wrong.extend(start + int(p) for p in numpy.flatnonzero(differs))

        in_threads(8, check, NPAGES_64)
        del mapped
        stats = region.stats()
    kinds_wrong = {int(what[p]) for p in wrong}
    assert wrong == [], f"{len(wrong)} pages differ (first {sorted(wrong)[:10]}, of kinds {kinds_wrong}: " \
                        f"{DATA}=data {SPARSE}=sparse {ZEROS}=zeros {ZEROED}=zeroed {READ_ONLY}=read {NEVER}=never)"
    assert stats["fetched_pages"] == NPAGES_64 and stats["fetch_failures"] == stats["poisoned"] == 0, stats


def _fields_diff(held: dict[int, set[int]], expected: dict[int, set[int]]) -> str:
    lines = []
    for chunk in sorted(set(held) | set(expected)):
        extra = held.get(chunk, set()) - expected.get(chunk, set())
        missing = expected.get(chunk, set()) - held.get(chunk, set())
        if extra or missing:
            lines.append(f"chunk {chunk}: extra fields {sorted(extra)}, missing {sorted(missing)}")
    return "; ".join(lines[:8]) + (f" ... ({len(lines)} chunks)" if len(lines) > 8 else "")


# --- 2. the cluster's key distribution --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_64_mib_region_spreads_over_every_master_of_the_cluster(redis_cluster, redis_name, capsys):
    store = Remote(redis_cluster, redis_name)
    data = numpy.frombuffer(os.urandom(64 * MiB), dtype=numpy.uint8)
    with uffd_pager.Pager() as pager, pager.map(store.url(), 64 * MiB, writeback_interval=0) as region:
        mapped = numpy.frombuffer(region.view(), dtype=numpy.uint8)

        def write(start: int, stop: int) -> None:
            mapped[start * PAGE:stop * PAGE] = data[start * PAGE:stop * PAGE]

        in_threads(8, write, NPAGES_64)
        assert region.flush()["pages"] == NPAGES_64
        del mapped
    masters = redis_cluster.masters()
    assert len(masters) == 3
    by_address = {node.address: node for node in redis_cluster.nodes}
    per_master = {address: sorted(chunk_keys_on(by_address[address].command, redis_name)) for address in masters}
    counts = {address: len(chunks) for address, chunks in per_master.items()}
    nchunks = NPAGES_64 // CHUNK_PAGES
    with capsys.disabled():
        print(f"\n64 MiB region = {nchunks} chunk keys over 3 masters: "
              + ", ".join(f"{a}: {n} ({100 * n / nchunks:.1f} %)" for a, n in counts.items()))
    assert sorted(c for chunks in per_master.values() for c in chunks) == list(range(nchunks)), \
        "the chunk keys are not exactly one per chunk"
    assert all(n >= 0.2 * nchunks for n in counts.values()), f"a master holds less than 20 % of the keys: {counts}"


# --- 3. zero pages cost the server nothing ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_pages_never_written_or_written_as_zeros_are_no_field(remote, kind):
    store = remote(kind)
    with uffd_pager.Pager() as pager:
        with pager.map(store.url(), 4 * CHUNK, writeback_interval=0) as region:
            view = region.view()
            view[:CHUNK] = bytes(CHUNK)  # chunk 0: written, all zeros
            view[CHUNK:CHUNK + PAGE] = b"\x01" * PAGE  # chunk 1: one page of data, the rest zeros
            view[CHUNK + PAGE:2 * CHUNK] = bytes(CHUNK - PAGE)
            assert bytes(view[2 * CHUNK:3 * CHUNK]) == bytes(CHUNK)  # chunk 2: read, never written
            assert region.flush()["pages"] == 2 * CHUNK_PAGES  # chunk 3: never touched
            assert store.chunks() == [1], "a chunk without data has a key"
            assert chunk_fields(store.client, store.name, 4) == {1: {0}}
            view[CHUNK:CHUNK + PAGE] = bytes(PAGE)  # its one page of data becomes zeros
            assert region.flush()["pages"] == 1
            assert store.chunks() == [], "a chunk whose last page became zeros still has a key"
            del view

        # A 1 TiB region read in 400 places and flushed: no key at all.
        huge = remote(kind, "-huge")
        with pager.map(huge.url(), 1 << 40, writeback_interval=0) as region:
            view = region.view()
            rng = numpy.random.default_rng()
            for p in rng.choice((1 << 40) // PAGE, size=400, replace=False):
                assert view[int(p) * PAGE] == 0
            assert region.flush()["pages"] == 0
            del view
        assert huge.chunks() == []


# --- 4. fork over Redis, and children= across stores -----------------------------------------------------

FORK_SIZE = FORK_PAGES * PAGE
LAYOUTS = {  # parent store, children store (None: the same)
    "redis": ("redis", None),
    "cluster": ("redis+cluster", None),
    "file-parent-redis-children": ("file", "redis"),
    "redis-parent-file-children": ("redis", "file"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fork_each_portion_holds_exactly_its_process_view(remote, tmp_path, layout, policy):
    parent_kind, children_kind = LAYOUTS[layout]
    a = all_pattern("A", FORK_PAGES)
    stores: dict[str, Callable[[int, int], bytes]] = {}  # url -> read(offset, size) of its raw bytes
    servers: dict[str, Any] = {}  # url -> a client of its server

    def make(kind: str, role: str) -> str:
        if kind == "file":
            path = tmp_path / f"{role}.bin"
            path.write_bytes(a if role == "parent" else b"")
            url = f"file://{path}"
            stores[url] = lambda offset, size: _read_file(path, offset, size)
        else:
            pseudo = remote(kind, "" if role == "parent" else "-children")
            url = pseudo.url()
            if role == "parent":
                populate(url, FORK_PAGES)
            stores[url] = pseudo.bytes
            servers[url] = pseudo.client
        return url

    def copies(url: str) -> int:
        """COPY commands the server of url has run (on one server only)."""
        client = servers.get(url)
        if client is None or not hasattr(client, "info") or layout != "redis":
            return 0
        return int(client.info("commandstats").get("cmdstat_copy", {}).get("calls", 0))

    store = make(parent_kind, "parent")
    children = make(children_kind, "children") if children_kind else None
    copies_before = copies(store)
    child_model = pages_with(a, "B", CHILD_PAGES)
    parent_model = pages_with(a, "C", PARENT_PAGES)

    with Scenario("fork-portions", store, children or "-", policy) as scenario:
        mapped = scenario.expect("mapped")
        assert mapped["resident_differs"] == []
        got = {}
        while len(got) < 2:
            message = scenario.next(30)
            assert message is not None, f"no report from the parent and the child{scenario.context()}"
            assert message["what"] in ("parent", "child"), message
            got[message["what"]] = message
        parent, child = got["parent"], got["child"]

        assert child["early_differs"] == [], "the child does not see the parent's data as of the fork"
        assert child["differs"] == [], "the child's view is not its writes over the data as of the fork"
        assert child["differs_after_flush"] == []
        assert child["pages"] == len(CHILD_PAGES)
        assert child["fork"]["child"] is True and child["fork"]["policy"] == policy
        assert child["fork"]["pages_still_inherited"] == 0, "the child's flush did not complete its portion"
        assert child["stats"]["fetch_failures"] == child["stats"]["poisoned"] == 0, child["stats"]
        assert parent["differs"] == [], "the parent's view is not its own"
        assert parent["pages"] == len(PARENT_PAGES)
        assert (parent["url"], parent["offset"]) == (store, 0)

        child_url, child_offset = child["url"], child["offset"]
        assert child_url == (children or store), f"the child's portion is in {child_url}"
        assert child_offset is not None and child_offset % PAGE == 0
        if children is None:
            assert child_offset >= FORK_SIZE, f"the child's portion at {child_offset} overlaps the parent's"
        if layout == "redis":
            # Chunk-aligned, so that at-fork copies whole chunks on the server's side.
            assert child_offset % (CHUNK_PAGES * PAGE) == 0, child_offset
            if policy == "at-fork":
                assert copies(store) > copies_before, "at-fork over one Redis server did not COPY on the server"
        root_bytes = stores[store](0, FORK_SIZE)
        assert differing_pages(root_bytes, parent_model) == [], "the parent's portion is not the parent's view"
        child_bytes = stores[child_url](child_offset, FORK_SIZE)
        assert differing_pages(child_bytes, child_model) == [], "the child's portion is not the child's view"

        scenario.send("exit")
        exited = scenario.expect("child-exited")
        assert exited["code"] == 0 and exited["differs"] == []
        assert scenario.wait(30) == 0, f"{describe_returncode(scenario.process.poll())}{scenario.context()}"
    if not child_url.startswith("file:"):
        # A remote store's slot is discarded as soon as its child has exited
        # (it holds the server's memory); a file's only when it is reused.
        deadline = time.monotonic() + 5
        while (left := differing_pages(stores[child_url](child_offset, FORK_SIZE), bytes(FORK_SIZE))) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], f"the exited child's portion on the server still holds pages {left}"
    assert differing_pages(stores[store](0, FORK_SIZE), parent_model) == []


def _read_file(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size).ljust(size, b"\0")


# --- 5. a server killed while a client faults ---------------------------------------------------------

OUTAGE_PAGES = 256


@pytest.mark.timeout(60)
def test_a_server_killed_while_a_client_faults_is_sigbus_past_the_deadline_never_zeros(private_redis_server,
                                                                                      redis_name):
    store = Remote(private_redis_server, redis_name)
    populate(store.url(), OUTAGE_PAGES)
    url = store.url(FAST)
    with Scenario("read-through-outage", url, OUTAGE_PAGES, 0.01) as scenario:
        scenario.expect("mapped")
        read = -1
        while read < 30:
            message = scenario.expect("read", timeout=20)
            read = message["page"]
        private_redis_server.kill()
        killed_at = time.monotonic()
        code = scenario.wait(20)
        died_after = time.monotonic() - killed_at
        messages = scenario.rest()
        log = scenario.stderr
    wrong = [m for m in messages if m["what"] == "wrong"]
    assert wrong == [], f"pages read wrong (zeros?) after the server was killed: {wrong[:5]}"
    assert not any(m["what"] == "done" for m in messages), "every page read though the server was dead"
    assert sigbus(code), f"the client ended with {describe_returncode(code)}, not SIGBUS{log[-2000:]}"
    assert died_after < 10, f"SIGBUS came {died_after:.1f} s after the kill, with deadline=1 and timeout=1"
    assert "failed until the deadline" in log and "cannot be filled" in log and "poisoning it" in log, \
        f"the pager logged no cause:\n{log[-3000:]}"
    assert f"127.0.0.1:{private_redis_server.port}" in log


@pytest.mark.timeout(60)
def test_a_fault_waits_within_the_deadline_and_is_served_once_the_server_is_back(make_redis_server,
                                                                                 redis_name):
    server = make_redis_server(appendonly=True)
    store = Remote(server, redis_name)
    populate(store.url(), 128)
    with Scenario("read-through-outage", store.url(), 128, 0.005) as scenario:  # the default deadline, 30 s
        scenario.expect("mapped")
        while scenario.expect("read", timeout=20)["page"] < 20:
            pass
        server.kill()
        # Drain what was read before the kill; then nothing, for 3 s: it waits.
        while (message := scenario.next(0.5)) is not None:
            assert message["what"] == "read", message
        assert scenario.next(3) is None and scenario.process.poll() is None, \
            f"the client did not wait for the dead server ({describe_returncode(scenario.process.poll())})" \
            f"{scenario.context()}"
        server.restart(empty=False)
        done = None
        while done is None:
            message = scenario.next(20)
            assert message is not None, f"no progress after the server came back{scenario.context()}"
            assert message["what"] in ("read", "done"), message
            if message["what"] == "done":
                done = message
        assert scenario.wait(20) == 0
    assert done["wrong"] == [], f"pages read wrong: {done['wrong']}"
    assert done["stats"]["fetch_failures"] == done["stats"]["poisoned"] == 0, done["stats"]


@pytest.mark.timeout(60)
def test_flush_raises_while_the_server_is_down_and_writes_once_it_is_back(make_redis_server, redis_name):
    server = make_redis_server(appendonly=True)  # what it acknowledged survives a SIGKILL
    store = Remote(server, redis_name)
    npages, dirty, probed = 64, 8, 40
    populate(store.url(), npages)
    url = store.url(FAST)
    with Scenario("flush-across-outage", url, npages, dirty, probed) as scenario:
        ready = scenario.expect("ready")
        assert ready["wrong_before"] == []
        assert ready["stats"]["dirty_pages"] == dirty
        server.kill()
        scenario.send("down")
        down = scenario.expect("down", timeout=30)

        probe = down["probe"]
        assert not probe["ok"] or not probe["zeros"], "a page never fetched read as zeros with the server dead"
        assert not probe["ok"], f"a page read with the server dead: {probe}"
        assert probe["errno"] == "EFAULT", probe
        assert probe["seconds"] < 8, f"the fault took {probe['seconds']:.1f} s with deadline=1"
        stats = down["stats_after_probe"]
        assert stats["fetch_failures"] >= 1 and stats["poisoned"] >= 1, stats
        assert redis_name in stats["last_error"], stats
        flush = down["flush"]
        assert flush["raised"], f"flush() returned {flush.get('result')} with the server dead"
        assert "StoreUnavailable" in flush["bases"] and "ConnectionError" in flush["bases"], flush
        assert redis_name in flush["message"], flush
        assert flush["seconds"] < 8, flush
        assert down["stats_after_flush"]["dirty_pages"] >= dirty, "pages a failed flush did not write are not dirty"
        server.restart(empty=False)  # back, with what its AOF holds: the flush before the kill, nothing since
        store.reset_client()
        assert differing_pages(store.bytes(0, npages * PAGE), all_pattern("A", npages)) == [], \
            "the server holds bytes no flush was acknowledged for"

        scenario.send("up")
        up = scenario.expect("up", timeout=30)
        assert not up["flush"]["raised"], f"flush() failed with the server back: {up['flush']}"
        assert up["flush"]["result"]["pages"] == dirty
        assert not up["again"]["raised"] and up["again"]["result"]["pages"] == 0
        assert up["stats"]["dirty_pages"] == 0
        assert up["wrong"] == [], f"pages read wrong once the server was back: {up['wrong']}"
        model = pages_with(all_pattern("A", npages), "B", range(dirty))
        assert differing_pages(store.bytes(0, npages * PAGE), model) == [], "the server does not hold the flush"
        scenario.send("close")
        assert not scenario.expect("closed")["close"]["raised"]
        assert scenario.wait(20) == 0
        log = scenario.stderr
    assert "cannot be filled" in log and redis_name in log, f"the pager logged no cause:\n{log[-3000:]}"
    with uffd_pager.Pager() as pager, pager.map(store.url(), npages * PAGE, writeback_interval=0) as region:
        assert differing_pages(region.view(), model) == []


# --- 6. a server restarted empty --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_map_of_a_pseudo_file_the_server_lost_raises_store_lost(private_redis_server, redis_name,
                                                               leaves_nothing_behind):
    store = Remote(private_redis_server, redis_name)
    populate(store.url(), 32)
    private_redis_server.restart(empty=True)
    with uffd_pager.Pager() as pager:
        warm_up_networking(pager)
        before = pager_state(pager)
        with leaves_nothing_behind(), pytest.raises(uffd_pager.StoreLost) as raised:
            pager.map(store.url(), 32 * PAGE)
        wait_until_pager_holds(pager, before)
        message = str(raised.value)
        assert "no longer holds" in message and store.url() in message, message
        assert "forget_store" in message, message
        # Started afresh on purpose: it reads as zeros, and works.
        uffd_pager.forget_store(store.url())
        with pager.map(store.url(), 32 * PAGE, writeback_interval=0) as region:
            assert bytes(region.view()) == bytes(32 * PAGE)
            region.view()[:PAGE] = b"x" * PAGE
            assert region.flush()["pages"] == 1


@pytest.mark.timeout(60)
def test_a_server_restarted_empty_while_mapped_is_sigbus_and_flush_raises(private_redis_server, redis_name):
    store = Remote(private_redis_server, redis_name)
    npages, dirty = 64, 4
    populate(store.url(), npages)
    with Scenario("lost-while-mapped", store.url(FAST), npages, dirty, 40, 41) as scenario:
        assert scenario.expect("ready")["wrong_before"] == []
        private_redis_server.restart(empty=True)
        scenario.send("lost")
        after = scenario.expect("after", timeout=30)
        probe = after["probe"]
        assert not (probe["ok"] and probe["zeros"]), "a page of the lost pseudo file read as zeros"
        assert not probe["ok"] and probe["errno"] == "EFAULT", probe
        assert after["stats_after_probe"]["fetch_failures"] >= 1, after["stats_after_probe"]
        flush = after["flush"]
        assert flush["raised"], f"flush() to a server that lost the pseudo file returned {flush.get('result')}"
        assert flush["type"] == "StoreLost", flush
        assert "lost" in flush["message"] and redis_name in flush["message"], flush
        assert after["stats_after_flush"]["dirty_pages"] >= dirty
        assert after["resident_ok"] == list(range(dirty)), "resident pages changed"
        scenario.send("touch")
        code = scenario.wait(20)
        messages = scenario.rest()
        log = scenario.stderr
    touched = [m for m in messages if m["what"] == "touched"]
    assert not touched, f"a load of a page never fetched from the lost pseudo file returned: {touched}"
    assert sigbus(code), f"the client ended with {describe_returncode(code)}, not SIGBUS"
    assert "lost the pseudo file" in log and "poisoning it" in log, log[-3000:]


@pytest.mark.timeout(90)
def test_a_cluster_master_restarted_empty_is_reported_at_map(private_redis_cluster, redis_name):
    cluster = private_redis_cluster
    store = Remote(cluster, redis_name)
    nchunks = 48
    populate(store.url(), nchunks * CHUNK_PAGES)
    meta = f"up:{redis_name}:meta"
    owners = {}
    for k, node in enumerate(cluster.nodes):
        with contextlib.suppress(RedisReplyError):  # MOVED: another master's slot
            if node.command("EXISTS", meta) == 1:
                owners["meta"] = k
    lost = next(k for k in range(len(cluster.nodes)) if k != owners["meta"])
    lost_chunks = sorted(chunk_keys_on(cluster.nodes[lost].command, redis_name))
    kept_chunks = sorted(set(range(nchunks)) - set(lost_chunks))
    assert lost_chunks and kept_chunks
    cluster.restart_node(lost, empty=True)  # the master without the meta key loses its data
    probes = f"{lost_chunks[0] * CHUNK_PAGES},{kept_chunks[0] * CHUNK_PAGES}"
    with Scenario("map-and-probe", store.url(FAST), nchunks * CHUNK_PAGES, probes) as scenario:
        outcome = scenario.next(40)
        assert outcome is not None, f"map() did not return{scenario.context()}"
        if outcome["what"] == "mapped":
            probed = scenario.expect("probed")
            zeros = [p["page"] for p in probed["probes"] if p["ok"] and p["zeros"]]
            pytest.fail(f"map() accepted a pseudo file one of whose masters ({cluster.nodes[lost].address}) came "
                        f"back empty; pages read as zeros: {zeros}; probes {probed['probes']}")
        assert outcome["what"] == "map-error", outcome
        assert outcome["type"] == "StoreLost", outcome
        assert scenario.wait(20) == 0


# --- 7. a value of the wrong length ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_value_of_the_wrong_length_is_sigbus_for_that_page_only(redis_server, redis_name):
    store = Remote(redis_server, redis_name)
    npages = 32
    populate(store.url(), npages)
    planted = {3: b"x" * 100, 5: b"y" * (PAGE + 1), 20: b""}
    for page, value in planted.items():
        store.client.hset(f"up:{redis_name}:{page // CHUNK_PAGES}", str(page % CHUNK_PAGES), value)
    assert [len(v) for v in raw_values(store.client, redis_name, 0, npages * PAGE) if v is not None] \
        == [len(planted.get(p, b"-" * PAGE)) for p in range(npages)]
    with Scenario("bad-values", store.url(), npages, ",".join(map(str, planted))) as scenario:
        probed = scenario.expect("probed")
        code = scenario.wait(20)
        messages = scenario.rest()
        log = scenario.stderr
    for probe in probed["probes"]:
        if probe["page"] in planted:
            assert not probe["ok"], f"page {probe['page']}, a {len(planted[probe['page']])}-byte value, read: {probe}"
            assert probe["errno"] == "EFAULT", probe
        else:
            assert probe["ok"] and probe["right"], f"page {probe['page']} beside the bad ones: {probe}"
    stats = probed["stats"]
    assert stats["fetch_failures"] == stats["poisoned"] == len(planted), stats
    assert "bytes" in stats["last_error"], stats
    assert not [m for m in messages if m["what"] == "touched"], "a load of the bad page returned"
    assert sigbus(code), f"the client ended with {describe_returncode(code)}, not SIGBUS"
    for value in planted.values():
        assert f"holds {len(value)} bytes" in log, f"no error logged for the {len(value)}-byte value:\n{log[-3000:]}"
    assert log.count("cannot be filled") >= len(planted), log[-3000:]


@pytest.mark.timeout(60)
def test_the_pagers_status_counts_remote_fetches_and_none_is_left_in_flight(redis_server, redis_name):
    store = Remote(redis_server, redis_name)
    npages = 48
    populate(store.url(), npages)
    with uffd_pager.Pager() as pager, pager.map(store.url(), npages * PAGE, writeback_interval=0) as region:
        before = pager.status()["fetches"]
        view = region.view()
        assert differing_pages(bytes(view), all_pattern("A", npages)) == []
        del view
        status = pager.status()
        after = status["fetches"]
    assert status["internal_errors"] == 0, "the pager logged an internal error (see its stderr)"
    assert after["pages"] - before["pages"] == npages, (before, after)
    assert after["in_flight"] == 0 and after["retries"] == before["retries"], after


# --- 7b. encrypted over Redis: the server sees ciphertext only, and what it alters never reads as data ------


@pytest.mark.timeout(90)
def test_an_encrypted_pseudo_file_holds_no_plaintext_and_a_tampering_server_gets_sigbus(redis_server, redis_name,
                                                                                        tmp_path):
    store = Remote(redis_server, redis_name)
    npages = 32
    key_file = tmp_path / "region.key"
    key_file.write_text(uffd_pager.Key.generate().to_text() + "\n")
    key_file.chmod(0o600)
    args = (store.url(), npages, str(key_file))

    def run(name: str, *more: Any) -> dict[str, Any]:
        with Scenario(name, *args, *more) as scenario:
            message = scenario.expect("probed" if name == "encrypted-probe" else "written")
            assert scenario.wait(30) == 0, f"{describe_returncode(scenario.process.poll())}{scenario.context()}"
        return message

    assert run("encrypted-write", "A", "all")["pages"] == npages
    values = raw_values(store.client, redis_name, 0, npages * PAGE)
    assert all(v is not None and len(v) == PAGE for v in values), "a page has no value, or one of the wrong size"
    blob = b"".join(values)  # type: ignore[arg-type]
    leaked = [(p, k) for p in range(npages) for k in range(0, PAGE, 16) if pattern("A", p)[k:k + 16] in blob]
    assert not leaked, f"16-byte runs of plaintext on the server: {leaked[:5]}"

    def put(page: int, value: bytes) -> None:
        store.client.hset(f"up:{redis_name}:{page // CHUNK_PAGES}", str(page % CHUNK_PAGES), value)

    old9 = values[9]
    assert run("encrypted-write", "A", "9")["pages"] == 1  # a newer version of page 9 (same bytes, new nonce)
    flipped = bytearray(values[3])  # type: ignore[arg-type]
    flipped[100] ^= 0x01
    put(3, bytes(flipped))  # one flipped bit
    put(5, values[6])  # two values swapped
    put(6, values[5])
    put(9, old9)  # an older value replayed
    probed = run("encrypted-probe", "A")
    tampered = {3, 5, 6, 9}
    for result in probed["probes"]:
        if result["page"] in tampered:
            assert not result["ok"] and result["errno"] == "EFAULT", f"a tampered page read as data: {result}"
        else:
            assert result["ok"] and result["right"], f"page {result['page']} beside the tampered ones: {result}"
    assert probed["auth_failures"] == len(tampered), probed["stats"]


# --- 8. bad URLs, unreachable servers ----------------------------------------------------------------------

VALID = re.escape("redis://HOST:PORT/NAME")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url, message", [
    pytest.param("rediss://127.0.0.1:6379/name", "scheme.*" + VALID, id="unknown-scheme"),
    pytest.param("memcached://127.0.0.1:11211/name", "scheme.*" + VALID, id="unknown-scheme-memcached"),
    pytest.param("redis:///name", VALID, id="no-host"),
    pytest.param("redis://:6379/name", VALID, id="no-host-with-port"),
    pytest.param("redis+cluster://127.0.0.1:7000,:7001/name", VALID, id="cluster-node-without-host"),
    pytest.param("redis://127.0.0.1/name", VALID, id="no-port"),
    pytest.param("redis://127.0.0.1:http/name", "port.*" + VALID, id="port-not-a-number"),
    pytest.param("redis://127.0.0.1:0/name", "port.*" + VALID, id="port-zero"),
    pytest.param("redis://127.0.0.1:65536/name", "port.*" + VALID, id="port-too-big"),
    pytest.param("redis://127.0.0.1:6379", "name.*" + VALID, id="no-name"),
    pytest.param("redis://127.0.0.1:6379/", "name.*" + VALID, id="empty-name"),
    pytest.param("redis://127.0.0.1:6379/a/b", "name.*" + VALID, id="name-with-a-slash"),
    pytest.param("redis+unix:///tmp/redis.sock", "name.*" + re.escape("redis+unix:///PATH"), id="unix-no-name"),
    pytest.param("redis+unix://relative/redis.sock?name=x", re.escape("redis+unix:///PATH"), id="unix-relative"),
    pytest.param("redis+cluster://127.0.0.1:7000/", "name", id="cluster-no-name"),
    pytest.param("redis://127.0.0.1:6379/name?colour=red", "colour.*known.*deadline", id="unknown-option"),
    pytest.param("redis://127.0.0.1:6379/name?timeout=soon", "timeout.*not a number", id="timeout-not-a-number"),
    pytest.param("redis://127.0.0.1:6379/name?deadline=0", "deadline", id="deadline-zero"),
    pytest.param("redis://127.0.0.1:6379/name?timeout=-1", "timeout", id="timeout-negative"),
    pytest.param("redis://127.0.0.1:6379/name?wait=many", "wait", id="wait-not-a-number"),
    pytest.param("redis+cluster://127.0.0.1:7000/name?db=1", "db", id="db-in-a-cluster"),
    pytest.param("redis://127.0.0.1:6379/name?name=other", "name", id="name-option-on-tcp"),
])
@pytest.mark.parametrize("role", ["store", "children"])
def test_a_bad_url_is_refused_at_map_before_anything_is_registered(pager, tmp_path, leaves_nothing_behind,
                                                                   url, message, role):
    if role == "store":
        args: tuple[str, dict[str, Any]] = (url, {})
    else:
        parent = tmp_path / "parent.bin"
        parent.write_bytes(bytes(PAGE))
        args = (f"file://{parent}", {"children": url})
    with leaves_nothing_behind(pager), pytest.raises(ValueError) as raised:
        pager.map(args[0], 16 * PAGE, **args[1])
    text = str(raised.value)
    assert re.search(message, text), f"the message does not say what is wrong or what is valid: {text!r}"
    assert url in text or repr(url) in text, f"the message does not name the URL: {text!r}"


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["tcp-refused", "unix-no-socket", "cluster-refused", "silent-server",
                                 "children-refused"])
def test_an_unreachable_server_at_map_is_a_clear_error_and_nothing_is_registered(pager, tmp_path, redis_name,
                                                                                 leaves_nothing_behind, how):
    with contextlib.ExitStack() as stack:
        kwargs: dict[str, Any] = {}
        if how == "tcp-refused":
            url = f"redis://127.0.0.1:{free_port()}/{redis_name}?timeout=1"
        elif how == "unix-no-socket":
            url = f"redis+unix://{tmp_path}/nobody.sock?name={redis_name}&timeout=1"
        elif how == "cluster-refused":
            url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{redis_name}?timeout=1"
        elif how == "silent-server":
            url = f"redis://127.0.0.1:{stack.enter_context(silent_server())}/{redis_name}?timeout=1"
        else:
            url = f"redis://127.0.0.1:{free_port()}/{redis_name}?timeout=1"
            parent = tmp_path / "parent.bin"
            parent.write_bytes(bytes(PAGE))
            kwargs["children"] = url
        store = f"file://{tmp_path}/parent.bin" if how == "children-refused" else url
        warm_up_networking(pager)
        before = pager_state(pager)
        started = time.monotonic()
        with leaves_nothing_behind(), pytest.raises(uffd_pager.StoreUnavailable) as raised:
            pager.map(store, 16 * PAGE, **kwargs)
        took = time.monotonic() - started
        wait_until_pager_holds(pager, before)
    assert isinstance(raised.value, ConnectionError)
    assert url in str(raised.value), f"the error does not name the URL: {raised.value}"
    assert took < 10, f"map() took {took:.1f} s to give up with timeout=1"
    with pager.map(f"file://{tmp_path}/parent.bin" if how == "children-refused" else _scratch(tmp_path),
                   PAGE) as region:  # the pager still serves
        assert bytes(region.view()) == bytes(PAGE)


def _scratch(tmp_path: Path) -> str:
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(PAGE))
    return f"file://{path}"
