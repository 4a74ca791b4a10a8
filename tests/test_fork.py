"""Fork safety: after os.fork() a child sees its parent's data as of the fork,
its writes go to its own portion of the store (placed lazily, or at fork with
fork_policy="at-fork"), a parent's later write-back never shows through in a
child, and a child's flush leaves its portion holding exactly its view.

Every forked child runs `_child_main`: whatever it does is wrapped so that it
always ends in os._exit (never back into pytest), reports over a pipe, and is
waited for with a deadline (then killed), so a hung child fails the test
instead of hanging it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import uffd_pager
from pages import differing_pages

PAGE = uffd_pager.PAGE_SIZE
POLICIES = ("on-write", "at-fork", "on-access")
TRACKING = ("async", "sync")
STATUS_KEYS = ("regions", "open_fds", "tasks", "portions")


# --- helpers -------------------------------------------------------------------------


def url(path: Path | str) -> str:
    return f"file://{path}"


def pattern(tag: str, page: int) -> bytes:
    """A page of bytes naming its tag and page (the same in every process)."""
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def with_pages(base: bytes | bytearray, tag: str, pages: Iterator[int] | list[int] | range) -> bytearray:
    """base with each of `pages` replaced by pattern(tag, page)."""
    out = bytearray(base)
    for p in pages:
        out[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)
    return out


def read_raw(path: Path | str, offset: int, size: int) -> bytes:
    """The store's bytes at [offset, offset + size); past EOF reads as zero."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    return data.ljust(size, b"\0")


def fresh_map_reads(pager: uffd_pager.Pager, store: str, size: int, offset: int) -> bytes:
    """What a new map() of (store, offset) shows."""
    region = pager.map(store, size, offset=offset, writeback_interval=0)
    try:
        view = region.view()
        data = bytes(view)
        del view
    finally:
        region.close()
    return data


def status_subset(pager: uffd_pager.Pager) -> dict[str, int]:
    status = pager.status()
    return {key: status[key] for key in STATUS_KEYS}


def wait_for_status(pager: uffd_pager.Pager, expected: dict[str, int], timeout: float = 6.0) -> None:
    """Polls the pager until its status is back to `expected` (a child's exit
    is noticed through its pidfd, or by a probe every second)."""
    deadline = time.monotonic() + timeout
    while True:
        now = status_subset(pager)
        if now == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the pager still holds state of exited children after {timeout} s: "
                                 f"status {now}, before the children {expected}")
        time.sleep(0.05)


