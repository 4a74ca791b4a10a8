"""Client processes for tests/test_defects.py, as importable code.

Run one as ``python scenarios.py NAME ARGS...``. A scenario reports on
stdout, one JSON object a line, each with a "what" key; a scenario that
takes orders reads them from stdin, one word a line (the plumbing, shared
with tests/hostile_clients.py, is tests/child.py). Every line is written
with os.write, so that nothing sits in a buffer across fork() or os._exit.

Whatever may block in a page fault or in fork() runs here, in a process of
its own that the test waits for with a timeout and then kills (its whole
session: the private pager and any forked children too), never in pytest.
A scenario returns into `SCENARIOS.main`, which ends the process with os._exit(0),
unless it is registered with ``normal_exit=True``: those test the
interpreter's own way out.
"""
from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import random
import resource
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

import uffd_pager
from child import Registry, order, report
from pages import differing_pages

PAGE = uffd_pager.PAGE_SIZE
FILL = b"\xab" * PAGE  # every page of the file child-after-pager-death maps

SCENARIOS = Registry()
scenario = SCENARIOS.register


# --- ending ------------------------------------------------------------------------------


def verdict_reported() -> NoReturn:
    """Ends the process once a scenario has reported what went wrong: a
    thread of it may be stuck in a fault for good, which os._exit does not mind."""
    os._exit(0)


def in_forked_child(body: Callable[[], None]) -> NoReturn:
    """The whole life of a forked child: never returns into the caller."""
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        report("error", traceback=traceback.format_exc())
    finally:
        os._exit(code)


# --- bytes ---------------------------------------------------------------------------


def url(path: str) -> str:
    return f"file://{path}"


