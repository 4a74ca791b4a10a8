"""What the native page sets and copies cost: what is set and what exists,
never the size of the address space.

* the sparse page set (native/bits.c) through cffi: leaf boundaries, the
  "full leaf" that costs no memory, counts, a model check;
* released native state is refused (EBADF), never read after it is freed;
* a madvise(MADV_DONTNEED) over a 16 TiB region with one page touched is
  served at once;
* a fork of a process holding a 1 GiB region over a 4 KiB file writes a few
  pages into the store, not 1 GiB of zeros.

Whatever can block on a fault runs in a child of this file (`python
test_native_costs.py SCENARIO ...`), waited for with a timeout.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import uffd_pager
from uffd_pager.native import ffi, lib
from uffd_pager.uffd import FillRange, PageFault, PortionState, Tracking, Uffd

PAGE = uffd_pager.PAGE_SIZE
LEAF = 32768  # bits in one leaf of a page set (see native/bits.c)
MAX_PAGES = 1 << 35  # 2^47 bytes


def new_bits(nbits: int):
    bits = lib.up_bits_new(nbits)
    assert bits != ffi.NULL, os.strerror(ffi.errno)
    return ffi.gc(bits, lib.up_bits_free)


def members(bits, end: int) -> list[tuple[int, int]]:
    """The set's runs [first, stop) below end, found with next_set/next_clear."""
    runs, i = [], 0
    while (first := lib.up_bits_next_set(bits, i, end)) < end:
        i = lib.up_bits_next_clear(bits, first, end)
        runs.append((first, i))
    return runs


# --- 1. the sparse page set ------------------------------------------------------------


def test_a_range_over_whole_leaves_is_set_without_memory_and_one_cleared_bit_splits_it():
    nbits = 3 * LEAF + 100
    bits = new_bits(nbits)
    assert lib.up_bits_set_range(bits, LEAF, 3 * LEAF) == 2 * LEAF
    assert lib.up_bits_set_range(bits, LEAF, 3 * LEAF) == 0, "setting set bits again counts nothing"
    assert lib.up_bits_count(bits) == 2 * LEAF
    assert [lib.up_bits_test(bits, i) for i in (LEAF - 1, LEAF, 3 * LEAF - 1, 3 * LEAF)] == [0, 1, 1, 0]
    assert members(bits, nbits) == [(LEAF, 3 * LEAF)]

    assert lib.up_bits_clear_range(bits, LEAF + 5, LEAF + 6) == 1  # the full leaf becomes a real one
    assert lib.up_bits_count(bits) == 2 * LEAF - 1
    assert lib.up_bits_test(bits, LEAF + 5) == 0 and lib.up_bits_test(bits, LEAF + 4) == 1
    assert lib.up_bits_next_clear(bits, LEAF, nbits) == LEAF + 5
    assert lib.up_bits_next_set(bits, LEAF + 5, nbits) == LEAF + 6
    assert members(bits, nbits) == [(LEAF, LEAF + 5), (LEAF + 6, 3 * LEAF)]

    assert lib.up_bits_clear_range(bits, 0, nbits) == 2 * LEAF - 1
    assert lib.up_bits_count(bits) == 0
    assert lib.up_bits_next_set(bits, 0, nbits) == nbits
    assert lib.up_bits_next_clear(bits, 0, nbits) == 0


def test_the_short_last_leaf_and_indices_past_the_end():
    nbits = LEAF + 100
    bits = new_bits(nbits)
    assert lib.up_bits_set_range(bits, LEAF, nbits + 1000) == 100, "a range past the end is clipped"
    assert lib.up_bits_count(bits) == 100
    assert lib.up_bits_test(bits, nbits - 1) == 1 and lib.up_bits_test(bits, nbits) == 0
    # Indices past the end are clear: next_clear finds the first of them.
    assert lib.up_bits_next_clear(bits, LEAF, nbits) == nbits
    assert lib.up_bits_next_clear(bits, LEAF, nbits + 50) == nbits
    assert lib.up_bits_next_set(bits, nbits, nbits + 50) == nbits + 50
    assert lib.up_bits_clear_range(bits, nbits - 1, nbits) == 1
    assert lib.up_bits_next_clear(bits, LEAF, nbits) == nbits - 1
    assert lib.up_bits_set_range(bits, 0, nbits) == nbits - 99
    assert lib.up_bits_count(bits) == nbits
    assert lib.up_bits_next_clear(bits, 0, nbits) == nbits