def wait_pid(pid: int, timeout: float) -> int:
    """waitpid with a deadline: the exit code, or kill it and fail."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            where = _wchan(pid)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit within {timeout} s ({where}); killed it")
        time.sleep(0.005)


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f"sleeping at {f.read() or '(running)'}"
    except OSError:
        return "gone"


class Channel:
    """Line-delimited JSON over a pair of pipe descriptors, with timeouts."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._buf = b""

    def send(self, **message: Any) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing received for {timeout} s")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if ready:
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    raise EOFError("the other end closed the channel")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class Child:
    def __init__(self, pid: int, chan: Channel, forked_at: Any) -> None:
        self.pid = pid
        self.chan = chan
        self.forked_at = forked_at  # what the parent recorded right after fork returned
        self.exit_code: int | None = None

    def send(self, **message: Any) -> None:
        self.chan.send(**message)

    def recv(self, what: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        try:
            message = self.chan.recv(timeout)
        except (TimeoutError, EOFError) as exc:
            raise AssertionError(f"child {self.pid}: {exc} ({_wchan(self.pid)})") from None
        if "error" in message:
            raise AssertionError(f"child {self.pid} failed:\n{message['error']}")
        if what is not None:
            assert message.get("what") == what, f"child {self.pid} said {message}, expected {what!r}"
        return message

    def wait(self, timeout: float = 30.0) -> int:
        if self.exit_code is None:
            self.exit_code = wait_pid(self.pid, timeout)
        return self.exit_code

    def finish(self, timeout: float = 30.0) -> None:
        """Waits for the child and asserts that it exited with 0."""
        code = self.wait(timeout)
        assert code == 0, f"child {self.pid} exited with {code}"


def _child_main(body: Callable[..., None], chan: Channel, args: tuple[Any, ...]) -> None:
    """The whole life of a forked child: never returns."""
    code = 1
    try:
        body(chan, *args)
        code = 0
    except BaseException:
        try:
            chan.send(error=traceback.format_exc())
        except BaseException:
            pass
    finally:
        os._exit(code)


class Forker:
    """fork(body, *args, at_fork=None) -> Child running body(chan, *args);
    `at_fork()` is called in the parent right after fork returns."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def __call__(self, body: Callable[..., None], *args: Any, at_fork: Callable[[], Any] | None = None) -> Child:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child_main(body, Channel(p2c_r, c2p_w), args)
        forked_at = at_fork() if at_fork is not None else None
        os.close(p2c_r)
        os.close(c2p_w)
        child = Child(pid, Channel(c2p_r, p2c_w), forked_at)
        self.children.append(child)
        return child

    def cleanup(self) -> None:
        for child in self.children:
            if child.exit_code is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            child.chan.close()


@pytest.fixture
def fork() -> Iterator[Forker]:
    forker = Forker()
    try:
        yield forker
    finally:
        forker.cleanup()


def backing_of(message: dict[str, Any]) -> tuple[str, int]:
    return message["url"], message["offset"]


# --- 1. parent and child write; each portion holds exactly its process's view ----------

N1 = 24
CHILD_PAGES = [1, 2, 5, 6, 9, 20]
PARENT_PAGES = [2, 3, 6, 7, 10, 23]  # 2 and 6 are written by both


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["child-flushes-first", "parent-flushes-first"])
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_parent_and_child_writes_land_each_in_its_own_portion(pager, random_file, fork, policy, tracking, order):
    size = N1 * PAGE
    path = random_file(size)
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    a = bytearray(b"".join(pattern("A", p) for p in range(N1)))
    view[:] = a
    assert region.flush()["pages"] == N1
    child_view = with_pages(a, "B", CHILD_PAGES)
    parent_view = with_pages(a, "C", PARENT_PAGES)

    def child_body(chan: Channel) -> None:
        v = region.view()
        chan.send(what="alive", differs_from_a=differing_pages(v, a))
        for p in CHILD_PAGES:
            v[p * PAGE:(p + 1) * PAGE] = pattern("B", p)
        flushed = region.flush() if order == "child-flushes-first" else None
        chan.send(what="written")
        chan.recv()
        if flushed is None:
            flushed = region.flush()
        backing = region.backing()
        chan.send(what="flushed", pages=flushed["pages"], url=backing.url, offset=backing.offset,
                  differs_from_model=differing_pages(v, child_view), fork=region.stats()["fork"])
        chan.recv()

    child = fork(child_body)
    alive = child.recv("alive")
    assert alive["differs_from_a"] == [], "the child does not see the parent's data as of the fork"
    child.recv("written")
    for p in PARENT_PAGES:
        view[p * PAGE:(p + 1) * PAGE] = pattern("C", p)
    assert region.flush()["pages"] == len(PARENT_PAGES)
    child.send(what="go")
    flushed = child.recv("flushed")

    assert flushed["differs_from_model"] == [], "the child's view is not its own writes over the data at fork"
    assert flushed["pages"] == len(CHILD_PAGES)
    assert flushed["fork"]["child"] is True and flushed["fork"]["policy"] == policy
    assert flushed["fork"]["pages_still_inherited"] == 0, "the child's flush did not complete its portion"
    assert region.backing() == uffd_pager.region.Backing(url(path), 0)
    child_url, child_offset = backing_of(flushed)
    assert child_url == url(path)
    assert child_offset % PAGE == 0 and child_offset >= size, f"child portion at {child_offset} overlaps the root"
    assert differing_pages(view, parent_view) == [], "the parent's view changed"

    root_bytes = read_raw(path, 0, size)
    assert differing_pages(root_bytes, parent_view) == [], "the first portion is not the parent's view"
    child_bytes = read_raw(path, child_offset, size)
    assert differing_pages(child_bytes, child_view) == [], "the child's portion is not the child's view"
    assert differing_pages(fresh_map_reads(pager, url(path), size, 0), parent_view) == []
    assert differing_pages(fresh_map_reads(pager, child_url, size, child_offset), child_view) == []

    child.send(what="exit")
    child.finish()
    del view
    region.close()


# --- 2. lazy placement (claim 7) and what each policy copies ----------------------------

N2 = 16
MISSING_AT_FORK = 12  # pages 8..15 are not resident in the parent at fork
PARENT_WRITES = [1, 2, 9]  # 1, 2 resident at fork, 9 missing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_child_portion_placement_and_copy_counters(pager, random_file, fork, policy, tracking):
    size = N2 * PAGE
    path = random_file(size)
    original = path.read_bytes()
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    assert bytes(view[:8 * PAGE]) == original[:8 * PAGE]  # pages 0..7 resident, 8..15 missing
    assert pager.status()["portions"] == 1

    def child_body(chan: Channel) -> None:
        v = region.view()
        backing = region.backing()  # talks to the pager: must not place the portion
        chan.send(what="alive", placed=backing is not None, fork=region.stats()["fork"],
                  placed_again=region.backing() is not None)
        chan.recv()
        page = bytes(v[MISSING_AT_FORK * PAGE:(MISSING_AT_FORK + 1) * PAGE])  # a fault on a page missing at fork
        backing = region.backing()
        chan.send(what="touched", page_ok=page == original[MISSING_AT_FORK * PAGE:(MISSING_AT_FORK + 1) * PAGE],
                  placed=backing is not None, fork=region.stats()["fork"])
        chan.recv()
        chan.send(what="after-parent-flush", differs=differing_pages(v, original), fork=region.stats()["fork"])
        chan.recv()

    child = fork(child_body)
    alive = child.recv("alive")
    parent_fork = region.stats()["fork"]
    assert parent_fork["child"] is False and parent_fork["policy"] == policy
    assert parent_fork["live_children"] == 1
    assert alive["fork"]["child"] is True and alive["fork"]["policy"] == policy
    if policy == "at-fork":
        assert alive["placed"], "at-fork: the child's portion must exist right at fork"
        assert pager.status()["portions"] == 2
        assert parent_fork["pages_copied_to_children"] == N2
        assert alive["fork"]["pages_copied_in"] == N2
        assert alive["fork"]["pages_still_inherited"] == 0
    else:
        assert not alive["placed"] and not alive["placed_again"], \
            f"{policy}: the child's portion was placed before the child touched the region"
        assert pager.status()["portions"] == 1, "a portion was placed for a child that touched nothing"
        assert alive["fork"]["portion_offset"] is None
        assert alive["fork"]["pages_copied_in"] == 0
        assert alive["fork"]["pages_still_inherited"] == N2
        assert parent_fork["pages_copied_to_children"] == 0

    child.send(what="touch")
    touched = child.recv("touched")
    assert touched["page_ok"]
    assert touched["placed"], "a fault on a missing page did not place the child's portion"
    assert pager.status()["portions"] == 2
    if policy == "on-access":
        assert touched["fork"]["pages_copied_in"] >= 1, "on-access: the child's read fault copied nothing"
    if policy == "on-write":
        assert touched["fork"]["pages_copied_in"] == 0, "on-write: a read fault must not copy"

    before = region.stats()["fork"]["pages_copied_to_children"]
    for p in PARENT_WRITES:
        view[p * PAGE:(p + 1) * PAGE] = pattern("P", p)
    assert region.flush()["pages"] == len(PARENT_WRITES)
    copied = region.stats()["fork"]["pages_copied_to_children"] - before
    if policy == "at-fork":
        assert copied == 0, "at-fork: the child holds every page already"
    else:
        assert copied == len(PARENT_WRITES), \
            f"{policy}: writing back {len(PARENT_WRITES)} pages the child inherits copied {copied}"

    child.send(what="check")
    after = child.recv("after-parent-flush")
    assert after["differs"] == [], "the child sees the parent's writes made after the fork"
    if policy == "on-write":
        assert after["fork"]["pages_copied_in"] == len(PARENT_WRITES)
    assert differing_pages(read_raw(path, 0, size), with_pages(original, "P", PARENT_WRITES)) == []
    child.send(what="exit")
    child.finish()
    del view
    region.close()


# --- 3. many children at once, and generations ------------------------------------------

N3 = 8
MANY = 32


@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", POLICIES)
def test_32_children_at_once_each_portion_holds_its_view(pager, random_file, fork, policy):
    size = N3 * PAGE
    path = random_file(size)
    region = pager.map(url(path), size, fork_policy=policy, keep_child_portions=True, writeback_interval=0)
    view = region.view()
    a = bytearray(b"".join(pattern("A", p) for p in range(N3)))
    view[:] = a
    region.flush()

    def pages_of(i: int) -> list[int]:
        return sorted({i % N3, (i + 3) % N3, (i * 5 + 1) % N3})

    def child_body(chan: Channel, i: int) -> None:
        v = region.view()
        seen_a = differing_pages(v, a)
        for p in pages_of(i):
            v[p * PAGE:(p + 1) * PAGE] = pattern(f"child{i}", p)
        region.flush()
        backing = region.backing()
        chan.send(what="done", seen_a=seen_a, url=backing.url, offset=backing.offset,
                  differs=differing_pages(v, with_pages(a, f"child{i}", pages_of(i))))

    children = [fork(child_body, i) for i in range(MANY)]
    results = [child.recv("done", timeout=60) for child in children]
    for child in children:
        child.finish()

    offsets = []
    for i, result in enumerate(results):
        assert result["seen_a"] == [], f"child {i} did not see the data at fork"
        assert result["differs"] == [], f"child {i}'s view is wrong"
        assert result["url"] == url(path)
        offsets.append(result["offset"])
    assert len(set(offsets)) == MANY, f"children share portions: {sorted(offsets)}"
    spans = sorted([(0, size)] + [(o, o + size) for o in offsets])
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"portions overlap: {spans}"
    for i, offset in enumerate(offsets):
        expected = with_pages(a, f"child{i}", pages_of(i))
        assert differing_pages(read_raw(path, offset, size), expected) == [], \
            f"child {i}'s portion at {offset} does not hold its view"
    assert differing_pages(read_raw(path, 0, size), a) == [], "the root portion changed"
    assert differing_pages(view, a) == []
    del view
    region.close()


N_GEN = 16
GENERATIONS = 4  # the test process, child, grandchild, great-grandchild


def _generation_view(base: bytes, gen: int) -> bytearray:
    """What generation `gen` sees at its end: every ancestor's marker (pages
    0..gen-1), its own marker (page gen), its own late write (page 8 + gen),
    and none of its ancestors' late writes (made after they forked it)."""
    view = bytearray(base)
    for g in range(gen + 1):
        view[g * PAGE:(g + 1) * PAGE] = pattern(f"gen{g}", g)
    late = 8 + gen
    view[late * PAGE:(late + 1) * PAGE] = pattern(f"late{gen}", late)
    return view


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_three_generations_each_portion_holds_its_view(pager, random_file, policy, tracking):
    size = N_GEN * PAGE
    path = random_file(size)
    base = path.read_bytes()
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking,
                       keep_child_portions=True, writeback_interval=0)
    report_r, report_w = os.pipe()

    def live(gen: int) -> int:
        """Generation gen's life up to its report; returns its child's pid (or 0)."""
        v = region.view()
        # At start: every ancestor's marker, none of their late writes.
        at_start = bytearray(base)
        for g in range(gen):
            at_start[g * PAGE:(g + 1) * PAGE] = pattern(f"gen{g}", g)
        differs_at_start = differing_pages(v, at_start)
        v[gen * PAGE:(gen + 1) * PAGE] = pattern(f"gen{gen}", gen)
        region.flush()
        pid = 0
        if gen + 1 < GENERATIONS:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    if gen == 0:
                        os.close(report_r)  # only the test process reads the reports
                    run_generation(gen + 1)
                    code = 0
                except BaseException:
                    try:
                        os.write(report_w, (json.dumps({"gen": gen + 1, "error": traceback.format_exc()[-3000:]})
                                            + "\n").encode())
                    except BaseException:
                        pass
                finally:
                    os._exit(code)
        late = 8 + gen
        v[late * PAGE:(late + 1) * PAGE] = pattern(f"late{gen}", late)
        region.flush()
        live.state = (differs_at_start, differing_pages(v, _generation_view(base, gen)))  # type: ignore[attr-defined]
        del v
        return pid

    def run_generation(gen: int) -> None:
        child = live(gen)
        child_code = wait_pid(child, 20.0 - 4 * gen) if child else 0
        differs_at_start, differs_at_end = live.state  # type: ignore[attr-defined]
        backing = region.backing()
        message = {"gen": gen, "url": backing.url, "offset": backing.offset, "child_code": child_code,
                   "differs_at_start": differs_at_start, "differs_at_end": differs_at_end,
                   "fork": region.stats()["fork"]}
        os.write(report_w, (json.dumps(message) + "\n").encode())

    writer_open = True
    try:
        first_child = live(0)
        os.close(report_w)  # the reports' pipe now ends when every generation has exited
        writer_open = False
        chan = Channel(report_r, -1)
        reports: dict[int, dict[str, Any]] = {}
        try:
            while len(reports) < GENERATIONS - 1:
                message = chan.recv(timeout=30)
                assert "error" not in message, f"generation {message['gen']} failed:\n{message['error']}"
                reports[message["gen"]] = message
        finally:
            code = wait_pid(first_child, 30)
        assert code == 0
    finally:
        if writer_open:
            os.close(report_w)
        os.close(report_r)

    differs_at_start, differs_at_end = live.state  # type: ignore[attr-defined]
    assert differs_at_start == [] and differs_at_end == []
    assert region.backing().offset == 0
    offsets = {0: 0}
    for gen, report in sorted(reports.items()):
        assert report["child_code"] == 0, f"generation {gen + 1} exited with {report['child_code']}"
        assert report["differs_at_start"] == [], f"generation {gen} did not start with its parent's view at fork"
        assert report["differs_at_end"] == [], f"generation {gen}'s view is not its own"
        assert report["url"] == url(path)
        assert report["fork"]["child"] is True
        offsets[gen] = report["offset"]
    assert len(set(offsets.values())) == GENERATIONS, f"generations share portions: {offsets}"
    for gen, offset in offsets.items():
        assert differing_pages(read_raw(path, offset, size), _generation_view(base, gen)) == [], \
            f"generation {gen}'s portion at {offset} does not hold its view"
    region.close()


