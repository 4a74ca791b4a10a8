"""Adversarial tests of read-ahead and prefetch (native/readahead.c,
native/fill.c, uffd_pager/faults.py): sparse files whose data and holes do
not fall on page boundaries, regions at an offset into their file, writes
before read-ahead, files that change under the mapping, many regions read
at once, prefetch at the edges, a Redis server that stalls, strides at and
past the detector's limit. Every check is on bytes or on the documented
stats, never on timing."""
from __future__ import annotations

import array
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import uffd_pager
from pages import differing_pages
from uffd_pager.bench import _touch

CHILDREN_PY = Path(__file__).with_name("read_ahead_children.py")  # the child processes below
PAGE = uffd_pager.PAGE_SIZE
N = 2048  # pages in most regions here (8 MiB)


def url(path: Path) -> str:
    return f"file://{path}"


def touch(region: uffd_pager.Region, pages: list[int]) -> None:
    """Reads one byte of each page, in the order given (from C)."""
    if pages:
        _touch(region.address, array.array("Q", (p * PAGE for p in pages)))


def expected_of(path: Path, size: int, offset: int = 0) -> bytes:
    """What a region of `size` bytes at `offset` into path must read:
    the file's bytes there, zeros past its end."""
    data = path.read_bytes()[offset:offset + size]
    return data + bytes(size - len(data))