def pattern(tag: str, page: int) -> bytes:
    """A page of bytes naming its tag and page."""
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def read_file(path: str, offset: int = 0, size: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if size is None else f.read(size)
    return data if size is None else data.ljust(size, b"\0")


def zero_pages(data: bytes, limit: int = 20) -> list[int]:
    zeros = bytes(PAGE)
    return [p for p in range(len(data) // PAGE) if data[p * PAGE:(p + 1) * PAGE] == zeros][:limit]


# --- processes -----------------------------------------------------------------------


def describe_status(status: int) -> str:
    """A waitpid status in words: "exit 0", "killed by SIGBUS"."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def wait_child(pid: int, timeout: float) -> str | None:
    """The child's end in words, or None if it is still running after
    `timeout` s (then it is killed and reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return describe_status(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.0005)


def proc_state(pid: int) -> str:
    """The process's state letter ("R", "S", "Z", ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def is_dead(pid: int) -> bool:
    """Whether the process has exited (a zombie not yet reaped counts)."""
    return proc_state(pid) in ("Z", "X", "gone")


def pager_death(pid: int) -> str | None:
    """None while the pager runs; else how it ended ("killed by SIGSEGV",
    left unreaped when it is this process's child)."""
    if not is_dead(pid):
        return None
    deadline = time.monotonic() + 2
    while True:  # a zombie leader is waitable once its last thread is gone
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "exited (not our child)"
        if info is not None:
            break
        if time.monotonic() > deadline:
            return "exiting (its threads still ending after 2 s)"
        time.sleep(0.01)
    if info.si_code == os.CLD_EXITED:
        return f"exit {info.si_status}"
    return f"killed by {signal.Signals(info.si_status).name}"


def kill_pager(pid: int) -> None:
    """SIGKILL, then wait until it is dead (a zombie of ours, or gone)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not is_dead(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"the pager {pid} survived SIGKILL for 10 s")
        time.sleep(0.005)


def pager_serves(pager: uffd_pager.Pager) -> str | None:
    """None if the pager runs and answers status(); else what is wrong
    (how it died, if it did)."""
    death = pager_death(pager.pid)
    if death is None:
        try:
            pager.status()
            return None
        except Exception as exc:
            problem = f"the pager {pager.pid} does not answer status(): {type(exc).__name__}: {exc}"
        deadline = time.monotonic() + 2
        while (death := pager_death(pager.pid)) is None:
            if time.monotonic() > deadline:
                return problem
            time.sleep(0.01)
    return f"the pager {pager.pid} died: {death}"


def threads_where() -> dict[str, str]:
    """Where each thread of this process sleeps in the kernel."""
    where = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/wchan") as f:
                where[tid] = f.read() or "(running)"
        except OSError:
            pass
    return where


def raise_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connect(path: str, timeout: float) -> uffd_pager.Pager:
    """connect(path, timeout=...), or plain connect(path) if there is no such keyword yet."""
    try:
        return uffd_pager.connect(path, timeout=timeout)
    except TypeError:
        return uffd_pager.connect(path)


def error_fields(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "errno": getattr(exc, "errno", None), "message": str(exc)}


# --- 1. a fault taken while another thread forks ---------------------------------------

@scenario("fault-during-fork")
def fault_during_fork(path: str, policy: str, tracking: str, iterations: str, pages: str) -> None:
    """A thread first-touches `pages` pages with one ctypes.memmove (no GIL)
    while the main thread forks a child that exits at once; `iterations`
    times, over fresh pages each time. One fork an iteration: a later event
    on the uffd would prompt the pager to retry a fault it had put off."""
    iterations_, pages_ = int(iterations), int(pages)
    chunk = pages_ * PAGE
    size = iterations_ * chunk
    expected = read_file(path, 0, size)
    pager = uffd_pager.Pager()
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    buffer = ctypes.create_string_buffer(chunk)
    forks, wrong = 0, []
    started = time.monotonic()
    for i in range(iterations_):
        touching = threading.Event()

        def first_touch(start: int = region.address + i * chunk) -> None:
            touching.set()
            ctypes.memmove(buffer, start, chunk)

        reader = threading.Thread(target=first_touch, daemon=True)
        reader.start()
        touching.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forks += 1
        reader.join(timeout=5)
        if reader.is_alive():
            report("hung", iteration=i, forks=forks, pending=region.stats()["pending"], threads=threads_where())
            verdict_reported()
        if buffer.raw != expected[i * chunk:(i + 1) * chunk]:
            got = buffer.raw
            wrong.append({"iteration": i, "pages": differing_pages(got, expected[i * chunk:(i + 1) * chunk]),
                          "zero_pages": zero_pages(got)})
    elapsed = time.monotonic() - started
    view = region.view()
    whole = differing_pages(bytes(view), expected)
    del view
    report("done", iterations=iterations_, forks=forks, seconds=round(elapsed, 2), wrong=wrong[:10],
           wrong_iterations=len(wrong), whole_region_differs=whole, pending=region.stats()["pending"],
           pager_problem=pager_serves(pager))
    region.close()
    pager.close()


# --- 2. fork() racing map() and close() --------------------------------------------------

MAP_PAGES = 4


def map_touch_close_loop(pager: uffd_pager.Pager, path: str, iterations: int, progress: dict[str, Any]) -> None:
    """map, first-touch every page (ctypes.memmove: no GIL), check, close;
    over the file's slots in turn."""
    expected = read_file(path)
    chunk = MAP_PAGES * PAGE
    slots = len(expected) // chunk
    buffer = ctypes.create_string_buffer(chunk)
    try:
        for i in range(iterations):
            offset = (i % slots) * chunk
            region = pager.map(url(path), chunk, offset, writeback_interval=0)
            ctypes.memmove(buffer, region.address, chunk)
            want = expected[offset:offset + chunk]
            if buffer.raw != want:
                progress["wrong"].append({"iteration": i, "pages": differing_pages(buffer.raw, want),
                                          "zero_pages": zero_pages(buffer.raw)})
            region.close()
            progress["done"] = i + 1
            if (i + 1) % 50 == 0:
                report("progress", iterations=i + 1, forks=progress["forks"])
    except BaseException:
        progress["error"] = traceback.format_exc()


@scenario("fork-during-map-and-close")
def fork_during_map_and_close(path: str, iterations: str) -> None:
    """A thread maps, touches and closes regions while the main thread forks
    children that exit at once."""
    pager = uffd_pager.Pager()
    progress: dict[str, Any] = {"done": 0, "forks": 0, "wrong": []}
    worker = threading.Thread(target=map_touch_close_loop, args=(pager, path, int(iterations), progress), daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        progress["forks"] += 1
    report("done", seconds=round(time.monotonic() - started, 2), **progress, pager_problem=pager_serves(pager))
    pager.close()


@scenario("pool-during-map-and-close")
def pool_during_map_and_close(path: str, iterations: str) -> None:
    """A thread maps, touches and closes regions while a fork-context
    multiprocessing Pool replaces a worker after every task."""
    pager = uffd_pager.Pager()
    progress: dict[str, Any] = {"done": 0, "forks": 0, "wrong": []}
    worker = threading.Thread(target=map_touch_close_loop, args=(pager, path, int(iterations), progress), daemon=True)
    started = time.monotonic()
    pool = multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1)
    try:
        worker.start()
        while worker.is_alive():
            pool.apply_async(os.getpid).get(timeout=20)
            progress["forks"] += 1  # each task ran in a new worker
        pool.close()
        pool.join()
    finally:
        pool.terminate()
    report("done", seconds=round(time.monotonic() - started, 2), **progress, pager_problem=pager_serves(pager))
    pager.close()


# --- 3. a forked child killed during its flush ----------------------------------------------

FLUSH_PAGES = 32


def write_and_flush_forever(region: uffd_pager.Region, ready_w: int) -> None:
    """A forked child's loop: write half the pages, flush, again."""
    v = region.view()
    for n in range(1 << 30):
        for p in range(0, FLUSH_PAGES, 2):
            v[p * PAGE:(p + 1) * PAGE] = pattern(f"child{n}", p)
        region.flush()
        if n == 0:
            os.write(ready_w, b"s")  # adopted by the pager, flushing in a loop


@scenario("kill-child-during-flush")
def kill_child_during_flush(path: str, policy: str, tracking: str, rounds: str, per_round: str, seed: str) -> None:
    """Each round forks `per_round` children that write and flush in a loop,
    and SIGKILLs them one by one, 0-3 ms apart, once all of them flush;
    after each round the pager must still run and answer."""
    rng = random.Random(int(seed))
    size = FLUSH_PAGES * PAGE
    pager = uffd_pager.Pager()
    region = pager.map(url(path), size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    parent_data = b"".join(pattern("parent", p) for p in range(FLUSH_PAGES))
    view[:] = parent_data
    region.flush()
    started = time.monotonic()
    kills = 0
    for i in range(int(rounds)):
        children = []
        for _ in range(int(per_round)):
            ready_r, ready_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                in_forked_child(lambda: write_and_flush_forever(region, ready_w))
            os.close(ready_w)
            children.append((pid, ready_r))
        started_flushing = True
        for pid, ready_r in children:
            ready, _, _ = select.select([ready_r], [], [], 10)
            started_flushing = started_flushing and bool(ready) and os.read(ready_r, 1) == b"s"
            os.close(ready_r)
        ends = []
        for pid, _ in children:
            time.sleep(rng.uniform(0, 0.003))
            os.kill(pid, signal.SIGKILL)
            kills += 1
        for pid, _ in children:
            ends.append(wait_child(pid, 10))
        problem = pager_serves(pager)
        if problem is not None or not started_flushing:
            report("pager-lost", round=i, kills=kills, problem=problem, children_flushed=started_flushing,
                   children_ends=ends)
            verdict_reported()
    elapsed = time.monotonic() - started
    view_differs = differing_pages(bytes(view), parent_data)
    for p in range(1, FLUSH_PAGES, 2):
        view[p * PAGE:(p + 1) * PAGE] = pattern("parent-after", p)
    final = bytes(view)
    flushed = region.flush()
    file_differs = differing_pages(read_file(path, 0, size), final)
    report("done", kills=kills, seconds=round(elapsed, 2), view_differs=view_differs,
           flushed_pages=flushed["pages"], file_differs=file_differs, pager_problem=pager_serves(pager))
    del view
    region.close()
    pager.close()


# --- 4. a forked child whose pager died ------------------------------------------------------

PARENT_TOUCHED = range(0, 4)  # resident in the parent before the fork
CHILD_TOUCHED = 20  # faulted by the child (or grandchild) itself
MIDDLE_TOUCHED = 30  # faulted by the child before it forks the grandchild
NEVER_TOUCHED = 40


@scenario("child-after-pager-death")
def child_after_pager_death(path: str, generation: str) -> None:
    """Parent maps a file of 0xab bytes and forks; the child (or its own
    child) touches a few pages, says "ready", and waits for "touch"; the
    test kills the pager in between. Then it re-reads what it touched and
    touches a page no one touched."""
    size = os.path.getsize(path)
    pager = uffd_pager.Pager(restarts=0)  # killed for good: no successor takes over
    region = pager.map(url(path), size, writeback_interval=0)
    view = region.view()
    parent_ok = all(bytes(view[p * PAGE:(p + 1) * PAGE]) == FILL for p in PARENT_TOUCHED)
    report("mapped", pager=pager.pid, parent_ok=parent_ok)
    pid = os.fork()
    if pid == 0:
        in_forked_child(lambda: descendant(region, generation))
    _, status = os.waitpid(pid, 0)  # the test kills the session if it blocks for good
    report("exited", who="child", end=describe_status(status))


def descendant(region: uffd_pager.Region, generation: str) -> None:
    view = region.view()
    touched = [*PARENT_TOUCHED, CHILD_TOUCHED]
    if generation == "grandchild":
        view[MIDDLE_TOUCHED * PAGE]  # faulted through the child's own uffd
        touched.append(MIDDLE_TOUCHED)
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            report("exited", who="grandchild", end=describe_status(status))
            return
    view[CHILD_TOUCHED * PAGE]

    def wrong(pages: list[int]) -> list[int]:
        return [p for p in pages if bytes(view[p * PAGE:(p + 1) * PAGE]) != FILL]

    report("ready", touched=touched, wrong=wrong(touched))
    assert order(eof_error=True) == "touch"
    report("resident", touched=touched, wrong=wrong(touched))
    try:
        data = bytes(view[NEVER_TOUCHED * PAGE:(NEVER_TOUCHED + 1) * PAGE])
    except BaseException as exc:
        report("raised", **error_fields(exc))
        return
    report("touched", page=NEVER_TOUCHED, zeros=data == bytes(PAGE), same=data == FILL, first_byte=data[0])


# --- 5. a region whose pager died -------------------------------------------------------------

WRITTEN = 10  # pages written before the pager dies
READ_ONLY = (10, 11)  # pages read (resident, clean) before the pager dies


def written_data() -> bytes:
    return b"".join(pattern("written", p) for p in range(WRITTEN))


def try_call(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except BaseException as exc:
        return {"raised": True, "pager_gone": isinstance(exc, uffd_pager.PagerGone), **error_fields(exc)}
    return {"raised": False, "pager_gone": False}


@scenario("close-after-pager-death")
def close_after_pager_death(path: str, tracking: str) -> None:
    """Write 10 pages, read 2, kill the pager; then flush() and close()."""
    npages = os.path.getsize(path) // PAGE
    original = read_file(path, 0, npages * PAGE)
    pager = uffd_pager.Pager(restarts=0)  # killed for good: no successor takes over
    region = pager.map(url(path), npages * PAGE, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    view[:WRITTEN * PAGE] = written_data()

    def read_only_wrong() -> list[int]:
        return [p for p in READ_ONLY if bytes(view[p * PAGE:(p + 1) * PAGE]) != original[p * PAGE:(p + 1) * PAGE]]

    read_only_before = read_only_wrong()
    kill_pager(pager.pid)
    flush = try_call(region.flush)
    close = try_call(region.close)
    result: dict[str, Any] = {"flush": flush, "close": close, "closed": region.closed,
                              "read_only_wrong_before": read_only_before}
    if not region.closed:  # a closed region's old views fault with SIGSEGV: never read them
        result["written_differs"] = differing_pages(bytes(view[:WRITTEN * PAGE]), written_data())
        result["read_only_differs"] = read_only_wrong()
    report("result", **result)


@scenario("close-with-blocked-thread")
def close_with_blocked_thread(path: str, trials: str, seed: str) -> None:
    """Each trial: a private pager, a region over the file with 10 pages
    written, and a daemon thread first-touching the other pages one by one
    (ctypes.memmove, 1 ms apart) when the pager is killed, 0-10 ms after the
    thread started; it blocks on the first page no one serves. Then close(),
    and the thread must stay blocked."""
    rng = random.Random(int(seed))
    npages = os.path.getsize(path) // PAGE
    expected = read_file(path, 0, npages * PAGE)
    kept = []  # every trial's pager, region and view stay referenced: no munmap under a blocked thread
    for trial in range(int(trials)):
        pager = uffd_pager.Pager(restarts=0)  # killed for good: no successor takes over
        region = pager.map(url(path), npages * PAGE, writeback_interval=0)
        view = region.view()
        view[:WRITTEN * PAGE] = written_data()
        progress = {"read": 0, "wrong": []}

        def first_touch_the_rest(address: int = region.address, progress: dict[str, Any] = progress) -> None:
            buffer = ctypes.create_string_buffer(PAGE)
            for p in range(WRITTEN, npages):
                ctypes.memmove(buffer, address + p * PAGE, PAGE)
                if buffer.raw != expected[p * PAGE:(p + 1) * PAGE]:
                    progress["wrong"].append({"page": p, "zeros": buffer.raw == bytes(PAGE)})
                progress["read"] += 1
                time.sleep(0.001)

        reader = threading.Thread(target=first_touch_the_rest, daemon=True)
        reader.start()
        time.sleep(rng.uniform(0, 0.01))
        kill_pager(pager.pid)
        read_at_kill = settled(progress)
        close = try_call(region.close)
        time.sleep(0.2)
        result: dict[str, Any] = {"trial": trial, "read_at_kill": read_at_kill, "close": close,
                                  "closed": region.closed, "reader_alive": reader.is_alive(),
                                  "read_after_close": progress["read"], "wrong": progress["wrong"]}
        if not region.closed:
            result["written_differs"] = differing_pages(bytes(view[:WRITTEN * PAGE]), written_data())
        report("trial", **result)
        kept.append((pager, region, view, reader))
    report("done", trials=int(trials))


def settled(progress: dict[str, Any], quiet: float = 0.15) -> int:
    """progress["read"] once it has not moved for `quiet` s."""
    last, since = progress["read"], time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.01)
        if progress["read"] != last:
            last, since = progress["read"], time.monotonic()
    return last


_kept_until_exit: list[Any] = []
STUCK_PAGES = 2048  # first-touched by one memmove: woken, it would run on for milliseconds


@scenario("exit-with-stuck-thread", normal_exit=True)
def exit_with_stuck_thread(path: str, how: str) -> None:
    """A daemon thread is stuck in a fault of a region whose pager is dead
    (one memmove over many missing pages); then the process exits: `how` is
    "close-then-sys-exit" (close() fails and is caught), "sys-exit" or
    "end-of-script" (the region left open, referenced until the
    interpreter's exit)."""
    pager = uffd_pager.Pager(restarts=0)  # killed for good: no successor takes over
    region = pager.map(url(path), (WRITTEN + STUCK_PAGES) * PAGE, writeback_interval=0)
    view = region.view()
    view[:WRITTEN * PAGE] = written_data()
    kill_pager(pager.pid)
    buffer = ctypes.create_string_buffer(STUCK_PAGES * PAGE)
    stuck = threading.Thread(target=ctypes.memmove, args=(buffer, region.address + WRITTEN * PAGE, STUCK_PAGES * PAGE),
                             daemon=True)
    stuck.start()
    stuck.join(0.3)
    report("stuck", alive=stuck.is_alive())
    _kept_until_exit.extend([pager, region, view, buffer, stuck])
    if how == "close-then-sys-exit":
        report("close", **try_call(region.close))
    if how in ("close-then-sys-exit", "sys-exit"):
        sys.exit(0)
    assert how == "end-of-script", how


# --- 7. descriptor limits ----------------------------------------------------------------


def map_pages(pager: uffd_pager.Pager, path: str, expected: bytes,
              limit: int) -> tuple[list[uffd_pager.Region], dict[str, Any] | None, list[int]]:
    """(regions, failure, wrong): up to `limit` one-page regions of the file
    (`expected`: its bytes), over its pages in turn, until map() fails (then
    `failure` says how); `wrong`, the first 20 regions that do not read as
    their page of the file."""
    slots = len(expected) // PAGE
    regions, failure = [], None
    for i in range(limit):
        try:
            regions.append(pager.map(url(path), PAGE, (i % slots) * PAGE, writeback_interval=0))
        except Exception as exc:
            failure = {"index": i, "is_oserror": isinstance(exc, OSError), **error_fields(exc)}
            break
    wrong = [i for i, region in enumerate(regions)
             if ctypes.string_at(region.address, PAGE) != expected[(i % slots) * PAGE:((i % slots) + 1) * PAGE]]
    return regions, failure, wrong[:20]


def close_all(pager: uffd_pager.Pager, regions: list[uffd_pager.Region]) -> None:
    """Closes the regions, then the pager, and reports "closed"."""
    for region in regions:
        region.close()
    pager.close()
    report("closed", closed=len(regions))


@scenario("map-many")
def map_many(socket_path: str, path: str, count: str) -> None:
    """Connects to the daemon and maps `count` one-page regions at once,
    reads each; a failure (of connect() too) is reported, not raised."""
    raise_descriptor_limit()
    expected = read_file(path)
    try:
        pager = connect(socket_path, timeout=20)
    except Exception as exc:
        report("mapped", mapped=0, failure={"index": "connect", "is_oserror": isinstance(exc, OSError),
                                           **error_fields(exc)}, wrong=[], daemon_regions=None)
        return
    regions, failure, wrong = map_pages(pager, path, expected, int(count))
    try:
        daemon_regions = pager.status()["regions"]
    except Exception:
        daemon_regions = None
    report("mapped", mapped=len(regions), failure=failure, wrong=wrong, daemon_regions=daemon_regions)
    close_all(pager, regions)


@scenario("map-until-failure")
def map_until_failure(socket_path: str, path: str, limit: str) -> None:
    """Maps one-page regions of the daemon until map() fails (or `limit`),
    reads each, reports, and closes them all on the order "close"."""
    raise_descriptor_limit()
    expected = read_file(path)
    pager = connect(socket_path, timeout=10)
    regions, failure, wrong = map_pages(pager, path, expected, int(limit))
    report("failed", mapped=len(regions), failure=failure, wrong=wrong)
    assert order(eof_error=True) == "close"
    close_all(pager, regions)


if __name__ == "__main__":
    SCENARIOS.main()
