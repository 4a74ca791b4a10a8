"""Write-back: what a program writes into a region reaches the store on
flush(), on close() and on the timer; exactly the pages written, however many
threads write and however the writes race the flushes; a flush that returned
survives the client's death; a full disk raises ENOSPC and loses nothing; and
the program's own madvise(MADV_DONTNEED), mremap and munmap of the region
behave as they would on a MAP_PRIVATE mapping of the file.

Scenarios that move or cut the mapping under the pager (or kill a client) run
in a subprocess: if the pager failed to follow, a fault could block forever or
kill the process, and only a subprocess can be waited for with a timeout.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import uffd_pager
from pages import differing_pages

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
MODES = ("async", "sync")
# The child processes, one function each (run as `python writeback_children.py NAME ARGS...`).
CHILDREN_PY = Path(__file__).with_name("writeback_children.py")


def url(path: Path | str) -> str:
    return f"file://{path}"


def pattern(tag: str, page: int) -> bytes:
    """A page of bytes that names its tag and page (the same in every process)."""
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def run_threads(target, count: int) -> None:
    """Runs target(0) ... target(count - 1) in threads; re-raises the first failure."""
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def run_child(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs ``python writeback_children.py NAME ARGS...`` to its end."""
    return subprocess.run([sys.executable, str(CHILDREN_PY), name, *args], capture_output=True, text=True,
                          timeout=timeout)


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# --- 1. concurrent writers, then a new process sees exactly the model -------------------