def page_kinds(expected: bytes) -> tuple[int, int]:
    """(pages with a non-zero byte, pages all zero)."""
    zero_page = bytes(PAGE)
    zeros = sum(1 for p in range(len(expected) // PAGE) if expected[p * PAGE:(p + 1) * PAGE] == zero_page)
    return len(expected) // PAGE - zeros, zeros


ORDERS = {
    "forward": lambda n: list(range(n)),
    "backward": lambda n: list(range(n - 1, -1, -1)),
    "stride-3": lambda n: list(range(0, n, 3)) + list(range(1, n, 3)) + list(range(2, n, 3)),
    "stride-minus-7": lambda n: [p for r in range(7) for p in range(n - 1 - r, -1, -7)],
}

WINDOWS = {"adaptive": "adaptive", "fixed-64": 64 * PAGE, "fixed-16MiB": 16 << 20}


def unaligned_sparse_writes(npages: int, seed: int) -> dict[int, bytes]:
    """Data at offsets that are not page-aligned, of lengths that end
    mid-page or cross a page boundary, with holes of 1 to 300 pages between:
    several holes fall in the middle of any window."""
    rng = random.Random(seed)
    writes: dict[int, bytes] = {}
    page = 1
    while page < npages - 2:
        kind = rng.randrange(4)
        if kind == 0:  # 50 bytes at +100
            writes[page * PAGE + 100] = rng.randbytes(50)
        elif kind == 1:  # across a page boundary
            writes[page * PAGE + PAGE - 7] = rng.randbytes(20)
        elif kind == 2:  # the last byte of a page only
            writes[page * PAGE + PAGE - 1] = b"\xff"
        else:  # a run of whole pages starting mid-page
            writes[page * PAGE + 1234] = rng.randbytes(rng.randrange(1, 5) * PAGE)
        page += rng.choice((1, 2, 3, 17, 64, 65, 255, 256, 257, 300))
    return writes


# --- 1. sparse files, unaligned boundaries -----------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ORDERS)
def test_sparse_file_with_unaligned_data_reads_exactly(pager, sparse_file, order, window, tracking):
    size = N * PAGE - 1000  # not a multiple of the page: the last page is partial
    writes = unaligned_sparse_writes(N, seed=list(ORDERS).index(order) * 10 + list(WINDOWS).index(window))
    writes[size - 10] = b"0123456789"  # data up to the very end of the file
    path = sparse_file(size, writes)
    expected = expected_of(path, N * PAGE)
    pages = ORDERS[order](N)
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, read_ahead=WINDOWS[window],
                   writeback_interval=0) as region:
        touch(region, pages)
        stats = region.stats()
        assert differing_pages(region.view(), expected) == []
    data_pages, zero_pages = page_kinds(expected)
    # Every page was filled once: as data (a copy) or as zeros.
    assert stats["copies"] + stats["zero_fills"] == N, stats
    assert stats["errors"] == 0, stats
    if order in ("forward", "backward") or window != "adaptive":
        # Runs of pages: holes come from SEEK_DATA/SEEK_HOLE as zero fills.
        assert stats["zero_fills"] == zero_pages and stats["copies"] == data_pages, (stats, data_pages, zero_pages)
    if order == "backward" and window != "adaptive":
        assert stats["read_ahead_pages"] == 0 and stats["faults"] == N, stats  # a fixed window is after the fault
    else:
        assert stats["read_ahead_pages"] > 0, stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("window", WINDOWS)
def test_a_file_of_a_few_bytes_in_a_big_region(pager, sparse_file, window):
    path = sparse_file(4097, {4090: b"abcdefg"})  # 7 bytes across the first page boundary
    expected = expected_of(path, N * PAGE)
    with pager.map(url(path), N * PAGE, read_ahead=WINDOWS[window], writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert differing_pages(region.view(), expected) == []
    assert stats["copies"] == 2 and stats["zero_fills"] == N - 2, stats


@pytest.mark.timeout(60)
def test_an_empty_file_reads_as_zeros_ahead(pager, sparse_file):
    path = sparse_file(0)
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert bytes(region.view()) == bytes(N * PAGE)
    assert stats["copies"] == 0 and stats["zero_fills"] == N, stats
    assert stats["faults"] <= N // 16, stats


# --- 2. a region at an offset into its file ---------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ["forward", "backward", "stride-3", "stride-minus-7"])
@pytest.mark.parametrize("kind", ["random", "sparse"])
def test_a_region_at_an_offset_reads_its_slice_of_the_file(pager, random_file, sparse_file, kind, order, window):
    file_pages = 3 * N
    if kind == "random":
        path = random_file(file_pages * PAGE + 777)
    else:
        path = sparse_file(file_pages * PAGE + 777, unaligned_sparse_writes(file_pages, seed=5))
    for offset_pages, npages in ((37, N), (file_pages - N // 2, N)):  # inside the file; running past its end
        offset = offset_pages * PAGE
        expected = expected_of(path, npages * PAGE, offset)
        with pager.map(url(path), npages * PAGE, offset, read_ahead=WINDOWS[window],
                       writeback_interval=0) as region:
            touch(region, ORDERS[order](npages))
            stats = region.stats()
            assert differing_pages(region.view(), expected) == [], (offset_pages, npages)
        assert stats["copies"] + stats["zero_fills"] == npages, stats
        assert stats["errors"] == 0, stats


@pytest.mark.timeout(60)
def test_a_window_never_reaches_past_the_region_into_the_rest_of_the_file(pager, random_file):
    """Read-ahead stops at the region's end: a second region right after it
    over the same file sees none of its pages filled (it faults on its
    first page), and both read their own slice."""
    path = random_file(4 * N * PAGE)
    with pager.map(url(path), N * PAGE, N * PAGE, read_ahead=16 << 20, writeback_interval=0) as first, \
            pager.map(url(path), N * PAGE, 2 * N * PAGE, writeback_interval=0) as second:
        touch(first, list(range(N - 10, N)))
        s1 = first.stats()
        assert s1["copies"] == 10, s1
        touch(second, [0])
        assert second.stats()["faults"] == 1
        assert bytes(first.view()[(N - 10) * PAGE:]) == expected_of(path, 10 * PAGE, (2 * N - 10) * PAGE)
        assert bytes(second.view()[:PAGE]) == expected_of(path, PAGE, 2 * N * PAGE)


# --- 3. writes before read-ahead ----------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ["forward", "backward", "stride-3"])
def test_read_ahead_never_overwrites_a_written_page(pager, sparse_file, tmp_path, order, window, tracking):
    size = N * PAGE
    path = sparse_file(size, unaligned_sparse_writes(N, seed=11))
    rng = random.Random(17)
    written = {p: rng.randbytes(PAGE) for p in rng.sample(range(N), 200)}
    # Some writes of a single byte (a write fault on a missing page fills it first).
    partial = {p: rng.randrange(1, 256) for p in rng.sample(sorted(set(range(N)) - set(written)), 50)}
    with pager.map(url(path), size, dirty_tracking=tracking, read_ahead=WINDOWS[window],
                   writeback_interval=0) as region:
        view = region.view()
        for p, data in written.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        for p, b in partial.items():
            view[p * PAGE + 5] = b
        expected = bytearray(expected_of(path, size))
        for p, data in written.items():
            expected[p * PAGE:(p + 1) * PAGE] = data
        for p, b in partial.items():
            expected[p * PAGE + 5] = b
        touch(region, ORDERS[order](N))
        assert differing_pages(view, expected) == []
        # And a second write after read-ahead filled the neighbours.
        for p in rng.sample(range(N), 100):
            view[p * PAGE + 9] = 0xAB
            expected[p * PAGE + 9] = 0xAB
        assert differing_pages(view, expected) == []
        region.flush()
        assert region.stats()["dirty_pages"] == 0
    with open(path, "rb") as f:
        on_disk = f.read()
    assert differing_pages(on_disk, expected) == []
    with pager.map(url(path), size, read_ahead=WINDOWS[window], writeback_interval=0) as region:
        touch(region, ORDERS[order](N))
        assert differing_pages(region.view(), expected) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_writes_to_holes_read_ahead_as_zero_pages_are_written_back(pager, sparse_file, tracking):
    """Holes read ahead are mapped as the shared zero page (or as copied
    zeros under sync tracking): a write to one must be seen and flushed."""
    path = sparse_file(N * PAGE, {0: b"x" * 10, (N - 1) * PAGE: b"y" * 10})
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert stats["zero_fills"] == N - 2 and stats["read_ahead_pages"] > N // 2, stats
        view = region.view()
        expected = bytearray(view)
        for p in range(1, N - 1, 7):
            view[p * PAGE + 3] = 0x5A
            expected[p * PAGE + 3] = 0x5A
        region.flush()
    assert differing_pages(path.read_bytes(), expected) == []


# --- 4. a file changed under the mapping --------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_a_file_truncated_then_extended_reads_what_it_holds_at_fill_time(pager, random_file, order, window):
    path = random_file(N * PAGE)
    original = path.read_bytes()
    new = os.urandom(300 * PAGE + 99)
    with pager.map(url(path), N * PAGE, read_ahead=WINDOWS[window], writeback_interval=0) as region:
        pages = ORDERS[order](N)
        touch(region, pages[:64])  # windows open, the file's mapping made
        filled = region.stats()["copies"]
        os.truncate(path, 500 * PAGE + 123)
        with open(path, "r+b") as f:  # extended again: a hole, then new data
            f.seek(1200 * PAGE + 17)
            f.write(new)
        touch(region, pages[64:])
        seen = bytes(region.view())
        stats = region.stats()
        assert pager.alive()
    now = path.read_bytes()
    now += bytes(N * PAGE - len(now))
    # Pages filled before the change hold the old bytes (they were the file's
    # then); every page filled afterwards holds the file's bytes now.
    bad = []
    for p in range(N):
        got = seen[p * PAGE:(p + 1) * PAGE]
        if got == now[p * PAGE:(p + 1) * PAGE]:
            continue
        if got == original[p * PAGE:(p + 1) * PAGE] and (p < filled if order == "forward" else p >= N - filled):
            continue  # read ahead before the truncation
        bad.append(p)
    assert bad == [], (bad[:20], filled, stats)
    assert stats["errors"] == 0, stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_a_file_shrunk_and_regrown_between_windows(pager, random_file, tracking):
    """Each round reads the first 64 pages of a fresh 256-page slice in
    order (its windows reach page 124 of the slice at most, never the next
    slice) after cutting the file inside the slice and writing new data
    further on: the slice reads as the file holds it now."""
    path = random_file(N * PAGE)
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, writeback_interval=0) as region:
        for round_ in range(N // 256):
            lo = round_ * 256
            os.truncate(path, (lo + 10) * PAGE + 1)
            with open(path, "r+b") as f:
                f.seek((lo + 40) * PAGE + 3)
                f.write(os.urandom(200 * PAGE))
            now = expected_of(path, N * PAGE)
            touch(region, list(range(lo, lo + 64)))
            assert differing_pages(region.view()[lo * PAGE:(lo + 64) * PAGE], now[lo * PAGE:(lo + 64) * PAGE]) == [], \
                round_
        stats = region.stats()
        assert pager.alive() and stats["errors"] == 0 and stats["read_ahead_pages"] > 0, stats


# --- 5. many regions, many threads ----------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("window", ["adaptive", "fixed-64"])
def test_many_regions_read_in_order_by_threads_at_once(pager, random_file, sparse_file, window):
    regions, expected, orders = [], [], []
    try:
        for i in range(12):
            if i % 3 == 2:
                path = sparse_file(N * PAGE - 5, unaligned_sparse_writes(N, seed=i))
            else:
                path = random_file(N * PAGE - (i * 333) % PAGE)
            offset = (i % 4) * 3 * PAGE
            regions.append(pager.map(url(path), N * PAGE, offset, read_ahead=WINDOWS[window],
                                     dirty_tracking="sync" if i % 2 else "async", writeback_interval=0))
            expected.append(expected_of(path, N * PAGE, offset))
            orders.append(ORDERS[list(ORDERS)[i % 4]](N))
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                touch(regions[i], orders[i])
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(regions))]
        # Also two threads on the same region, from opposite ends.
        shared = regions[0]
        threads.append(threading.Thread(target=touch, args=(shared, list(range(N - 1, -1, -1)))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for i, region in enumerate(regions):
            assert differing_pages(region.view(), expected[i]) == [], i
            stats = region.stats()
            assert stats["errors"] == 0, (i, stats)
            assert stats["read_ahead_pages"] > 0 or (window == "fixed-64" and i % 4 == 1), (i, stats)
            assert stats["copies"] + stats["zero_fills"] == N, (i, stats)
        assert pager.alive()
    finally:
        for region in regions:
            region.close()


# --- 6. prefetch at the edges -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prefetch_of_nothing_and_at_the_end(pager, random_file):
    path = random_file(N * PAGE)
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        assert region.prefetch(0, 0) == 0
        assert region.prefetch(N * PAGE, 0) == 0
        assert region.prefetch(N * PAGE) == 0
        assert region.prefetch(N * PAGE - 1, 1) == 1  # the last page
        assert region.prefetch(N * PAGE - 1) == 0
        stats = region.stats()
        assert stats["faults"] == 0 and stats["read_ahead_pages"] == 1 and stats["copies"] == 1, stats
        assert bytes(region.view()[(N - 1) * PAGE:]) == path.read_bytes()[(N - 1) * PAGE:]
        for offset, length in ((N * PAGE + 1, 0), (0, -1), (N * PAGE - 1, 2)):
            with pytest.raises(ValueError):
                region.prefetch(offset, length)


@pytest.mark.timeout(60)
# Was a bug (fixed): prefetch(offset, 0) with offset not page-aligned fills the page holding offset
def test_prefetch_of_an_empty_range_mid_page_fills_nothing(pager, random_file):
    path = random_file(16 * PAGE)
    with pager.map(url(path), 16 * PAGE, writeback_interval=0) as region:
        assert region.prefetch(5, 0) == 0
        assert region.prefetch(3 * PAGE + 1, 0) == 0
        assert region.stats()["read_ahead_pages"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_prefetch_keeps_written_pages_and_what_it_fills_is_tracked(pager, sparse_file, tracking):
    path = sparse_file(N * PAGE - 3, unaligned_sparse_writes(N, seed=23))
    rng = random.Random(29)
    written = {p: rng.randbytes(PAGE) for p in rng.sample(range(N), 100)}
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, read_ahead="off", writeback_interval=0) as region:
        view = region.view()
        for p, data in written.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        assert region.prefetch() == N - len(written)
        assert region.prefetch() == 0
        expected = bytearray(expected_of(path, N * PAGE))
        for p, data in written.items():
            expected[p * PAGE:(p + 1) * PAGE] = data
        assert differing_pages(view, expected) == []
        stats = region.stats()
        assert stats["copies"] + stats["zero_fills"] == N, stats
        # Writes to prefetched pages (data and holes alike) are written back.
        for p in range(0, N, 5):
            view[p * PAGE + 1] = 0x77
            expected[p * PAGE + 1] = 0x77
        region.flush()
    assert differing_pages(expected_of(path, N * PAGE), expected) == []


@pytest.mark.timeout(60)
def test_prefetch_on_a_closed_region_raises(pager, random_file):
    path = random_file(64 * PAGE)
    region = pager.map(url(path), 64 * PAGE, writeback_interval=0)
    region.close()
    with pytest.raises(Exception):
        region.prefetch()
    assert pager.alive()
    with pager.map(url(path), 64 * PAGE, writeback_interval=0) as other:
        assert other.prefetch() == 64
        assert bytes(other.view()) == path.read_bytes()


@pytest.mark.timeout(60)
def test_prefetch_of_a_file_truncated_under_it(pager, random_file):
    path = random_file(N * PAGE)
    original = path.read_bytes()
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        assert region.prefetch(0, 16 * PAGE) == 16  # the file's mapping made
        os.truncate(path, 100 * PAGE + 1)
        assert region.prefetch() == N - 16
        seen = bytes(region.view())
        assert seen[:100 * PAGE + 1] == original[:100 * PAGE + 1]
        assert seen[100 * PAGE + 1:] == bytes(N * PAGE - 100 * PAGE - 1)
        assert pager.alive() and region.stats()["errors"] == 0


# --- 8. strides ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stride", [65, -65, 100, 1000])
def test_a_stride_past_the_limit_opens_no_window(pager, random_file, stride):
    path = random_file(N * 4 * PAGE)
    n = N * 4
    pages = list(range(0, n, stride)) if stride > 0 else list(range(n - 1, -1, stride))
    with pager.map(url(path), n * PAGE, writeback_interval=0) as region:
        touch(region, pages)
        stats = region.stats()
        view = region.view()
        data = path.read_bytes()
        for p in pages:
            assert view[p * PAGE:(p + 1) * PAGE] == data[p * PAGE:(p + 1) * PAGE], p
    assert stats["read_ahead_pages"] == 0 and stats["faults"] == len(pages), stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stride", [64, -64, 2, -2, 63])
def test_a_stride_at_the_limit_is_read_ahead_and_exact(pager, random_file, sparse_file, stride):
    n = N * 4
    for path in (random_file(n * PAGE - 100), sparse_file(n * PAGE - 100, unaligned_sparse_writes(n, seed=3))):
        pages = list(range(0, n, stride)) if stride > 0 else list(range(n - 1, -1, stride))
        with pager.map(url(path), n * PAGE, writeback_interval=0) as region:
            touch(region, pages)
            stats = region.stats()
            expected = expected_of(path, n * PAGE)
            view = region.view()
            wrong = [p for p in pages if view[p * PAGE:(p + 1) * PAGE] != expected[p * PAGE:(p + 1) * PAGE]]
            assert wrong == []
            assert differing_pages(view, expected) == []  # the rest, filled on touch
        assert stats["read_ahead_pages"] >= len(pages) * 8 // 10, stats
        assert stats["faults"] <= len(pages) // 8, stats


@pytest.mark.timeout(60)
def test_alternating_directions_and_zigzags_read_exactly(pager, random_file):
    path = random_file(N * PAGE)
    data = path.read_bytes()
    patterns = {
        "zigzag-far": [q for k in range(N // 2) for q in (k, N - 1 - k)],
        "there-and-back": list(range(0, N // 2)) + list(range(N - 1, N // 2 - 1, -1)),
        "back-and-forth": [p for k in range(0, N, 16) for p in (list(range(k, k + 16)) if k % 32 else
                                                               list(range(k + 15, k - 1, -1)))],
        "pairs": [q for k in range(0, N, 2) for q in (k + 1, k)],
        "repeat": [p for p in range(N) for _ in range(2)],
    }
    for name, pages in patterns.items():
        with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
            touch(region, pages)
            stats = region.stats()
            assert differing_pages(region.view(), data) == [], name
        assert stats["copies"] + stats["zero_fills"] == N, (name, stats)
        assert stats["errors"] == 0, (name, stats)


@pytest.mark.timeout(60)
def test_a_stride_near_the_ends_of_the_region(pager, random_file):
    """Strided windows that would run past either end stop at it."""
    n = 200
    path = random_file(n * PAGE)
    data = path.read_bytes()
    for pages in ([n - 1 - 3 * k for k in range(0, 67)], [3 * k for k in range(0, 67)],
                  [n - 1 - 64 * k for k in range(4)], [64 * k for k in range(4)], [n - 1, n - 2, n - 3],
                  [2, 1, 0], [0, 1, 2]):
        with pager.map(url(path), n * PAGE, writeback_interval=0) as region:
            touch(region, pages)
            assert differing_pages(region.view(), data) == [], pages
            assert region.stats()["copies"] == n


# --- 7. Redis stalls ---------------------------------------------------------------------------------------------



@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("timeout", [None, 0.2])
def test_redis_read_ahead_across_a_stopped_server_is_exact_or_fails_loudly(private_redis_server, redis_name,
                                                                          tmp_path, order, timeout):
    """The server stops (SIGSTOP) for 0.5 s while pages are read in order.
    Within the store's timeout the reads wait and are exact; with a timeout
    shorter than the stall a page may fail (SIGBUS), but no page is ever
    read as zeros or as anything but its data."""
    store = private_redis_server.url_for(redis_name)
    if timeout is not None:
        store += f"?timeout={timeout}"
    npages = 2048
    child = subprocess.Popen([sys.executable, str(CHILDREN_PY), "redis-stall", store, str(npages), order],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        os.kill(private_redis_server.pid, signal.SIGSTOP)
        try:
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(0.5)
        finally:
            os.kill(private_redis_server.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if timeout is None:
        assert child.returncode == 0, (child.returncode, out, err[-3000:])
        assert "bad 0 zero 0" in out, out
    else:
        # Either every page arrived (then exactly) or a page failed loudly.
        assert child.returncode in (0, -signal.SIGBUS), (child.returncode, out, err[-3000:])
        if child.returncode == 0:
            assert "bad 0 zero 0" in out, out


# --- more: encrypted at an offset, pages dropped by the client ----------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["forward", "backward", "stride-3"])
def test_encrypted_read_ahead_at_an_offset_with_unwritten_pages(pager, tmp_path, order):
    """Pages of an encrypted store are opened by their index in the store
    (offset / PAGE + idx): a region at an offset reads its own pages, and
    pages never written read as zeros."""
    path = tmp_path / "sealed.bin"
    path.touch()
    key = uffd_pager.Key.generate()
    total = 3 * 512
    data = bytearray(total * PAGE)
    rng = random.Random(41)
    with pager.map(url(path), total * PAGE, key=key, writeback_interval=0) as region:
        view = region.view()
        for p in range(total):
            if rng.random() < 0.7:  # the rest never written
                page = rng.randbytes(PAGE)
                view[p * PAGE:(p + 1) * PAGE] = page
                data[p * PAGE:(p + 1) * PAGE] = page
        region.flush()
    offset_pages, npages = 300, 1000
    expected = bytes(data[offset_pages * PAGE:(offset_pages + npages) * PAGE])
    with pager.map(url(path), npages * PAGE, offset_pages * PAGE, key=key, writeback_interval=0) as region:
        touch(region, ORDERS[order](npages))
        stats = region.stats()
        assert differing_pages(region.view(), expected) == []
    assert stats["errors"] == 0 and stats["auth_failures"] == 0 and stats["read_ahead_pages"] > 0, stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_pages_dropped_by_the_client_are_read_ahead_again_from_the_file(pager, random_file, tracking):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_DONTNEED = 4
    path = random_file(N * PAGE)
    data = path.read_bytes()
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, writeback_interval=0) as region:
        touch(region, list(range(N)))
        for lo, hi in ((100, 400), (1000, 1001), (1500, 2048)):
            assert libc.madvise(region.address + lo * PAGE, (hi - lo) * PAGE, MADV_DONTNEED) == 0
        touch(region, list(range(N)))
        touch(region, list(range(N - 1, -1, -1)))
        assert differing_pages(region.view(), data) == []
        stats = region.stats()
        assert stats["errors"] == 0 and stats["copies"] >= N + 300 + 1 + 548, stats




@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_pages_dropped_while_other_threads_read_ahead_into_them(random_file, tmp_path, tracking):
    """MADV_DONTNEED (a REMOVE event) races read-ahead into the same range
    from other threads: no page may be left marked resident while it is
    missing (its thread would refault forever), and every byte is exact."""
    npages = 4096
    path = random_file(npages * PAGE)
    child = subprocess.Popen([sys.executable, str(CHILDREN_PY), "drop-race", str(path), str(npages), "4", tracking],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=80)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"the child hung (a reader refaulting forever?): {out} {err[-2000:]}")
    assert child.returncode == 0, (child.returncode, out, err[-3000:])
    assert "bad 0 " in out, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
@pytest.mark.parametrize("window", ["adaptive", "fixed-64"])
@pytest.mark.parametrize("order", ["forward", "backward", "stride-3"])
def test_redis_read_ahead_at_an_offset_with_unwritten_pages_and_writes(pager, redis_server, redis_name, order,
                                                                      window, tracking):
    store = redis_server.url_for(redis_name)
    total, offset_pages, npages = 1536, 200, 1024
    rng = random.Random(43)
    data = bytearray(total * PAGE)
    with pager.map(store, total * PAGE, writeback_interval=0) as region:
        view = region.view()
        for p in range(total):
            if rng.random() < 0.6:  # the rest never written: absent from Redis
                page = rng.randbytes(PAGE)
                view[p * PAGE:(p + 1) * PAGE] = page
                data[p * PAGE:(p + 1) * PAGE] = page
        region.flush()
    expected = bytearray(data[offset_pages * PAGE:(offset_pages + npages) * PAGE])
    with pager.map(store, npages * PAGE, offset_pages * PAGE, dirty_tracking=tracking,
                   read_ahead=WINDOWS[window], writeback_interval=0) as region:
        view = region.view()
        for p in rng.sample(range(npages), 60):  # written before anything is read ahead
            page = rng.randbytes(PAGE)
            view[p * PAGE:(p + 1) * PAGE] = page
            expected[p * PAGE:(p + 1) * PAGE] = page
        touch(region, ORDERS[order](npages))
        stats = region.stats()
        assert differing_pages(view, expected) == []
        assert region.prefetch() == 0  # every page is resident already
        assert differing_pages(view, expected) == []
    assert stats["fetch_failures"] == 0 and stats["errors"] == 0, stats
    if not (order == "backward" and window != "adaptive"):
        assert stats["read_ahead_pages"] > 0, stats


def sealed_with_a_tampered_page(pager, tmp_path, npages: int, bad: int) -> tuple[Path, uffd_pager.Key, bytes]:
    path = tmp_path / "sealed.bin"
    path.touch()
    key = uffd_pager.Key.generate()
    data = os.urandom(npages * PAGE)
    with pager.map(url(path), npages * PAGE, key=key, writeback_interval=0) as region:
        region.view()[:] = data
        region.flush()
    with open(path, "r+b") as f:
        f.seek(bad * PAGE + 100)
        byte = f.read(1)[0]
        f.seek(bad * PAGE + 100)
        f.write(bytes([byte ^ 1]))
    return path, key, data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ["forward", "backward", "stride-3"])
def test_encrypted_pages_around_a_tampered_one_read_exactly(pager, tmp_path, order, window):
    """Every page but the tampered one is touched (never the tampered one:
    that is SIGBUS): read-ahead stops before it, and pages after it are
    filled by their own faults, exactly."""
    npages, bad = 1024, 300
    path, key, data = sealed_with_a_tampered_page(pager, tmp_path, npages, bad)
    with pager.map(url(path), npages * PAGE, key=key, read_ahead=WINDOWS[window], writeback_interval=0) as region:
        touch(region, [p for p in ORDERS[order](npages) if p != bad])
        view = region.view()
        assert differing_pages(view[:bad * PAGE], data[:bad * PAGE]) == []
        assert differing_pages(view[(bad + 1) * PAGE:], data[(bad + 1) * PAGE:]) == []
        stats = region.stats()
    assert stats["errors"] == 0 and stats["poisoned"] == 0, stats
    assert stats["copies"] == npages - 1, stats


@pytest.mark.timeout(60)
def test_prefetch_of_an_encrypted_region_with_a_tampered_page(pager, tmp_path):
    npages, bad = 1024, 300
    path, key, data = sealed_with_a_tampered_page(pager, tmp_path, npages, bad)
    with pager.map(url(path), npages * PAGE, key=key, read_ahead="off", writeback_interval=0) as region:
        filled = region.prefetch()
        stats = region.stats()
        touch(region, [p for p in range(npages) if p != bad])
        view = region.view()
        assert differing_pages(view[:bad * PAGE], data[:bad * PAGE]) == []
        assert differing_pages(view[(bad + 1) * PAGE:], data[(bad + 1) * PAGE:]) == []
    assert stats["errors"] == 0 and stats["poisoned"] == 0, stats
    assert filled == stats["read_ahead_pages"] >= bad, (filled, stats)


@pytest.mark.timeout(60)
# Was a bug (fixed): prefetch() stopped at the first page that fails authentication
def test_prefetch_fills_every_page_but_a_tampered_one(pager, tmp_path):
    npages, bad = 1024, 300
    path, key, data = sealed_with_a_tampered_page(pager, tmp_path, npages, bad)
    with pager.map(url(path), npages * PAGE, key=key, read_ahead="off", writeback_interval=0) as region:
        filled = region.prefetch()
        touch(region, [p for p in range(npages) if p != bad])
        faults = region.stats()["faults"]
    assert (filled, faults) == (npages - 1, 0)


@pytest.mark.timeout(120)
def test_redis_regions_closed_with_read_ahead_in_flight(pager, redis_server, redis_name):
    """Windows of fetches are still in flight when the region closes: they
    are dropped (no internal error, checked by the fixture), and a region
    mapped again reads exactly."""
    store = redis_server.url_for(redis_name)
    npages = 2048
    data = os.urandom(npages * PAGE)
    with pager.map(store, npages * PAGE, writeback_interval=0) as region:
        region.view()[:] = data
        region.flush()
    for k in range(20):
        region = pager.map(store, npages * PAGE, read_ahead=(16 << 20) if k % 2 else "adaptive",
                           writeback_interval=0)
        touch(region, list(range(k * 50, k * 50 + 30)))
        assert bytes(region.view()[k * 50 * PAGE:(k * 50 + 30) * PAGE]) == data[k * 50 * PAGE:(k * 50 + 30) * PAGE]
        region.close()
    assert pager.alive()
    with pager.map(store, npages * PAGE, writeback_interval=0) as region:
        touch(region, list(range(npages - 1, -1, -1)))
        assert bytes(region.view()) == data
    assert pager.status()["regions"] == 0




@pytest.mark.timeout(120)
def test_redis_prefetch_while_the_server_is_stopped_returns_and_leaves_pages_to_their_faults(
        private_redis_server, redis_name, tmp_path):
    """prefetch() against a stopped server (a store timeout of 0.3 s) gives
    up on the pages it cannot fetch without poisoning any: once the server
    runs again every page is read exactly at its touch."""
    store = private_redis_server.url_for(redis_name) + "?timeout=0.3"
    child = subprocess.Popen([sys.executable, str(CHILDREN_PY), "prefetch-stall", store, "1024"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        os.kill(private_redis_server.pid, signal.SIGSTOP)
        try:
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
        finally:
            os.kill(private_redis_server.pid, signal.SIGCONT)
        assert line.startswith("prefetched"), (line, child.stderr.read()[-3000:] if child.poll() is not None else "")
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, (child.returncode, line, out, err[-3000:])
    assert "bad 0 [] alive True 0" in out, (line, out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_preallocated_and_punched_extents_read_exactly(pager, tmp_path, order, window):
    """Unwritten (fallocated) extents, some with data in the page cache only,
    and holes punched while the region is mapped: SEEK_DATA/SEEK_HOLE see
    them as the file reads."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    path = tmp_path / "prealloc.bin"
    size = N * PAGE - 77
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        rng = random.Random(8)
        for _ in range(200):
            os.pwrite(fd, rng.randbytes(rng.randrange(1, 3 * PAGE)), rng.randrange(size - 3 * PAGE))
        with pager.map(url(path), N * PAGE, read_ahead=WINDOWS[window], writeback_interval=0) as region:
            pages = ORDERS[order](N)
            touch(region, pages[:16])  # the file's mapping made
            for _ in range(30):  # holes punched, some at unaligned offsets, some rewritten at once
                at = rng.randrange(64 * PAGE, size - 64 * PAGE)
                assert libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at,
                                      rng.randrange(1, 40 * PAGE)) == 0
                if rng.random() < 0.3:
                    os.pwrite(fd, b"Z" * 33, at + 5)
            now = expected_of(path, N * PAGE)
            before = set(pages[:16])
            touch(region, pages[16:])
            view = region.view()
            stats = region.stats()
            bad = [p for p in range(N)
                   if p not in before and view[p * PAGE:(p + 1) * PAGE] != now[p * PAGE:(p + 1) * PAGE]]
    finally:
        os.close(fd)
    assert stats["errors"] == 0, stats
    # Pages filled before the punching (the first 16 touched and their
    # windows: at most 8 + 16 pages more, or the fixed window) may be old.
    early = 16 + (24 if window == "adaptive" else WINDOWS[window] // PAGE)
    early_pages = set(pages[:early])
    assert [p for p in bad if p not in early_pages] == [], bad[:20]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
@pytest.mark.parametrize("kind", ["random", "sparse"])
def test_writes_racing_read_ahead_in_the_same_region_are_all_written_back(pager, random_file, sparse_file,
                                                                         kind, tracking):
    npages = 4096
    path = random_file(npages * PAGE) if kind == "random" else \
        sparse_file(npages * PAGE, unaligned_sparse_writes(npages, seed=31))
    expected = bytearray(expected_of(path, npages * PAGE))
    rng = random.Random(37)
    targets = rng.sample(range(npages), npages // 2)
    with pager.map(url(path), npages * PAGE, dirty_tracking=tracking, writeback_interval=0) as region:
        view = region.view()

        def writer() -> None:
            for p in targets:
                view[p * PAGE + 7] = p % 251 + 1

        threads = [threading.Thread(target=touch, args=(region, list(range(npages)))),
                   threading.Thread(target=touch, args=(region, list(range(npages - 1, -1, -1)))),
                   threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        for p in targets:
            expected[p * PAGE + 7] = p % 251 + 1
        assert differing_pages(view, expected) == []
        region.flush()
        stats = region.stats()
    assert stats["errors"] == 0, stats
    assert differing_pages(expected_of(path, npages * PAGE), expected) == []


@pytest.mark.timeout(60)
# Was a bug (fixed): a strided read-ahead window copied holes with UFFDIO_COPY instead of mapping the zero page
@pytest.mark.parametrize("stride", [3, -5])
def test_holes_in_a_strided_window_are_zero_fills(pager, sparse_file, stride):
    path = sparse_file(0)  # all of it past the end of the file
    pages = list(range(0, N, stride)) if stride > 0 else list(range(N - 1, -1, stride))
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, pages)
        stats = region.stats()
        assert bytes(region.view()[:PAGE]) == bytes(PAGE)
    assert stats["read_ahead_pages"] > len(pages) // 2, stats  # the windows opened
    assert stats["copies"] == 0, stats  # as for a sequential read (see test_an_empty_file_reads_as_zeros_ahead)




@pytest.mark.timeout(120)
@pytest.mark.parametrize("window", ["adaptive", str(64 * PAGE)])
@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("kind", ["random", "sparse"])
def test_read_ahead_after_the_region_is_moved_with_mremap(random_file, sparse_file, tmp_path, kind, order, window):
    npages = 2048
    path = random_file(npages * PAGE - 55) if kind == "random" else \
        sparse_file(npages * PAGE - 55, unaligned_sparse_writes(npages, seed=13))
    result = subprocess.run([sys.executable, str(CHILDREN_PY), "remap", str(path), str(npages), order, window],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "bad 0 [] errors 0 remap 1" in result.stdout, result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("kind", ["random", "empty"])
def test_the_window_doubles_from_8_to_256_exactly_as_documented(pager, random_file, sparse_file, order, kind):
    """Forward over 2048 pages: faults at 0 (no window yet), 1 (8 pages
    ahead), 10 (16), 27 (32), 60 (64), 125 (128), 254 (256), then every 257
    pages: 13 faults, 11 of them at a window's edge."""
    path = random_file(N * PAGE) if kind == "random" else sparse_file(0)
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, ORDERS[order](N))
        stats = region.stats()
        assert bytes(region.view()) == expected_of(path, N * PAGE)
    assert (stats["faults"], stats["read_ahead_hits"], stats["read_ahead_pages"]) == (13, 11, N - 13), stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", ["file", "redis"])
def test_prefetch_racing_faults_from_other_threads(pager, random_file, redis_server, redis_name, store):
    npages = 8192
    if store == "file":
        path = random_file(npages * PAGE)
        target, data = url(path), path.read_bytes()
    else:
        target, data = redis_server.url_for(redis_name), os.urandom(npages * PAGE)
        with pager.map(target, npages * PAGE, writeback_interval=0) as region:
            region.view()[:] = data
            region.flush()
    with pager.map(target, npages * PAGE, writeback_interval=0) as region:
        threads = [threading.Thread(target=touch, args=(region, list(range(npages - 1, -1, -1)))),
                   threading.Thread(target=touch, args=(region, list(range(0, npages, 3))))]
        for t in threads:
            t.start()
        filled = region.prefetch()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert region.prefetch() == 0
        stats = region.stats()
        assert bytes(region.view()) == data
    assert 0 <= filled <= npages and stats["errors"] == 0, (filled, stats)
    if store == "file":
        assert stats["copies"] + stats["zero_fills"] == npages, stats