@pytest.mark.parametrize("first,stop", [(63, 65), (0, 64), (64, 128), (LEAF - 1, LEAF + 1), (5, 6)])
def test_word_and_leaf_boundaries(first, stop):
    bits = new_bits(4 * LEAF)
    assert lib.up_bits_set_range(bits, first, stop) == stop - first
    assert members(bits, 4 * LEAF) == [(first, stop)]
    assert lib.up_bits_next_set(bits, first + 1, 4 * LEAF) == (first + 1 if first + 1 < stop else 4 * LEAF)
    assert lib.up_bits_next_clear(bits, first, stop) == stop, "no clear bit within the range: its end"


def test_operations_agree_with_a_model_of_the_set():
    rng = random.Random(8)
    nbits = 2 * LEAF + 777
    bits = new_bits(nbits)
    model = 0  # bit i of the integer is bit i of the set

    def popcount(x: int) -> int:
        return bin(x).count("1")

    for _ in range(400):
        kind = rng.random()
        if kind < 0.3:  # whole leaves, and the short last one
            first = rng.randrange(3) * LEAF
            stop = min(nbits, first + LEAF * rng.randint(1, 3))
        else:
            first = rng.randrange(nbits)
            stop = min(nbits, first + rng.choice([1, 2, 63, 64, 65, 1000, LEAF, 2 * LEAF]))
        span = ((1 << (stop - first)) - 1) << first
        if rng.random() < 0.55:
            assert lib.up_bits_set_range(bits, first, stop) == popcount(span & ~model)
            model |= span
        else:
            assert lib.up_bits_clear_range(bits, first, stop) == popcount(span & model)
            model &= ~span
        assert lib.up_bits_count(bits) == popcount(model)
        for _ in range(4):
            at, end = sorted(rng.randrange(nbits + 1) for _ in range(2))
            above = (model >> at) & ((1 << (end - at)) - 1)
            expect_set = at + (above & -above).bit_length() - 1 if above else end
            clear = ~model >> at & ((1 << (end - at)) - 1)
            expect_clear = at + (clear & -clear).bit_length() - 1 if clear else end
            assert lib.up_bits_next_set(bits, at, end) == expect_set
            assert lib.up_bits_next_clear(bits, at, end) == expect_clear
            if at < nbits:
                assert lib.up_bits_test(bits, at) == (model >> at) & 1
    rebuilt = 0
    for first, stop in members(bits, nbits):
        rebuilt |= ((1 << (stop - first)) - 1) << first
    assert rebuilt == model


def test_or_into_adds_full_leaves_partial_leaves_and_counts_only_what_is_new():
    nbits = 3 * LEAF + 10
    src, dst = new_bits(nbits), new_bits(nbits)
    lib.up_bits_set_range(src, 0, LEAF)  # a full leaf
    lib.up_bits_set_range(src, LEAF + 3, LEAF + 9)  # a partial one
    lib.up_bits_set_range(src, 3 * LEAF, nbits)  # the short last leaf, full
    lib.up_bits_set_range(dst, 5, 7)  # already set in dst
    lib.up_bits_set_range(dst, 2 * LEAF, 2 * LEAF + 4)  # only in dst
    assert lib.up_bits_or_into(dst, src) == LEAF - 2 + 6 + 10
    assert lib.up_bits_count(dst) == LEAF + 6 + 10 + 4
    assert members(dst, nbits) == [(0, LEAF), (LEAF + 3, LEAF + 9), (2 * LEAF, 2 * LEAF + 4), (3 * LEAF, nbits)]
    assert lib.up_bits_or_into(dst, src) == 0


