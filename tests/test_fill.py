"""Pages are filled from the store on first touch: every byte equals the file,
holes and the tail read as zero, huge sparse regions cost only what is touched,
a page is filled once however many threads fault on it, and close() leaves
nothing behind."""
from __future__ import annotations

import gc
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest

import uffd_pager

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
TiB = 1 << 40
# Child processes, one function each (run as `python fill_children.py NAME ARGS...`).
FILL_CHILDREN_PY = Path(__file__).with_name("fill_children.py")


# --- every byte equals the file --------------------------------------------------


def read_pages_in_random_order(region: uffd_pager.Region, path: Path) -> list[int]:
    data = path.read_bytes()
    view = region.view()
    pages = list(range(region.size // PAGE))
    random.shuffle(pages)
    return [p for p in pages if view[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE]]


def read_pages_from_four_threads(region: uffd_pager.Region, path: Path) -> list[int]:
    data = path.read_bytes()
    view = region.view()
    differing: list[int] = []
    start = threading.Barrier(4)

    def read_all_pages() -> None:
        pages = list(range(region.size // PAGE))
        random.shuffle(pages)
        start.wait()
        differing.extend(p for p in pages if view[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE])

    threads = [threading.Thread(target=read_all_pages) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(set(differing))


def read_with_numpy(region: uffd_pager.Region, path: Path) -> list[int]:
    mapped = numpy.frombuffer(region.view(), dtype=numpy.uint8)
    stored = numpy.fromfile(path, dtype=numpy.uint8)
    differs = (mapped != stored).reshape(-1, PAGE).any(axis=1)
    return numpy.flatnonzero(differs).tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("read", [read_pages_in_random_order, read_pages_from_four_threads, read_with_numpy],
                         ids=["random-page-order", "four-threads", "numpy"])
def test_every_byte_of_a_64_mib_region_equals_the_file(pager, random_file, read):
    path = random_file(64 * MiB)
    with pager.map(f"file://{path}", 64 * MiB) as region:
        assert read(region, path) == [], "these pages differ from the file"
        stats = region.stats()
    assert stats["copies"] == stats["resident_pages"] == 64 * MiB // PAGE
    assert stats["errors"] == stats["poisoned"] == 0


# --- holes, the end of the file, offsets -------------------------------------------------


@pytest.mark.timeout(30)
def test_holes_and_pages_past_eof_read_as_zero(pager, sparse_file):
    written = {3 * PAGE: b"three", 10 * PAGE: os.urandom(PAGE), 11 * PAGE + 100: b"eleven"}
    path = sparse_file(16 * PAGE, written)
    expected = bytearray(32 * PAGE)  # 16 pages of file, holes but three, then 16 past EOF
    for offset, data in written.items():
        expected[offset:offset + len(data)] = data
    with pager.map(f"file://{path}", 32 * PAGE) as region:
        mapped = bytes(region.view())
        stats = region.stats()
    assert mapped == expected
    assert (stats["copies"], stats["zero_fills"]) == (3, 29)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tail", [b"hello", bytes(8) + b"tail", b"x" * (PAGE - 1)],
                         ids=["5-bytes", "8-zero-bytes-then-4", "page-less-one"])
def test_the_last_partial_page_of_a_file_reads_its_bytes_then_zeros(pager, tmp_path, tail):
    path = tmp_path / "odd-size.bin"
    first_page = os.urandom(PAGE)
    path.write_bytes(first_page + tail)
    with pager.map(f"file://{path}", 3 * PAGE) as region:
        mapped = bytes(region.view())
    assert mapped[:PAGE] == first_page
    assert mapped[PAGE:2 * PAGE] == tail + bytes(PAGE - len(tail))
    assert mapped[2 * PAGE:] == bytes(PAGE)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("offset_pages", [1, 7, 16])
def test_a_region_at_an_offset_maps_the_file_from_that_offset_on(pager, random_file, offset_pages):
    path = random_file(16 * PAGE)
    data = path.read_bytes()
    offset = offset_pages * PAGE
    with pager.map(f"file://{path}", 16 * PAGE, offset=offset) as region:
        mapped = bytes(region.view())
    assert mapped == data[offset:].ljust(16 * PAGE, b"\0")


# --- a huge sparse region ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_1_tib_sparse_region_maps_at_once_and_costs_only_the_pages_touched(pager, sparse_file):
    npages = TiB // PAGE
    rng = random.Random(1)
    written = {page: os.urandom(64) for page in rng.sample(range(npages), 100)}
    path = sparse_file(TiB, {page * PAGE: data for page, data in written.items()})
    touched = rng.sample(range(npages), 2000) + list(written)
    rss_before = pager.status()["rss_kib"]

    started = time.monotonic()
    region = pager.map(f"file://{path}", TiB)
    mapping_took = time.monotonic() - started
    with region:
        view = region.view()
        differing = [page for page in touched
                     if view[page * PAGE:page * PAGE + 64] != written.get(page, bytes(64))]
        del view
        assert differing == []
        assert region.stats()["resident_pages"] == len(set(touched))
        rss_growth = (pager.status()["rss_kib"] - rss_before) * 1024
    assert mapping_took < 1.0
    # One bit per page of the whole region would be 32 MiB; per page touched,
    # at most 2100 pages of bitmap (8.2 MiB).
    assert rss_growth < 16 * MiB, f"the pager grew by {rss_growth / MiB:.1f} MiB for {len(touched)} pages"


# --- concurrent faults on one page ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_faults_on_one_page_are_served_once(pager, random_file):
    path = random_file(16 * PAGE)
    data = path.read_bytes()
    read: dict[int, list[bytes]] = {}
    with pager.map(f"file://{path}", 16 * PAGE, read_ahead="off") as region:  # each page its own faults
        view = region.view()
        for page in range(16):
            at = slice(page * PAGE, (page + 1) * PAGE)
            start, read[page] = threading.Barrier(8), []

            def read_page() -> None:
                start.wait()
                # hashlib releases the GIL for a page: the 8 threads fault at once.
                read[page].append(hashlib.sha256(view[at]).digest())

            threads = [threading.Thread(target=read_page) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        del view
        stats = region.stats()
    for page, digests in read.items():
        assert digests == [hashlib.sha256(data[page * PAGE:(page + 1) * PAGE]).digest()] * 8
    assert stats["copies"] == stats["resident_pages"] == 16
    assert stats["faults"] == stats["copies"] + stats["duplicates"]


# --- close() -------------------------------------------------------------------------------


def close_region(pager, region):
    region.close()


def leave_with_block(pager, region):
    with region:
        pass


def close_pager(pager, region):
    pager.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("close", [close_region, leave_with_block, close_pager])
def test_close_unregisters_and_unmaps(pager, random_file, this_process, close):
    path = random_file(16 * MiB)
    fds = this_process.uffd_fds()
    region = pager.map(f"file://{path}", 16 * MiB)
    assert this_process.uffd_fds() == fds + 1
    assert this_process.maps_all_of(region.address, region.size)
    byte = region.view()[5 * PAGE]
    assert byte == path.read_bytes()[5 * PAGE]

    close(pager, region)

    assert region.closed
    assert not this_process.maps_all_of(region.address, region.size), "the region is still mapped"
    assert this_process.uffd_fds() == fds, "the region's userfaultfd is still open"
    with pytest.raises(ValueError):
        region.view()
    with pytest.raises(ValueError):
        region.stats()


@pytest.mark.timeout(30)
def test_a_region_dropped_without_close_releases_its_userfaultfd(pager, random_file, this_process):
    path = random_file(16 * PAGE)
    fds = this_process.uffd_fds()
    region = pager.map(f"file://{path}", 16 * PAGE)
    first_page = bytes(region.view()[:PAGE])
    del region
    gc.collect()
    assert first_page == path.read_bytes()[:PAGE]
    assert this_process.uffd_fds() == fds, "the dropped region's userfaultfd is still open"


@pytest.mark.timeout(30)
def test_pager_forgets_a_closed_region(pager, random_file):
    path = random_file(PAGE)
    before = pager.status()
    pager.map(f"file://{path}", PAGE).close()
    after = pager.status()
    assert (after["regions"], after["open_fds"]) == (before["regions"], before["open_fds"])


@pytest.mark.timeout(30)
def test_closing_a_region_whose_view_is_still_alive_unmaps_it_once_the_view_is_released(
        pager, random_file, this_process):
    # The README's own usage: `view = region.view()` inside `with pager.map(...)`.
    path = random_file(16 * MiB)
    fds = this_process.uffd_fds()
    with pager.map(f"file://{path}", 16 * MiB) as region:
        view = region.view()
        byte = view[0]
    assert byte == path.read_bytes()[0]
    assert region.closed
    assert this_process.uffd_fds() == fds
    del view
    assert not this_process.maps_all_of(region.address, region.size)


@pytest.mark.timeout(60)
def test_a_view_used_after_close_faults_instead_of_reading_stale_bytes(random_file):
    path = random_file(4 * PAGE)
    # The "view-used-after-close" function of tests/fill_children.py.
    result = subprocess.run([sys.executable, str(FILL_CHILDREN_PY), "view-used-after-close", str(path), str(4 * PAGE)],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "closed\n", result.stderr
    assert result.returncode == -11, f"status {result.returncode}: {result.stderr}"