# --- 4. a writer thread racing 20 forks ----------------------------------------------------

N4 = 512
FORKS = 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_children_never_see_writes_made_after_their_fork(pager, sparse_file, fork, policy, tracking):
    import numpy

    size = N4 * PAGE
    path = sparse_file(size)  # every page holds counter 0
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    state = {"published": 0}
    last = [0] * N4  # last[p]: the counter value whose write to page p is complete
    stop = threading.Event()
    writes = [0]
    flushes = [0]
    flush_errors: list[str] = []

    def writer() -> None:
        rng = random.Random(f"writer-{policy}-{tracking}")
        c = 0
        while not stop.is_set():
            c += 1
            state["published"] = c  # before the write: a value is in memory only once published
            p = rng.randrange(N4)
            view[p * PAGE:(p + 1) * PAGE] = struct.pack("<Q", c) * (PAGE // 8)
            last[p] = c
            writes[0] = c
            if c % 32 == 0:
                time.sleep(0.0005)  # let the pages fill slowly: most are still missing at the early forks

    def flusher() -> None:
        while not stop.is_set():
            try:
                region.flush()
            except OSError as exc:  # reported below; keep flushing
                flush_errors.append(repr(exc))
            flushes[0] += 1
            time.sleep(0.003)

    def child_body(chan: Channel, lower: list[int], access: str) -> None:
        time.sleep(0.03)  # let the parent write and flush pages after our fork
        v = region.view()
        # In order, either way, the child's read-ahead fills most pages: it
        # must never fill one with what the parent wrote after the fork.
        order = list(range(N4))
        if access == "backward":
            order.reverse()
        elif access == "random":
            random.shuffle(order)
        values = [0] * N4
        torn = []
        for p in order:
            words = numpy.frombuffer(v[p * PAGE:(p + 1) * PAGE], dtype="<u8")
            values[p] = int(words[0])
            if not (words == words[0]).all():
                torn.append(p)
        snapshot = bytes(v)
        region.flush()
        backing = region.backing()
        portion = read_raw(path, backing.offset, size)
        chan.send(what="values", values=values, torn=torn, portion_differs=differing_pages(portion, snapshot))

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=flusher, daemon=True)]
    for thread in threads:
        thread.start()
    children = []
    try:
        rng = random.Random(1)
        for i in range(FORKS):
            time.sleep(rng.uniform(0.002, 0.015))
            lower = list(last)
            access = ("random", "forward", "backward")[i % 3]
            children.append((fork(child_body, lower, access, at_fork=lambda: state["published"]), lower))
        results = [(child.recv("values", timeout=60), child, lower) for child, lower in children]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    for _, child, _ in results:
        child.finish()

    # What the test needs is writes between the forks, not a number of them
    # (which a loaded machine cuts by half): most children forked at a new counter.
    forked_at = sorted({child.forked_at for _, child, _ in results})
    assert len(forked_at) > FORKS // 2 and flushes[0] > 5, \
        f"the writer/flusher hardly ran between the forks: counters at fork {forked_at}, {flushes[0]} flushes"
    for i, (result, child, lower) in enumerate(results):
        v_after = child.forked_at
        newer = [(p, v) for p, v in enumerate(result["values"]) if v > v_after]
        older = [(p, v, lower[p]) for p, v in enumerate(result["values"]) if v < lower[p]]
        assert result["torn"] == [], f"child {i} sees pages torn between two writes: {result['torn'][:10]}"
        assert not newer, f"child {i} (forked at counter <= {v_after}) sees later writes (page, value): {newer[:10]}"
        assert not older, f"child {i} misses writes made before its fork (page, value, expected >=): {older[:10]}"
    assert not flush_errors, f"the parent's flush() failed while forks were under way: {flush_errors[:3]}"
    for i, (result, child, lower) in enumerate(results):
        assert result["portion_differs"] == [], \
            f"child {i}: after its flush its portion does not hold its view; pages: {result['portion_differs']}"
    del view
    region.close()