@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_four_writer_threads_then_flush_a_new_process_sees_exactly_the_model(pager, random_file, mode):
    size, offset = 64 * MiB, 4 * MiB
    path = random_file(72 * MiB)
    original = path.read_bytes()
    region = pager.map(url(path), size, offset=offset, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    npages = size // PAGE
    rng = random.Random(f"writers-{mode}")
    written = rng.sample(range(npages), 4 * 500)
    # Some pages are read before they are written (a write-protect fault under
    # "sync"), the others are first touched by the write (a missing fault);
    # some pages are only read.
    for page in written[::2] + rng.sample(range(npages), 300):
        view[page * PAGE + rng.randrange(PAGE)]
    per_thread = [written[i::4] for i in range(4)]  # disjoint page sets
    logs: list[list[tuple[int, bytes]]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def write(i: int) -> None:
        r = random.Random(f"writer-{mode}-{i}")
        todo = [page for page in per_thread[i] for _ in range(r.randint(1, 3))]
        r.shuffle(todo)
        start.wait()
        for page in todo:
            first = r.randrange(PAGE)
            data = r.randbytes(r.randint(1, PAGE - first))
            at = page * PAGE + first
            view[at:at + len(data)] = data
            logs[i].append((at, data))

    run_threads(write, 4)
    model = bytearray(original[offset:offset + size])
    for log in logs:
        for at, data in log:
            model[at:at + len(data)] = data

    assert region.flush() == {"pages": len(written), "bytes": len(written) * PAGE}

    reader = run_child("read-sha256", str(path), str(size), str(offset), timeout=60)
    assert reader.returncode == 0, reader.stderr
    stored = path.read_bytes()
    assert reader.stdout.strip() == hashlib.sha256(model).hexdigest(), (
        f"a new process does not see the writes; pages of the file that differ from the model: "
        f"{differing_pages(stored[offset:offset + size], model)}")
    assert stored[:offset] == original[:offset], "bytes before the region changed"
    assert stored[offset + size:] == original[offset + size:], "bytes after the region changed"
    del view
    region.close()


# --- 2. writes racing flushes are never lost ---------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_writes_racing_50_flushes_are_never_lost(pager, random_file, mode):
    # A write whose dirty bit a flush loses is only seen at the end if its page
    # is never written again: so each writer writes each of its "fresh" pages
    # once, paced over the flushes, besides hammering a few hot pages (which
    # every flush copies while they are being written).
    size = 32 * MiB
    npages = size // PAGE
    path = random_file(size)
    region = pager.map(url(path), size, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    rng = random.Random(f"racing-{mode}")
    pages = list(range(npages))
    rng.shuffle(pages)
    hot, fresh = pages[:16], [pages[16::2], pages[17::2]]
    for p in rng.sample(fresh[0] + fresh[1], 1000):
        view[p * PAGE]  # read first: under "sync" its first write is a write-protect fault
    stop = threading.Event()
    counts = [0, 0]
    results: list[dict[str, int]] = []

    def write(i: int) -> None:
        r = random.Random(f"racer-{mode}-{i}")
        seq = 0
        todo = iter(fresh[i])
        while not stop.is_set():
            page = next(todo, None)
            for p in ([page] if page is not None else []) + [r.choice(hot)]:
                at = p * PAGE + r.randrange(PAGE - 12)
                view[at:at + 12] = struct.pack("<IQ", i, seq)
                seq += 1
            time.sleep(0.0002)
        counts[i] = seq

    def flush_50_times() -> None:
        try:
            for _ in range(50):
                results.append(region.flush())
        finally:
            stop.set()

    # Threads 0 and 1 write, thread 2 flushes and then stops them.
    run_threads(lambda i: flush_50_times() if i == 2 else write(i), 3)
    results.append(region.flush())

    memory = bytes(view)
    stored = path.read_bytes()
    assert sum(counts) > 500, f"the writers hardly ran: {counts}"
    assert sum(1 for r in results[:50] if r["pages"]) >= 40, f"most flushes found nothing to write: {results}"
    assert stored == memory, f"updates lost; pages differing: {differing_pages(stored, memory)}"
    assert region.stats()["dirty_pages"] == 0
    del view
    region.close()


# --- 3. a flush that returned survives SIGKILL of the client ------------------------------



def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"the client said nothing for {timeout} s"
    return process.stdout.readline()  # type: ignore[union-attr]


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_client_killed_right_after_flush_leaves_what_it_flushed_in_the_file(random_file, mode):
    npages = 512
    path = random_file(npages * PAGE)
    process = subprocess.Popen([sys.executable, str(CHILDREN_PY), "killed-client", str(path), mode, str(npages)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(process, 30)
        assert line.startswith("flushed "), f"{line!r} {process.stderr.read() if process.poll() is not None else ''}"
        _, pages, pager_pid = line.split()
        assert int(pages) == npages // 2
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]

    stored = path.read_bytes()
    lost = [p for p in range(0, npages, 2) if stored[p * PAGE:(p + 1) * PAGE] != pattern("flushed", p)]
    assert not lost, f"flushed pages missing from the file after SIGKILL: {lost[:20]}"
    assert _wait_dead(int(pager_pid), 10), "the killed client's pager is still running after 10 s"


# --- 4. a full disk -------------------------------------------------------------------------


class FullDisk:
    def __init__(self, directory: Path) -> None:
        self.filler = directory / "filler"
        self.filler.write_bytes(b"\xff" * (MiB - 16 * PAGE))  # 16 pages left
        self.store = directory / "store"
        self.store.touch()

    def make_room(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def full_disk(small_tmpfs: Path, pager: uffd_pager.Pager) -> Iterator[FullDisk]:
    """An empty store file on a 1 MiB tmpfs with room for 16 pages. Request it
    before `pager`: then the tmpfs is set up before the pager and unmounted
    after it, and the filler goes first, so that even after a failed test the
    pager fixture's close() can write back and let go of the store."""
    disk = FullDisk(small_tmpfs)
    yield disk
    disk.make_room()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_raises_enospc_keeps_the_pages_dirty_and_a_later_flush_writes_them(full_disk, pager, mode):
    region = pager.map(url(full_disk.store), MiB, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    data = os.urandom(MiB)
    view[:] = data

    with pytest.raises(OSError) as failed:
        region.flush()
    assert failed.value.errno == errno.ENOSPC, failed.value
    stats = region.stats()
    assert stats["writeback_errors"] == 1
    assert stats["dirty_pages"] > 0
    assert stats["last_error"]

    # close() flushes first: it fails the same way and leaves the region open.
    with pytest.raises(OSError) as failed:
        region.close()
    assert failed.value.errno == errno.ENOSPC
    assert not region.closed
    assert bytes(view) == data

    full_disk.make_room()
    assert region.flush() == {"pages": MiB // PAGE, "bytes": MiB}
    stored = full_disk.store.read_bytes()
    assert stored == data, f"pages differing: {differing_pages(stored, data)}"
    assert region.stats()["dirty_pages"] == 0
    del view
    region.close()
    assert region.closed


# --- 5. the program's own madvise(DONTNEED), mremap, munmap ----------------------------------






def _run_scenario(name: str, path: Path, mode: str) -> list[dict]:
    result = run_child(name, str(path), mode, timeout=60)
    lines = json_lines(result)
    assert result.returncode == 0, (
        f"the client exited with status {result.returncode} after reporting {lines}\n{result.stderr[-3000:]}")
    return lines


def _with_pages(original: bytes, pages: dict[int, bytes]) -> bytes:
    data = bytearray(original)
    for p, content in pages.items():
        data[p * PAGE:(p + 1) * PAGE] = content
    return bytes(data)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_madvise_dontneed_drops_unflushed_writes_and_rereads_the_store(random_file, mode):
    path = random_file(64 * PAGE)
    original = path.read_bytes()
    observed, closed = _run_scenario("remove", path, mode)

    assert observed["first"]["pages"] == 16
    assert observed["remove"] == 1
    assert observed["memory_differs"] == [], "after MADV_DONTNEED these pages do not read the last flushed content"
    # Dirty and kept: 0-7 (B), 24-31 (C); written after the drop: 10, 20.
    assert observed["second"] == {"pages": 18, "bytes": 18 * PAGE}
    assert observed["dirty_after"] == 0
    assert closed == {"closed": True}
    expected = _with_pages(original, {
        **{p: pattern("B", p) for p in range(0, 8)},
        **{p: pattern("A", p) for p in range(8, 16)},
        **{p: pattern("C", p) for p in range(24, 32)},
        10: pattern("D", 10), 20: pattern("D", 20),
    })
    stored = path.read_bytes()
    assert stored == expected, f"pages differing: {differing_pages(stored, expected)}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_mremap_of_the_whole_region_the_pager_follows(random_file, mode):
    path = random_file(1024 * PAGE)
    original = path.read_bytes()
    observed, closing, done = _run_scenario("remap", path, mode)

    assert observed["moved"] and not observed["old_is_new"]
    assert observed["events"]["remap"] == 1
    assert observed["memory_differs"] == [], "at the new address these pages differ from the model"
    assert observed["errors"] == 0
    # B (5), C (10), D (13): every page dirty at the move or written after it.
    assert observed["second"] == {"pages": 28, "bytes": 28 * PAGE}
    assert observed["third"] == {"pages": 0, "bytes": 0}
    assert observed["dirty_after"] == 0
    expected = _with_pages(original, {
        **{p: pattern("A", p) for p in range(0, 5)},
        **{p: pattern("B", p) for p in range(5, 10)},
        **{p: pattern("C", p) for p in range(20, 30)},
        **{p: pattern("D", p) for p in [35, 36, 37, *range(900, 910)]},
    })
    stored = path.read_bytes()
    assert stored == expected, f"pages differing: {differing_pages(stored, expected)}"
    assert closing["close_error"] is None, f"close() after the mremap raised {closing['close_error']}"
    assert closing["closed"]
    assert done == {"done": True}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_munmap_of_half_the_region_loses_its_unflushed_writes_and_the_rest_keeps_working(random_file, mode):
    path = random_file(512 * PAGE)
    original = path.read_bytes()
    observed, closing, done = _run_scenario("unmap", path, mode)

    assert observed["first"]["pages"] == 20
    assert observed["events"]["unmap"] == 1
    assert observed["memory_differs"] == [], "in the half still mapped these pages differ from the model"
    assert observed["second"] == {"pages": 20, "bytes": 20 * PAGE}  # B 5-14, C 20-29
    assert observed["third"] == {"pages": 0, "bytes": 0}
    assert observed["dirty_after"] == 0
    assert closing["close_error"] is None, f"close() after the munmap raised {closing['close_error']}"
    assert closing["closed"]
    assert done == {"done": True}
    expected = _with_pages(original, {
        **{p: pattern("A", p) for p in [*range(0, 5), *range(300, 310)]},
        **{p: pattern("B", p) for p in range(5, 15)},
        **{p: pattern("C", p) for p in range(20, 30)},
    })
    stored = path.read_bytes()
    assert stored[:256 * PAGE] == expected[:256 * PAGE], (
        f"mapped half, pages differing: {differing_pages(stored[:256 * PAGE], expected[:256 * PAGE])}")
    assert stored[256 * PAGE:] == expected[256 * PAGE:], (
        "the unmapped half's unflushed writes reached the file, or it changed otherwise; pages differing "
        f"(from 256): {differing_pages(stored[256 * PAGE:], expected[256 * PAGE:])}")


# --- 6. close(), the timer, the counters ---------------------------------------------------


def _write_then_close(pager: uffd_pager.Pager, path: Path, mode: str, pages: dict[int, bytes], *,
                      view_alive: bool) -> None:
    # The README's usage: `with pager.map(...) as region: view = region.view()`;
    # with view_alive the view is still alive when the with block closes the region.
    with pager.map(url(path), 256 * PAGE, dirty_tracking=mode, writeback_interval=0) as region:
        view = region.view()
        for p, content in pages.items():
            view[p * PAGE:(p + 1) * PAGE] = content
        if not view_alive:
            del view
    assert region.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_close_writes_back(pager, random_file, mode):
    path = random_file(256 * PAGE)
    original = path.read_bytes()
    pages = {p: pattern("close", p) for p in (0, 1, 2, 77, 128, 255)}
    _write_then_close(pager, path, mode, pages, view_alive=False)

    expected = _with_pages(original, pages)
    assert path.read_bytes() == expected
    again = pager.map(url(path), 256 * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = again.view()
    assert bytes(view) == expected, "a new mapping does not see what close() wrote back"
    del view
    again.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_the_timer_writes_back_without_flush(pager, random_file, mode):
    path = random_file(256 * PAGE)
    original = path.read_bytes()
    region = pager.map(url(path), 256 * PAGE, dirty_tracking=mode, writeback_interval=0.3)
    view = region.view()
    pages = {p: pattern("timer", p) for p in (3, 4, 100, 200)}
    for p, content in pages.items():
        view[p * PAGE:(p + 1) * PAGE] = content
    expected = _with_pages(original, pages)

    # The file shows the bytes once written, a little before the timed flush
    # has synced and counted them: wait for both.
    deadline = time.monotonic() + 5
    while path.read_bytes() != expected or region.stats()["pages_written"] < len(pages):
        assert time.monotonic() < deadline, (
            f"the timer did not write back in 5 s: {region.stats()}; pages of the file still differing: "
            f"{differing_pages(path.read_bytes(), expected)}")
        time.sleep(0.05)
    stats = region.stats()
    assert stats["flushes"] >= 1 and stats["pages_written"] == len(pages) and stats["dirty_pages"] == 0
    del view
    region.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_counters_after_writing_k_distinct_pages_and_flushing(pager, random_file, mode):
    path = random_file(1024 * PAGE)
    region = pager.map(url(path), 1024 * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    read_first = list(range(100, 110))
    for p in read_first:
        view[p * PAGE]
    pages = sorted({*read_first, *range(0, 5), 500, 501, 502, 1023, *random.Random(1).sample(range(600, 1000), 20)})
    k = len(pages)
    for p in pages:
        view[p * PAGE + 7] = 1
        view[p * PAGE + 4000:p * PAGE + 4010] = b"x" * 10  # written twice: still one dirty page
    assert region.stats()["dirty_pages"] == k

    assert region.flush() == {"pages": k, "bytes": k * PAGE}
    stats = region.stats()
    assert (stats["pages_written"], stats["bytes_written"], stats["flushes"], stats["dirty_pages"]) == (
        k, k * PAGE, 1, 0)
    assert stats["writeback_errors"] == 0

    assert region.flush() == {"pages": 0, "bytes": 0}
    stats = region.stats()
    assert (stats["pages_written"], stats["bytes_written"], stats["dirty_pages"]) == (k, k * PAGE, 0)
    del view
    region.close()


@pytest.mark.timeout(60)
def test_sync_tracking_counts_a_wp_fault_for_each_first_write_to_a_page_read_first(pager, random_file):
    path = random_file(256 * PAGE)
    region = pager.map(url(path), 256 * PAGE, dirty_tracking="sync", writeback_interval=0)
    view = region.view()
    for p in range(10):
        view[p * PAGE]
    assert region.stats()["wp_faults"] == 0
    for p in range(10):
        view[p * PAGE + 1] = 1
        view[p * PAGE + 2] = 2  # the page is writable now: no second fault
    for p in range(50, 55):
        view[p * PAGE] = 3      # first touch is a write: a missing fault, not a wp fault
    stats = region.stats()
    assert stats["wp_faults"] == 10
    assert stats["write_faults"] == 5
    assert region.flush()["pages"] == 15
    for p in range(3):          # write-protected again by the flush
        view[p * PAGE + 1] = 4
    assert region.stats()["wp_faults"] == 13
    assert region.flush()["pages"] == 3
    del view
    region.close()


# --- 7. nothing is written for a page never dirtied ------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_reading_a_region_past_eof_writes_nothing(pager, sparse_file, mode):
    file_size = 300 * PAGE + 123
    writes = {0: b"head", 17 * PAGE + 5: os.urandom(3 * PAGE), 299 * PAGE: os.urandom(PAGE + 123)}
    path = sparse_file(file_size, writes)
    before = path.read_bytes()
    size = 1024 * PAGE  # well past the end of the file
    region = pager.map(url(path), size, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    assert bytes(view) == before + bytes(size - file_size)

    assert region.flush() == {"pages": 0, "bytes": 0}
    stats = region.stats()
    assert (stats["pages_written"], stats["dirty_pages"]) == (0, 0)
    assert os.stat(path).st_size == file_size
    del view
    region.close()
    assert os.stat(path).st_size == file_size
    assert path.read_bytes() == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_write_to_a_hole_or_past_eof_page_read_first_is_written_back(pager, sparse_file, mode):
    # Holes and pages past EOF are read as zero (under "async", the shared zero
    # page): a later write to one must still be seen as a write.
    file_size = 64 * PAGE
    path = sparse_file(file_size, {0: b"head"})
    region = pager.map(url(path), 256 * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    assert bytes(view[:4]) == b"head" and not any(view[PAGE:])
    assert region.flush() == {"pages": 0, "bytes": 0}

    view[10 * PAGE:11 * PAGE] = pattern("hole", 10)
    view[200 * PAGE:201 * PAGE] = pattern("past-eof", 200)

    assert region.flush() == {"pages": 2, "bytes": 2 * PAGE}
    stored = path.read_bytes()
    assert len(stored) == 201 * PAGE
    assert stored[10 * PAGE:11 * PAGE] == pattern("hole", 10)
    assert stored[200 * PAGE:] == pattern("past-eof", 200)
    assert stored[:4] == b"head" and not any(stored[4:10 * PAGE]) and not any(stored[11 * PAGE:200 * PAGE])
    del view
    region.close()


# --- 8. close() and exit after something went wrong: a live view, a failed flush, a moved or cut mapping


@pytest.mark.timeout(60)
def test_close_with_the_view_still_alive_writes_back_and_does_not_raise(pager, random_file):
    path = random_file(256 * PAGE)
    original = path.read_bytes()
    pages = {p: pattern("close-alive", p) for p in (0, 9, 200)}
    _write_then_close(pager, path, "async", pages, view_alive=True)
    assert path.read_bytes() == _with_pages(original, pages)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_after_a_failed_flush_dirty_pages_counts_a_page_written_again_once(full_disk, pager, mode):
    region = pager.map(url(full_disk.store), MiB, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    try:
        view[:] = os.urandom(MiB)
        with pytest.raises(OSError):
            region.flush()
        assert region.stats()["dirty_pages"] == MiB // PAGE

        view[7 * PAGE] ^= 0xFF  # a page the failed flush left dirty, written again

        assert region.stats()["dirty_pages"] == MiB // PAGE, "a page dirty twice over is counted twice"
        full_disk.make_room()
        assert region.flush() == {"pages": MiB // PAGE, "bytes": MiB}
        assert full_disk.store.read_bytes() == bytes(view)
    finally:
        view.release()  # so that the fixtures' close() works even after a failure here
    region.close()




@pytest.mark.timeout(60)
def test_a_program_that_gives_up_on_a_region_whose_close_failed_does_not_hang(full_disk):
    try:
        result = run_child("give-up-after-a-failed-close", str(full_disk.store), timeout=10)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process hangs (killed after 10 s); it said {exc.stdout!r}")
    assert result.stdout.split("\n")[:2] == [f"close failed {errno.ENOSPC}", "released"], result.stderr
    assert result.returncode == 0, result.stderr[-3000:]




@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_close_after_mremap_unmaps_the_region_where_it_is_now_and_nothing_else(random_file, mode):
    path = random_file(256 * PAGE)
    original = path.read_bytes()
    result = run_child("close-after-remap", str(path), mode, timeout=30)
    lines = json_lines(result)
    assert lines, result.stderr[-3000:]
    closing = lines[0]
    problems = []
    if closing["close_error"] is not None:
        problems.append(f"close() after the mremap raised {closing['close_error']}")
    if path.read_bytes() != _with_pages(original, {0: pattern("A", 0), 1: pattern("B", 1)}):
        problems.append("close() did not write back")
    if not closing["mine_still_mapped"]:
        problems.append("close() unmapped the memory the program mapped at the region's old address since the mremap")
    if closing["region_still_mapped"]:
        problems.append("close() left the moved region mapped (leaked)")
    assert not problems, problems
    assert result.returncode == 0, f"status {result.returncode}: {lines}\n{result.stderr[-3000:]}"
    assert lines[1:] == [{"mine": "mine"}, {"done": True}]




@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_after_munmap_of_half_the_region_memory_mapped_in_that_half_breaks_neither_flush_nor_close(
        random_file, mode):
    path = random_file(256 * PAGE)
    original = path.read_bytes()
    result = run_child("map-into-unmapped-half", str(path), mode, timeout=30)
    lines = json_lines(result)
    assert lines, result.stderr[-3000:]
    observed = lines[0]
    assert observed["first"]["pages"] == 1
    problems = []
    if observed["flush_error"] is not None:
        problems.append(f"flush() after the munmap raised {observed['flush_error']}")
    elif observed["second"] != {"pages": 1, "bytes": PAGE}:
        problems.append(f"flush() after the munmap wrote {observed['second']}, not the one page written")
    if observed["close_error"] is not None:
        problems.append(f"close() after the munmap raised {observed['close_error']}")
    if path.read_bytes() != _with_pages(original, {0: pattern("A", 0), 1: pattern("B", 1)}):
        problems.append("the page written after the munmap is not in the file")
    if not observed["mine_still_mapped"]:
        problems.append("close() unmapped the memory the program mapped in the region's unmapped half since")
    if observed["region_still_mapped"]:
        problems.append("close() left the rest of the region mapped")
    assert not problems, problems
    assert result.returncode == 0, f"status {result.returncode}: {lines}\n{result.stderr[-3000:]}"
    assert lines[1:] == [{"mine": "mine"}, {"done": True}]
