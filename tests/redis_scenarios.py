"""Client processes for tests/test_redis.py, as importable code.

Run one as ``python redis_scenarios.py NAME ARGS...`` (the plumbing is
tests/child.py: JSON reports on stdout, orders on stdin). Everything that
may block in a fault on a Redis-backed region, get SIGBUS or fork runs
here, in a process of its own with a private pager (whose log goes to this
process's stderr, which the test reads), never in pytest.

Two ways to touch a page:
* `touch`: a plain load, as a program would; a poisoned page is SIGBUS and
  the process dies of it (the test sees "killed by SIGBUS");
* `probe`: the kernel reads the page for a write(2) to a pipe. The fault is
  served by the pager just the same (the syscall waits for it), but a
  poisoned page makes write(2) fail with EFAULT instead of killing the
  process, which can then report its stats and try flush().
"""
from __future__ import annotations

import errno
import hashlib
import os
import select
import threading
import time
from typing import Any

import uffd_pager
from child import Registry, order, report
from pages import differing_pages
from redis_pages import PAGE, ZERO_PAGE, all_pattern, pages_with, pattern

SCENARIOS = Registry()
scenario = SCENARIOS.register

STAT_KEYS = ("fetch_failures", "poisoned", "errors", "last_error", "dirty_pages", "resident_pages",
             "fetched_pages", "writeback_errors", "pending")


def stats_of(region: uffd_pager.Region) -> dict[str, Any]:
    stats = region.stats()
    return {key: stats[key] for key in STAT_KEYS}


def touch(view: memoryview, page: int) -> bytes:
    """The page, read by plain loads (a poisoned page: SIGBUS)."""
    return bytes(view[page * PAGE:(page + 1) * PAGE])