# --- 4b. forks racing the parent's flush, and flushes that fail copying for a fork ----------


def uffd_wp_bit(address: int) -> bool:
    """Whether this process's pte at address is uffd write-protected
    (/proc/self/pagemap bit 57): how a test sees the pager re-protect the
    pages a flush took, before the flush returns."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        (entry,) = struct.unpack("<Q", os.pread(fd, 8, address // PAGE * 8))
    finally:
        os.close(fd)
    return bool(entry >> 57 & 1)


def wait_for_wp_bit(address: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not uffd_wp_bit(address):
        assert time.monotonic() < deadline, f"the flush never write-protected {address:#x}"


N_RACE = 16384  # 64 MiB: its write-back takes ~100 ms, a fork ~5 ms


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_child_forked_while_the_parents_write_back_is_under_way_gets_its_view_in_its_portion(
        pager, sparse_file, fork, policy, tracking):
    """The parent's flush has taken its dirty pages (they are clean in the
    child, which sees them as written) but not yet written them when the child
    is forked; then the parent writes half of them again. The child's portion
    must end up holding what the child sees: neither the store's bytes from
    before that flush (at-fork copies at once) nor the parent's later writes
    (which its write-back may read out of the parent's memory)."""
    size = N_RACE * PAGE
    path = sparse_file(size)
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    view[:] = b"\x01" * size
    assert not uffd_wp_bit(region.address + size - PAGE)
    flushed: list[Any] = []

    def flush() -> None:
        try:
            flushed.append(region.flush())
        except OSError as exc:
            flushed.append(exc)

    flusher = threading.Thread(target=flush)
    flusher.start()
    wait_for_wp_bit(region.address + size - PAGE)  # every dirty page taken: the write-back has begun

    def child_body(chan: Channel) -> None:
        chan.recv()
        region.flush()
        backing = region.backing()
        chan.send(what="flushed", url=backing.url, offset=backing.offset,
                  sees_ones=bytes(region.view()) == b"\x01" * size)
        chan.recv()

    child = fork(child_body)  # the 64 MiB write-back takes ~100 ms here: it is still under way
    view[size // 2:] = b"\x02" * (size // 2)  # after the fork: never the child's
    flusher.join(timeout=30)
    assert flushed and not isinstance(flushed[0], BaseException), f"the parent's flush failed: {flushed}"
    child.send(what="flush")
    report = child.recv("flushed")
    assert report["sees_ones"], "the child sees writes its parent made after the fork"
    portion = read_raw(path, report["offset"], size)
    bad = [p for p in range(N_RACE) if portion[p * PAGE:(p + 1) * PAGE] != b"\x01" * PAGE]
    kinds = {portion[p * PAGE] for p in bad}
    assert not bad, (f"{len(bad)} pages of the child's portion (flushed) differ from its view, e.g. {bad[:5]}; "
                     f"they hold bytes {sorted(kinds)} (0: the store before the parent's flush, "
                     f"2: the parent's writes after the fork)")
    child.send(what="exit")
    child.finish()
    region.flush()
    assert read_raw(path, 0, size) == bytes(view), "the parent's own portion is not its view"
    del view
    region.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", TRACKING)
def test_a_flush_racing_a_fork_loses_no_page(pager, sparse_file, fork, tracking):
    """A fork while the pager is write-protecting the dirty pages it takes (an
    unread FORK event makes UFFDIO_WRITEPROTECT fail with EAGAIN): the flush
    must write every page, or at least leave the ones it did not write dirty."""
    size = N_RACE * PAGE
    path = sparse_file(size)
    region = pager.map(url(path), size, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    for p in range(0, N_RACE, 2):  # one run per page: taking them lasts a while
        view[p * PAGE:p * PAGE + 8] = struct.pack("<Q", p + 1)
    results: list[Any] = []

    def flush() -> None:
        try:
            results.append(region.flush())
        except OSError as exc:
            results.append(exc)

    flusher = threading.Thread(target=flush)
    flusher.start()
    wait_for_wp_bit(region.address)  # the pager has begun taking the dirty pages
    child = fork(lambda chan: time.sleep(0.2))
    flusher.join(timeout=30)
    child.finish()
    second = region.flush()
    stored = read_raw(path, 0, size)
    memory = bytes(view)
    lost = [p for p in range(0, N_RACE, 2) if stored[p * PAGE:(p + 1) * PAGE] != memory[p * PAGE:(p + 1) * PAGE]]
    assert not lost, (f"{len(lost)} written pages never reached the store, e.g. {lost[:5]} "
                      f"(flush racing the fork: {results}, the next flush: {second})")
    assert results and not isinstance(results[0], BaseException), \
        f"flush() failed because a fork was under way: {results}"
    del view
    region.close()


N_FULL = 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", ["on-write", "on-access"])
@pytest.mark.parametrize("who", ["child", "parent"])
def test_a_flush_that_fails_for_want_of_space_to_copy_for_a_fork_keeps_its_pages_dirty(
        small_tmpfs, pager, fork, who, policy, tracking):
    """A flush that has to copy pages for fork's sake (a child completing its
    portion, or a parent preserving the old bytes for a child that inherits
    them) on a disk with room for 4 pages: it raises ENOSPC and, as for any
    failed flush, its written pages stay dirty, so the flush after room is
    made writes them."""
    size = N_FULL * PAGE
    filler = small_tmpfs / "filler"
    store = small_tmpfs / "store"
    store.touch()
    region = pager.map(url(store), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    try:
        view = region.view()
        a = bytearray(b"".join(pattern("A", p) for p in range(N_FULL)))
        view[:] = a
        region.flush()
        child_pages = [3, 7] if who == "child" else []
        parent_pages = list(range(8)) if who == "parent" else []
        child_view = with_pages(a, "B", child_pages)
        parent_view = with_pages(a, "C", parent_pages)

        def flush_once() -> str:
            try:
                region.flush()
                return "returned"
            except OSError as exc:
                return f"errno {exc.errno}: {exc}"

        def child_body(chan: Channel) -> None:
            v = region.view()
            chan.send(what="alive")
            chan.recv()
            for p in child_pages:
                v[p * PAGE:(p + 1) * PAGE] = pattern("B", p)
            first = flush_once() if who == "child" else None
            chan.send(what="first", first=first)
            chan.recv()
            second = region.flush()
            backing = region.backing()
            chan.send(what="second", second=second, url=backing.url, offset=backing.offset,
                      differs=differing_pages(v, child_view))
            chan.recv()

        child = fork(child_body)
        child.recv("alive")
        filler.write_bytes(b"\xff" * ((1 << 20) - size - 4 * PAGE))  # room for about 4 more pages
        child.send(what="write")
        first = child.recv("first")["first"]
        if who == "parent":
            for p in parent_pages:
                view[p * PAGE:(p + 1) * PAGE] = pattern("C", p)
            first = flush_once()  # copies 8 pages into the child's portion first: no room
        filler.unlink()
        second = region.flush() if who == "parent" else None
        child.send(what="room")
        reported = child.recv("second")
        assert reported["differs"] == [], "the child's view is not its own"
        lost = {
            "parent": differing_pages(read_raw(store, 0, size), parent_view),
            "child": differing_pages(read_raw(store, reported["offset"], size), child_view),
        }
        assert lost == {"parent": [], "child": []}, (
            f"written pages were lost: pages of each portion that differ from its process's view: {lost} "
            f"(the {who}'s flush on the full disk: {first}; its flush after room was made: "
            f"{second if who == 'parent' else reported['second']})")
        assert first.startswith(f"errno {errno.ENOSPC}"), f"the {who}'s flush on a full disk: {first}"
        child.send(what="exit")
        child.finish()
        del view
    finally:
        filler.unlink(missing_ok=True)
        region.close()


# --- 5. children= another file ---------------------------------------------------------------

N5 = 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", POLICIES)
def test_children_portions_go_to_the_children_file(pager, random_file, fork, policy):
    size = N5 * PAGE
    first = random_file(3 * size)  # the region is the middle third
    first_before = first.read_bytes()
    second = random_file(2 * PAGE + 123, name="second.bin")  # bytes already there must stay
    second_before = second.read_bytes()
    region = pager.map(url(first), size, offset=size, children=url(second), fork_policy=policy,
                       writeback_interval=0)
    view = region.view()
    a = bytearray(b"".join(pattern("A", p) for p in range(N5)))
    view[:] = a
    region.flush()
    assert region.backing() == uffd_pager.region.Backing(url(first), size)

    def child_body(chan: Channel, i: int) -> None:
        v = region.view()
        seen_a = differing_pages(v, a)
        for p in (i, i + 4):
            v[p * PAGE:(p + 1) * PAGE] = pattern(f"child{i}", p)
        region.flush()
        backing = region.backing()
        chan.send(what="done", seen_a=seen_a, url=backing.url, offset=backing.offset)
        chan.recv()

    children = [fork(child_body, i) for i in range(2)]
    results = [child.recv("done") for child in children]
    for p in (2, 3):  # the parent writes after the fork too
        view[p * PAGE:(p + 1) * PAGE] = pattern("late", p)
    region.flush()
    parent_view = with_pages(a, "late", [2, 3])

    offsets = []
    for i, result in enumerate(results):
        assert result["seen_a"] == []
        assert result["url"] == url(second), f"child {i}'s portion is in {result['url']}, not the children file"
        assert result["offset"] >= len(second_before), "a child portion was placed over bytes already there"
        offsets.append(result["offset"])
        expected = with_pages(a, f"child{i}", [i, i + 4])
        assert differing_pages(read_raw(second, result["offset"], size), expected) == [], \
            f"child {i}'s portion in the children file does not hold its view"
    assert abs(offsets[0] - offsets[1]) >= size, f"the children's portions overlap: {offsets}"
    first_after = first.read_bytes()
    assert len(first_after) == len(first_before), "the first file grew: a child portion went there"
    assert first_after[:size] == first_before[:size], "bytes before the region changed"
    assert first_after[2 * size:] == first_before[2 * size:], "bytes beyond the root region changed"
    assert differing_pages(first_after[size:2 * size], parent_view) == []
    assert second.read_bytes()[:len(second_before)] == second_before, "the children file's own bytes changed"
    for child in children:
        child.send(what="exit")
        child.finish()
    del view
    region.close()


# --- 6. exited children leave nothing behind; their portions are reused (or kept) ------------

N6 = 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [False, True], ids=["reuse", "keep"])
@pytest.mark.parametrize("policy", POLICIES)
def test_exited_children_leave_nothing_behind_and_their_portions_are_reused(pager, random_file, fork, policy, keep):
    size = N6 * PAGE
    path = random_file(size)
    region = pager.map(url(path), size, fork_policy=policy, keep_child_portions=keep, writeback_interval=0)
    view = region.view()
    a = bytearray(b"".join(pattern("A", p) for p in range(N6)))
    view[:] = a
    region.flush()
    before = status_subset(pager)
    assert before["portions"] == 1 and before["regions"] == 1

    # A child that never touches the region nor talks to the pager: only the probe finds its exit.
    fork(lambda chan: None).finish()
    wait_for_status(pager, before)

    def child_body(chan: Channel, i: int) -> None:
        v = region.view()
        v[i * PAGE:(i + 1) * PAGE] = pattern(f"child{i}", i)
        v[(N6 - 1) * PAGE:N6 * PAGE]  # a read (a fault on a missing page, or no fault)
        region.flush()
        backing = region.backing()
        chan.send(what="done", url=backing.url, offset=backing.offset)

    offsets = []
    for i in range(3):
        child = fork(child_body, i)
        offsets.append(child.recv("done")["offset"])
        child.finish()
        wait_for_status(pager, before)
    if keep:
        assert len(set(offsets)) == 3, f"keep_child_portions=True: a kept portion was handed out again: {offsets}"
        for i, offset in enumerate(offsets):
            assert differing_pages(read_raw(path, offset, size), with_pages(a, f"child{i}", [i])) == [], \
                f"kept portion of child {i} at {offset} lost its bytes"
    else:
        assert offsets[0] == offsets[1] == offsets[2], f"an exited child's portion was not reused: {offsets}"
        assert differing_pages(read_raw(path, offsets[2], size), with_pages(a, "child2", [2])) == []
    assert differing_pages(read_raw(path, 0, size), a) == []
    del view
    region.close()


# --- 7. multiprocessing with the fork start method -------------------------------------------

N7 = 8
MP_CHILDREN = 4


def _mp_target(region: uffd_pager.Region, index: int, queue: Any) -> None:
    try:
        v = region.view()
        for p in (index, index + MP_CHILDREN):
            v[p * PAGE:(p + 1) * PAGE] = pattern(f"mp{index}", p)
        region.flush()
        backing = region.backing()
        queue.put({"index": index, "url": backing.url, "offset": backing.offset, "view": hashlib.sha256(v).hexdigest()})
    except BaseException:
        queue.put({"index": index, "error": traceback.format_exc()})
        raise


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", POLICIES)
def test_multiprocessing_fork_processes_write_through_the_inherited_region(pager, random_file, policy):
    size = N7 * PAGE
    path = random_file(size)
    # Kept portions: the first processes may exit before the last place theirs.
    region = pager.map(url(path), size, fork_policy=policy, keep_child_portions=True, writeback_interval=0)
    view = region.view()
    a = bytearray(b"".join(pattern("A", p) for p in range(N7)))
    view[:] = a
    region.flush()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_mp_target, args=(region, i, queue)) for i in range(MP_CHILDREN)]
    try:
        for process in processes:
            process.start()
        results = {}
        for _ in processes:
            result = queue.get(timeout=30)
            assert "error" not in result, f"process {result['index']} failed:\n{result['error']}"
            results[result["index"]] = result
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0, f"process {process.pid} exited with {process.exitcode}"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        queue.close()
        queue.join_thread()

    offsets = set()
    for i, result in results.items():
        expected = with_pages(a, f"mp{i}", [i, i + MP_CHILDREN])
        assert result["view"] == hashlib.sha256(expected).hexdigest(), f"process {i}'s view is wrong"
        assert result["url"] == url(path)
        offsets.add(result["offset"])
        assert differing_pages(read_raw(path, result["offset"], size), expected) == [], \
            f"process {i}'s portion at {result['offset']} does not hold its view"
    assert len(offsets) == MP_CHILDREN, "live processes share a portion"
    assert differing_pages(read_raw(path, 0, size), a) == []
    del view
    region.close()


# --- 8. a parent that exits before its child ----------------------------------------------------

# The child process is the "orphan" function of tests/fork_children.py.
FORK_CHILDREN_PY = Path(__file__).with_name("fork_children.py")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_child_outlives_its_parent(random_file, policy, tracking):
    npages = 16
    size = npages * PAGE
    path = random_file(size)
    original = path.read_bytes()
    at_fork = bytearray(original)
    at_fork = with_pages(at_fork, "flushed", range(0, npages, 2))
    at_fork = with_pages(at_fork, "dirty", range(1, npages, 4))
    child_view = with_pages(at_fork, "child", range(3, npages, 4))
    result = subprocess.run(
        [sys.executable, str(FORK_CHILDREN_PY), "orphan", str(path), str(npages), policy, tracking],
        capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2, f"stdout: {result.stdout!r}\nstderr: {result.stderr}"
    pager_pid, report = lines[0]["pager"], lines[1]
    assert "error" not in report, f"the orphaned child failed:\n{report['error']}\n{result.stderr}"
    assert report["seen"] == hashlib.sha256(at_fork).hexdigest(), \
        "after its parent exited, the child does not see the parent's data as of the fork"
    assert report["view"] == hashlib.sha256(child_view).hexdigest()
    assert report["url"] == url(path) and report["offset"] >= size
    assert differing_pages(read_raw(path, report["offset"], size), child_view) == [], \
        "the orphaned child's portion does not hold its view"
    stored_root = read_raw(path, 0, size)
    flushed_view = with_pages(original, "flushed", range(0, npages, 2))
    for p in range(0, npages, 2):
        assert stored_root[p * PAGE:(p + 1) * PAGE] == flushed_view[p * PAGE:(p + 1) * PAGE], \
            f"page {p} the parent flushed changed in the root portion"
    # The private pager exits once its last client and region are gone.
    deadline = time.monotonic() + 10
    while _alive(pager_pid):
        assert time.monotonic() < deadline, f"the pager {pager_pid} is still running after its clients exited"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False