@pytest.mark.timeout(30)
def test_the_largest_set_costs_what_is_set_not_its_range():
    assert lib.up_bits_new(MAX_PAGES + 1) == ffi.NULL and ffi.errno == errno.EINVAL, "past 2^47 bytes of pages"
    started = time.monotonic()
    bits = new_bits(MAX_PAGES)  # 128 TiB of pages
    for page in (0, 12345, MAX_PAGES // 2, MAX_PAGES - 1):
        assert lib.up_bits_set_range(bits, page, page + 1) == 1
    assert members(bits, MAX_PAGES) == [(0, 1), (12345, 12346), (MAX_PAGES // 2, MAX_PAGES // 2 + 1),
                                        (MAX_PAGES - 1, MAX_PAGES)]
    assert lib.up_bits_clear_range(bits, 0, MAX_PAGES) == 4
    assert lib.up_bits_set_range(bits, 0, MAX_PAGES) == MAX_PAGES  # full leaves only: no leaf memory
    assert lib.up_bits_clear_range(bits, 7, MAX_PAGES - 7) == MAX_PAGES - 14
    assert members(bits, MAX_PAGES) == [(0, 7), (MAX_PAGES - 7, MAX_PAGES)]
    took = time.monotonic() - started
    assert took < 2.0, f"walking a 2^35-bit set took {took:.2f} s"


# --- 2. released native state is refused -----------------------------------------------


def test_released_portion_and_fill_state_refuse_every_call(tmp_path):
    npages = 16
    store = tmp_path / "store.bin"
    store.write_bytes(os.urandom(npages * PAGE))
    fd = os.open(store, os.O_RDWR)
    try:
        root = PortionState(npages)
        root.place(fd, 0)
        child = PortionState(npages, root)
        child.place(fd, npages * PAGE)
        fill = FillRange(0x10000000, npages * PAGE, child, Tracking.SYNC_WP)
        assert child.copy_in(0, 2) == 2

        root.close()
        root.close()  # idempotent
        # A child whose parent was released: every call refuses, in Python and in C.
        for call in (lambda: child.copy_in(0, npages), lambda: child.mark(0, 1), lambda: child.has(0),
                     lambda: child.missing(), lambda: child.next_missing(0, npages),
                     lambda: child.source_run(2, npages), lambda: PortionState(npages, root),
                     lambda: fill.serve(Uffd(-1)), lambda: fill.fill_fault(Uffd(-1), PageFault(0x10000000, 0, 0)),
                     lambda: fill.take_dirty(Uffd(-1)), lambda: fill.forget(0, 1 << 40)):
            with pytest.raises(OSError) as caught:
                call()
            assert caught.value.errno == errno.EBADF and "was released" in str(caught.value)
        copied = ffi.new("uint64_t *")
        assert lib.up_portion_copy_in(child._c, 0, npages, copied) == -1 and ffi.errno == errno.EBADF
        assert lib.up_fill_fault(-1, fill._c, 0x10000000, 0) == -errno.EBADF
        deferred, n = ffi.new("struct up_msg[]", 4), ffi.new("int *")
        assert lib.up_serve(-1, fill._c, deferred, 4, n) == -1 and ffi.errno == errno.EBADF

        child.close()
        fill.close()
        fill.close()
        assert lib.up_portion_has(child._c, 0) == 0 and lib.up_portion_missing(child._c) == 0
        assert lib.up_fill_is_dirty(fill._c, 0x10000000) == 0
        assert lib.up_fill_forget(fill._c, 0, 1 << 40) == -1 and ffi.errno == errno.EBADF
        with pytest.raises(OSError) as caught:
            fill.is_dirty(0x10000000)
        assert caught.value.errno == errno.EBADF
        assert fill.counters()["faults"] == 0 and child.placed, "plain attributes stay readable"
    finally:
        os.close(fd)


# --- 3. copies between portions cost the pages that exist --------------------------------


def _blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // PAGE  # in pages


@pytest.mark.timeout(60)
def test_copy_in_copies_the_data_segments_of_each_source_and_writes_no_zeros(tmp_path):
    npages = (1 << 30) // PAGE  # a 1 GiB region over a 4 KiB file
    store = tmp_path / "store.bin"
    data = os.urandom(PAGE)
    store.write_bytes(data)
    fd = os.open(store, os.O_RDWR)
    try:
        root = PortionState(npages)
        root.place(fd, 0)
        child = PortionState(npages, root)
        assert child.source_run(0, npages) == (1, npages), "an unplaced child holds nothing"
        child.place(fd, 1 << 30)
        os.pwrite(fd, b"B" * PAGE, (1 << 30) + 3 * PAGE)  # the child's own write-back of page 3
        child.mark(3, 1)
        grandchild = PortionState(npages, child)
        grandchild.place(fd, 2 << 30)
        assert grandchild.source_run(0, npages) == (2, 3)
        assert grandchild.source_run(3, npages) == (1, 4)
        assert grandchild.source_run(4, npages) == (2, npages)
        assert root.next_stored(0, npages) == 0 and root.next_stored(1, npages) == npages

        started = time.monotonic()
        assert grandchild.copy_in(0, npages) == npages
        assert child.copy_in(0, npages) == npages - 1
        took = time.monotonic() - started
        assert grandchild.missing() == 0 and child.missing() == 0
        assert grandchild.next_missing(0, npages) == npages
        assert grandchild.copy_in(0, npages) == 0, "nothing is left to copy"
        assert _blocks(store) <= 8, f"the copies wrote {_blocks(store)} pages into the store"
        assert took < 2.0, f"copying 1 GiB that holds 3 pages of data took {took:.2f} s"
        for base in (1 << 30, 2 << 30):
            assert os.pread(fd, PAGE, base) == data
            assert os.pread(fd, PAGE, base + 3 * PAGE) == b"B" * PAGE
            assert os.pread(fd, PAGE, base + 4 * PAGE).ljust(PAGE, b"\0") == bytes(PAGE)  # past EOF: zero
    finally:
        os.close(fd)


# --- 4. a program's madvise(DONTNEED) over a huge sparse region --------------------------


def _dontneed_scenario(path: str, tracking: str) -> dict:
    size = 16 << 40
    data = Path(path).read_bytes()
    with uffd_pager.Pager() as pager:
        region = pager.map("file://" + path, size, dirty_tracking=tracking, writeback_interval=0)
        view = region.view()
        assert bytes(view[PAGE:2 * PAGE]) == data[PAGE:2 * PAGE]
        view[PAGE:PAGE + 5] = b"dirty"  # dropped by the madvise below, never written back
        before = region.stats()
        started = time.monotonic()
        region._memory.madvise(mmap.MADV_DONTNEED, 0, size)  # waits until the pager reads the event
        first_page = bytes(view[PAGE:2 * PAGE])  # waits until the pager has applied it
        took = time.monotonic() - started
        after = region.stats()
        del view
        region.close()
    return {"took": took, "reads_store": first_page == data[PAGE:2 * PAGE],
            "resident_before": before["resident_pages"], "resident_after": after["resident_pages"],
            "dirty_after": after["dirty_pages"], "removes": after["events"]["remove"]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["async", "sync"])
def test_dontneed_over_a_16_tib_region_with_one_page_touched_is_served_at_once(tmp_path, tracking):
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(4 * PAGE))
    report = _run_scenario("dontneed", str(path), tracking)
    assert report["reads_store"], "after MADV_DONTNEED the page does not read the store's bytes"
    assert report["removes"] == 1
    assert report["resident_before"] == 1 and report["resident_after"] == 1
    assert report["dirty_after"] == 0
    assert report["took"] < 2.0, f"MADV_DONTNEED over 16 TiB stalled the pager for {report['took']:.2f} s"


# --- 5. fork of a process holding a 1 GiB region over a 4 KiB file -------------------------


def _fork_scenario(path: str, policy: str, encrypted: str) -> dict:
    size = 1 << 30
    key = uffd_pager.Key.generate() if encrypted == "yes" else None
    with uffd_pager.Pager() as pager:
        region = pager.map("file://" + path, size, fork_policy=policy, writeback_interval=0, key=key)
        view = region.view()
        data = os.urandom(PAGE)
        view[:PAGE] = data
        region.flush()
        blocks_before = _blocks(Path(path))
        rfd, wfd = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                region.stats()  # claims the child's copy of the region
                child_view = region.view()
                reads = bytes(child_view[:PAGE]) == data and bytes(child_view[5 * PAGE:6 * PAGE]) == bytes(PAGE)
                child_view[7 * PAGE:8 * PAGE] = b"c" * PAGE
                flush_started = time.monotonic()
                region.flush()
                flush_took = time.monotonic() - flush_started
                os.write(wfd, json.dumps({"reads": reads, "flush_took": flush_took,
                                          "offset": region.backing().offset}).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        ready, _, _ = select.select([rfd], [], [], 60)
        child = json.loads(os.read(rfd, 1 << 16)) if ready else {"reads": False, "offset": None}
        fork_took = time.monotonic() - started
        os.close(rfd)
        os.waitpid(pid, 0)
        blocks_after = _blocks(Path(path))
        catalog = Path(path + ".uffd-catalog")
        fresh = pager.map("file://" + path, size, offset=child["offset"], writeback_interval=0, key=key)
        fresh_view = fresh.view()
        child_portion = [bytes(fresh_view[p * PAGE:(p + 1) * PAGE]) for p in (0, 5, 7)]
        del fresh_view
        fresh.close()
        parent_reads = bytes(view[:PAGE]) == data and bytes(view[7 * PAGE:8 * PAGE]) == bytes(PAGE)
        del view
        region.close()
    return {"child_reads": child["reads"], "parent_reads": parent_reads, "fork_took": fork_took,
            "flush_took": child.get("flush_took"), "pages_written_at_fork": blocks_after - blocks_before,
            "catalog_pages": _blocks(catalog) if catalog.exists() else 0,
            "child_portion_reads": child_portion == [data, bytes(PAGE), b"c" * PAGE]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("encrypted", ["no", "yes"], ids=["plain", "encrypted"])
@pytest.mark.parametrize("policy", ["at-fork", "on-write"])
def test_fork_of_a_1_gib_region_over_a_4_kib_file_writes_a_few_pages(tmp_path, policy, encrypted):
    path = tmp_path / "store.bin"
    path.touch()
    report = _run_scenario("fork", str(path), policy, encrypted)
    assert report["child_reads"], "the child does not read the parent's data as of the fork"
    assert report["parent_reads"], "the parent's view changed"
    assert report["child_portion_reads"], "the child's portion does not hold the child's view"
    # The child's copy of page 0 and its own page 7 (and the file system's rounding).
    assert report["pages_written_at_fork"] <= 8, f"the fork wrote {report['pages_written_at_fork']} pages"
    assert report["catalog_pages"] <= 8, f"the catalog grew to {report['catalog_pages']} pages"


# --- children ----------------------------------------------------------------------------

SCENARIOS = {"dontneed": _dontneed_scenario, "fork": _fork_scenario}


def _run_scenario(name: str, *args: str, timeout: float = 100) -> dict:
    result = subprocess.run([sys.executable, __file__, name, *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"scenario {name} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]](*sys.argv[2:])), flush=True)