def probe(view: memoryview, page: int, expected: bytes | None = None) -> dict[str, Any]:
    """The page, read by the kernel for write(2): {"ok", "errno", "seconds",
    "zeros", "right"} (see the module's doc)."""
    rfd, wfd = os.pipe()
    started = time.monotonic()
    try:
        try:
            written = os.write(wfd, view[page * PAGE:(page + 1) * PAGE])
        except OSError as exc:
            return {"page": page, "ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    "seconds": time.monotonic() - started}
        data = b""
        while len(data) < written:
            data += os.read(rfd, written - len(data))
        return {"page": page, "ok": True, "written": written, "seconds": time.monotonic() - started,
                "zeros": data == ZERO_PAGE, "right": None if expected is None else data == expected}
    finally:
        os.close(rfd)
        os.close(wfd)


def read_then_dirty(view: memoryview, k: int) -> list[int]:
    """Reads pages [0, k) (pattern "A" expected), then writes pattern "B"
    over them; returns the pages that did not read as expected."""
    wrong = [p for p in range(k) if touch(view, p) != pattern("A", p)]
    for p in range(k):
        view[p * PAGE:(p + 1) * PAGE] = pattern("B", p)
    return wrong


def attempt(work: Any) -> dict[str, Any]:
    """Runs work(): {"raised": False, "result": ...} or {"raised": True, "type", "message"}."""
    started = time.monotonic()
    try:
        result = work()
    except Exception as exc:
        return {"raised": True, "type": type(exc).__name__, "message": str(exc),
                "errno": getattr(exc, "errno", None), "seconds": time.monotonic() - started,
                "bases": [c.__name__ for c in type(exc).__mro__]}
    return {"raised": False, "result": result, "seconds": time.monotonic() - started}


# --- 1. fork over Redis (and across stores) --------------------------------------------------

# 64 pages, 4 chunks. Pages 0..31 are resident in the parent at fork, 32..63 missing.
FORK_PAGES = 64
CHILD_PAGES = [1, 2, 17, 33, 40, 63]  # written by the child: 1, 2, 17 resident at fork, the rest missing
PARENT_PAGES = [2, 3, 33, 34, 50, 62]  # written by the parent after the fork: 2 and 33 by both
CHILD_EARLY = 16  # pages the child reads before the parent writes back its own


def _send(fd: int, word: str) -> None:
    os.write(fd, word.encode() + b"\n")


def _receive(fd: int, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise TimeoutError(f"nothing on the pipe for {timeout} s")
    data = os.read(fd, 64)
    if not data:
        raise EOFError("the other process closed the pipe")
    return data.decode().strip()


def _wait_pid(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child {pid} did not exit within {timeout} s")
        time.sleep(0.01)


@scenario("fork-portions")
def fork_portions(store: str, children: str, policy: str) -> None:
    """The parent maps `store` (holding pattern "A" on every page), reads
    half of it, forks; the child reads a quarter, writes CHILD_PAGES ("B");
    the parent writes PARENT_PAGES ("C") and flushes; then the child reads
    everything, flushes, and reports where its portion is, and waits for
    "exit" on stdin, so that the test can read its portion on the server.
    Then the parent reports the portions left once the child is gone."""
    size = FORK_PAGES * PAGE
    a = all_pattern("A", FORK_PAGES)
    child_model = pages_with(a, "B", CHILD_PAGES)
    parent_model = pages_with(a, "C", PARENT_PAGES)
    pager = uffd_pager.Pager()
    region = pager.map(store, size, fork_policy=policy, children=None if children == "-" else children,
                       writeback_interval=0)
    view = region.view()
    half = FORK_PAGES // 2
    resident_differs = differing_pages(view[:half * PAGE], a[:half * PAGE])
    report("mapped", resident_differs=resident_differs, portions=pager.status()["portions"])
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            v = region.view()
            early = differing_pages(v[:CHILD_EARLY * PAGE], a[:CHILD_EARLY * PAGE])
            for p in CHILD_PAGES:
                v[p * PAGE:(p + 1) * PAGE] = pattern("B", p)
            _send(to_parent_w, "written")
            assert _receive(to_child_r) == "go"
            differs = differing_pages(v, child_model)
            flushed = region.flush()
            backing = region.backing()
            report("child", early_differs=early, differs=differs, pages=flushed["pages"],
                   url=backing.url if backing else None, offset=backing.offset if backing else None,
                   differs_after_flush=differing_pages(v, child_model), fork=region.stats()["fork"],
                   stats=stats_of(region))
            del v
            assert order(eof_error=True) == "exit"
            code = 0
        except BaseException:
            import traceback
            report("error", traceback=traceback.format_exc())
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    assert _receive(to_parent_r) == "written"
    for p in PARENT_PAGES:
        view[p * PAGE:(p + 1) * PAGE] = pattern("C", p)
    flushed = region.flush()
    _send(to_child_w, "go")
    backing = region.backing()
    report("parent", pages=flushed["pages"], differs=differing_pages(view, parent_model),
           url=backing.url, offset=backing.offset, fork=region.stats()["fork"], portions=pager.status()["portions"])
    code = _wait_pid(pid, 60)
    deadline = time.monotonic() + 10
    while pager.status()["portions"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    report("child-exited", code=code, portions=pager.status()["portions"],
           differs=differing_pages(view, parent_model))
    del view
    region.close()
    pager.close()


# --- 2. a server killed while the client faults ---------------------------------------------


@scenario("read-through-outage")
def read_through_outage(url: str, npages: str, delay: str) -> None:
    """Reads every page of `url` (pattern "A") one after the other, by plain
    loads, `delay` s apart, reporting each ("read") and any that is wrong,
    then "done". Whatever the server does meanwhile: a page is right, or the
    process waits, or dies of SIGBUS."""
    n, pause = int(npages), float(delay)
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0)
    view = region.view()
    report("mapped", pager=pager.pid)
    wrong = []
    for p in range(n):
        data = touch(view, p)
        if data != pattern("A", p):
            wrong.append({"page": p, "zeros": data == ZERO_PAGE})
            report("wrong", page=p, zeros=data == ZERO_PAGE, sha=hashlib.sha256(data).hexdigest())
        report("read", page=p)
        time.sleep(pause)
    report("done", wrong=wrong, stats=stats_of(region))
    del view
    region.close()
    pager.close()


@scenario("flush-across-outage")
def flush_across_outage(url: str, npages: str, dirty: str, probe_page: str) -> None:
    """Maps `url` (pattern "A"), writes pattern "B" over pages [0, dirty)
    (read first: resident, then dirty), reports "ready"; on "down" (the
    server is dead) probes a page never fetched, tries flush(), reports;
    on "up" (the server is back) flushes again and reports; on "close"
    closes. The test checks the server's bytes in between."""
    n, k, probed = int(npages), int(dirty), int(probe_page)
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0)
    view = region.view()
    before = read_then_dirty(view, k)
    report("ready", wrong_before=before, stats=stats_of(region))
    assert order(eof_error=True) == "down"
    probed_result = probe(view, probed, pattern("A", probed))
    stats_after_probe = stats_of(region)
    flush = attempt(region.flush)
    report("down", probe=probed_result, stats_after_probe=stats_after_probe, flush=flush,
           stats_after_flush=stats_of(region))
    assert order(eof_error=True) == "up"
    flush = attempt(region.flush)
    again = attempt(region.flush)
    model = pages_with(all_pattern("A", n), "B", range(k))
    # The probed page was poisoned while the server was down: it stays
    # unreadable (never zeros); every other page reads right.
    readable = [p for p in range(n) if p != probed]
    wrong = [p for p in readable if touch(view, p) != model[p * PAGE:(p + 1) * PAGE]]
    report("up", flush=flush, again=again, stats=stats_of(region), wrong=wrong)
    assert order(eof_error=True) == "close"
    del view
    report("closed", close=attempt(region.close))
    pager.close()


# --- 3. a server that lost its memory while the region is mapped --------------------------------


@scenario("lost-while-mapped")
def lost_while_mapped(url: str, npages: str, dirty: str, probe_page: str, touch_page: str) -> None:
    """Maps `url` (pattern "A"), reads and then dirties pages [0, dirty),
    reports "ready"; on "lost" (the server came back empty) probes a page
    never fetched, tries flush(), reports "after"; on "touch", loads
    `touch_page` (never fetched): SIGBUS, or a report of what it read."""
    n, k = int(npages), int(dirty)
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0)
    view = region.view()
    before = read_then_dirty(view, k)
    report("ready", wrong_before=before)
    assert order(eof_error=True) == "lost"
    probed = probe(view, int(probe_page), pattern("A", int(probe_page)))
    stats_after_probe = stats_of(region)
    flush = attempt(region.flush)
    resident_ok = [p for p in range(k) if touch(view, p) == pattern("B", p)]
    report("after", probe=probed, stats_after_probe=stats_after_probe, flush=flush,
           stats_after_flush=stats_of(region), resident_ok=resident_ok)
    assert order(eof_error=True) == "touch"
    data = touch(view, int(touch_page))
    report("touched", zeros=data == ZERO_PAGE, right=data == pattern("A", int(touch_page)))


# --- 4. values of the wrong length ------------------------------------------------------------


@scenario("bad-values")
def bad_values(url: str, npages: str, bad: str) -> None:
    """Maps `url` (pattern "A" but the `bad` pages, comma-separated, which
    the test replaced by values of the wrong length); probes every page,
    reports; then loads the first bad page (SIGBUS, or a report)."""
    n = int(npages)
    bad_pages = [int(p) for p in bad.split(",")]
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0)
    view = region.view()
    # All at once (write(2) lets go of the GIL): the faults of one chunk go
    # to the server as one read, the bad values beside good ones.
    probes: list[Any] = [None] * n

    def probe_into(p: int) -> None:
        probes[p] = probe(view, p, pattern("A", p))

    threads = [threading.Thread(target=probe_into, args=(p,)) for p in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    report("probed", probes=probes, stats=stats_of(region))
    data = touch(view, bad_pages[0])
    report("touched", zeros=data == ZERO_PAGE)


# --- 4b. encrypted over Redis -------------------------------------------------------------------------


@scenario("encrypted-write")
def encrypted_write(url: str, npages: str, key_file: str, tag: str, pages: str) -> None:
    """Writes pattern `tag` over `pages` (comma-separated, or "all") of an
    encrypted region over `url`, flushes, closes; reports what flush wrote."""
    n = int(npages)
    chosen = range(n) if pages == "all" else [int(p) for p in pages.split(",")]
    with uffd_pager.Pager() as pager, pager.map(url, n * PAGE, key_file=key_file, writeback_interval=0) as region:
        view = region.view()
        for p in chosen:
            view[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)
        flushed = region.flush()
        del view
    report("written", pages=flushed["pages"])


@scenario("encrypted-probe")
def encrypted_probe(url: str, npages: str, key_file: str, tag: str) -> None:
    """Probes every page of an encrypted region over `url` against pattern
    `tag` (a page that fails authentication: EFAULT, never data)."""
    n = int(npages)
    with uffd_pager.Pager() as pager, pager.map(url, n * PAGE, key_file=key_file, writeback_interval=0) as region:
        view = region.view()
        report("probed", probes=[probe(view, p, pattern(tag, p)) for p in range(n)], stats=stats_of(region),
               auth_failures=region.stats()["auth_failures"])
        del view


# --- 5. map and read, whatever happens ----------------------------------------------------------


@scenario("map-and-probe")
def map_and_probe(url: str, npages: str, pages: str) -> None:
    """map() of `url`: "map-error" with what it raised, or "mapped" and then
    a probe of each of `pages` (comma-separated) against pattern "A"."""
    n = int(npages)
    pager = uffd_pager.Pager()
    mapped = attempt(lambda: pager.map(url, n * PAGE, writeback_interval=0))
    if mapped["raised"]:
        report("map-error", **mapped)
        pager.close()
        return
    region = mapped.pop("result")
    view = region.view()
    report("mapped", **mapped)
    probes = [probe(view, int(p), pattern("A", int(p))) for p in pages.split(",")]
    report("probed", probes=probes, stats=stats_of(region))
    del view
    region.close()
    pager.close()


# --- 6. the C fault path (native/remote.c) ------------------------------------------------------


def wait_for_native(pager: uffd_pager.Pager, timeout: float = 10.0) -> dict[str, Any]:
    """The pager's fetch counters once its C path has a connection up (it is
    made in the background when the store opens)."""
    deadline = time.monotonic() + timeout
    while True:
        fetches = pager.status()["fetches"]
        if fetches["native_connections"] or time.monotonic() > deadline:
            return fetches
        time.sleep(0.01)


@scenario("native-client-dies")
def native_client_dies(url: str, npages: str) -> None:
    """Maps `url` (pattern "A"), reports "ready" once the C path is up and
    waits for an order (the test stops the server); a forked child touches
    page 1, whose request is then in flight, and is killed ("killed", with
    the fetch counters); at the next order (the server runs again) every
    page is read here and compared ("read", with the counters)."""
    n = int(npages)
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0, read_ahead="off")
    view = region.view()
    report("ready", fetches=wait_for_native(pager))
    order()
    child = os.fork()
    if child == 0:
        touch(view, 1)
        os._exit(0)
    time.sleep(0.5)
    in_flight = pager.status()["fetches"]
    os.kill(child, 9)
    code = _wait_pid(child, 10)
    report("killed", code=code, fetches=in_flight)
    order()
    wrong = [p for p in range(n) if touch(view, p) != pattern("A", p)]
    report("read", wrong=wrong, fetches=pager.status()["fetches"], internal_errors=pager.status()["internal_errors"])
    del view
    region.close()
    pager.close()


@scenario("native-late-reply")
def native_late_reply(url: str, npages: str, page: str) -> None:
    """Maps `url` (pattern "A"), reports "ready" once the C path is up and
    waits for an order (the test stops the server for longer than the URL's
    timeout, then lets it go on); touches `page` (its request on the C path
    is late: handed back to the fetch path, which waits for the server
    within the deadline) and reports whether it is right ("read")."""
    n, k = int(npages), int(page)
    pager = uffd_pager.Pager()
    region = pager.map(url, n * PAGE, writeback_interval=0, read_ahead="off")
    view = region.view()
    report("ready", fetches=wait_for_native(pager))
    order()
    started = time.monotonic()
    data = touch(view, k)
    report("read", right=data == pattern("A", k), zeros=data == ZERO_PAGE, seconds=time.monotonic() - started,
           fetches=pager.status()["fetches"], stats=stats_of(region))
    del view
    region.close()
    pager.close()


if __name__ == "__main__":
    SCENARIOS.main()
