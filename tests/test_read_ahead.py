"""Read-ahead and prefetch (native/readahead.c, faults.py): windows that
grow while access is sequential (forward, backward, strided) and close on
random access, filled from a file in runs (from a mapping of the file, or
opened page by page when encrypted) and from Redis in pipelined batches;
every byte exact, and never a stale page after a write, a flush or a fork
(the fork case is in test_fork.py: children read in order too)."""
from __future__ import annotations

import array
import os
import random
import time
from pathlib import Path

import pytest

import uffd_pager
from pages import differing_pages
from uffd_pager.bench import _touch

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
N = 16 * MiB // PAGE  # 4096 pages


def url(path: Path) -> str:
    return f"file://{path}"


def touch(region: uffd_pager.Region, pages: list[int]) -> None:
    """Reads one byte of each page, in the order given (in C: no Python
    between two faults, so the detector sees the order as it is)."""
    _touch(region.address, array.array("Q", (p * PAGE for p in pages)))


ORDERS = {
    "forward": lambda n: list(range(n)),
    "backward": lambda n: list(range(n - 1, -1, -1)),
    "stride-3": lambda n: list(range(0, n, 3)),
    "stride-minus-5": lambda n: list(range(n - 1, -1, -5)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ORDERS)
def test_in_order_access_is_read_ahead_and_every_byte_is_exact(pager, random_file, order):
    path = random_file(N * PAGE)
    pages = ORDERS[order](N)
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, pages)
        stats = region.stats()
        assert bytes(region.view()) == path.read_bytes()
    assert stats["read_ahead"] == "adaptive"
    # Windows double up to 256 pages: a few faults per 256 pages touched.
    assert stats["faults"] <= len(pages) // 16, stats
    assert stats["read_ahead_pages"] >= len(pages) * 9 // 10, stats
    assert stats["read_ahead_hits"] >= stats["faults"] // 2, stats


@pytest.mark.timeout(60)
def test_off_reads_one_page_per_fault_and_random_access_opens_no_window(pager, random_file):
    path = random_file(N * PAGE)
    with pager.map(url(path), N * PAGE, read_ahead="off", writeback_interval=0) as region:
        touch(region, list(range(N)))
        off = region.stats()
    assert (off["faults"], off["read_ahead_pages"], off["read_ahead"]) == (N, 0, "off")
    shuffled = list(range(N))
    random.Random(7).shuffle(shuffled)
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, shuffled)
        adaptive = region.stats()
        assert bytes(region.view()) == path.read_bytes()
    # Random faults pay nothing: a window opens only where two faults happen
    # to be neighbours (a couple of times in a shuffle), and shuts at once.
    assert adaptive["faults"] >= N * 98 // 100, adaptive
    assert adaptive["read_ahead_pages"] <= N // 100, adaptive


@pytest.mark.timeout(60)
def test_a_fixed_window_is_filled_after_every_missing_fault(pager, random_file):
    path = random_file(N * PAGE)
    window = 64 * PAGE
    with pager.map(url(path), N * PAGE, read_ahead=window, writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert bytes(region.view()) == path.read_bytes()
    assert stats["read_ahead"] == window
    assert stats["faults"] == -(-N // 65), stats  # each fault fills itself and the 64 pages after it


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["on", "sequential", 1000, 0, -4096, 32 * MiB, 4096.0, True])
def test_a_bad_read_ahead_value_is_refused_before_anything_is_mapped(pager, random_file, bad):
    path = random_file(PAGE)
    with pytest.raises(ValueError, match="read_ahead must be"):
        pager.map(url(path), PAGE, read_ahead=bad)
    assert pager.status()["regions"] == 0


@pytest.mark.timeout(60)
def test_encrypted_pages_are_read_ahead_opened_one_by_one(pager, tmp_path):
    path = tmp_path / "sealed.bin"
    path.touch()
    key = uffd_pager.Key.generate()
    data = os.urandom(N * PAGE)
    with pager.map(url(path), N * PAGE, key=key, writeback_interval=0) as region:
        region.view()[:] = data
        region.flush()
    with pager.map(url(path), N * PAGE, key=key, writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert bytes(region.view()) == data
    assert stats["faults"] <= N // 16 and stats["read_ahead_pages"] >= N * 9 // 10, stats


@pytest.mark.timeout(60)
def test_read_ahead_stops_before_a_tampered_page_whose_own_fault_is_sigbus(pager, tmp_path):
    """A page that fails authentication is never read ahead as zeros or as
    ciphertext: read-ahead stops before it, and touching it is SIGBUS (in a
    child process: the pager's poisoning of the page)."""
    import subprocess
    import sys

    path = tmp_path / "sealed.bin"
    path.touch()
    key_path = tmp_path / "k.key"
    key = uffd_pager.Key.generate()
    key_path.write_text(key.to_text())
    key_path.chmod(0o600)
    data = os.urandom(64 * PAGE)
    with pager.map(url(path), 64 * PAGE, key=key, writeback_interval=0) as region:
        region.view()[:] = data
        region.flush()
    with open(path, "r+b") as f:  # one bit of page 40's ciphertext
        f.seek(40 * PAGE + 100)
        byte = f.read(1)[0]
        f.seek(40 * PAGE + 100)
        f.write(bytes([byte ^ 1]))
    with pager.map(url(path), 64 * PAGE, key=key, writeback_interval=0) as region:
        touch(region, list(range(40)))
        stats = region.stats()
        assert bytes(region.view()[:40 * PAGE]) == data[:40 * PAGE]
        assert stats["errors"] == 0 and stats["read_ahead_pages"] > 0, stats
    child = Path(__file__).with_name("read_ahead_children.py")
    result = subprocess.run([sys.executable, str(child), "touch-page", str(path), str(key_path), "64", "40"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -11 or result.returncode == -7, (result.returncode, result.stdout, result.stderr)
    assert "before 39 ok" in result.stdout, result.stdout


@pytest.mark.timeout(60)
def test_a_file_cut_short_reads_zeros_past_its_end_and_the_pager_serves_on(pager, random_file):
    """The store file shrinks under the pager's mapping of it: pages past
    the new end read as zero (as past the end of any short file), pages
    before it are exact, and the pager does not fault on its mapping."""
    path = random_file(N * PAGE)
    original = path.read_bytes()
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, list(range(256)))  # a window is open, the mapping made
        os.truncate(path, 1000 * PAGE + 123)
        touch(region, list(range(256, N)))
        seen = bytes(region.view())
        assert seen[:1000 * PAGE + 123] == original[:1000 * PAGE + 123]
        assert seen[1000 * PAGE + 123:] == bytes(N * PAGE - 1000 * PAGE - 123)
        assert pager.alive()


@pytest.mark.timeout(60)
def test_what_is_written_and_flushed_is_what_a_new_map_reads_ahead(pager, random_file):
    path = random_file(N * PAGE)
    rng = random.Random(3)
    written = {p: os.urandom(PAGE) for p in rng.sample(range(N), 300)}
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, list(range(N // 2)))  # half of it read ahead, then written over
        view = region.view()
        for p, data in written.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        expected = bytes(view)
        region.flush()
    with pager.map(url(path), N * PAGE, writeback_interval=0) as region:
        touch(region, list(range(N)))
        assert differing_pages(region.view(), expected) == []


@pytest.mark.timeout(60)
def test_prefetch_fills_a_range_so_that_touching_it_costs_no_fault(pager, random_file):
    path = random_file(N * PAGE)
    with pager.map(url(path), N * PAGE, read_ahead="off", writeback_interval=0) as region:
        assert region.prefetch(PAGE * 10 + 1, 100 * PAGE) == 101  # pages 10..110: partial pages count whole
        touch(region, list(range(10, 111)))
        assert region.stats()["faults"] == 0
        assert region.prefetch() == N - 101
        assert region.prefetch() == 0  # everything resident: nothing to do
        assert bytes(region.view()) == path.read_bytes()
        assert region.stats()["faults"] == 0
        for offset, length in ((-1, 10), (0, N * PAGE + 1), (N * PAGE, 1)):
            with pytest.raises(ValueError, match="not within the region"):
                region.prefetch(offset, length)


# --- over Redis -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_redis_in_order_reads_are_read_ahead_in_batches_and_exact(pager, redis_server, redis_name):
    store = redis_server.url_for(redis_name)
    data = os.urandom(N * PAGE)
    with pager.map(store, N * PAGE, writeback_interval=0) as region:
        region.view()[:] = data
        region.flush()
    with pager.map(store, N * PAGE, writeback_interval=0) as region:
        touch(region, list(range(N)))
        stats = region.stats()
        assert bytes(region.view()) == data
    assert stats["faults"] <= N // 16, stats
    assert stats["read_ahead_pages"] >= N * 9 // 10 and stats["fetch_failures"] == 0, stats
    with pager.map(store, N * PAGE, writeback_interval=0) as region:
        start = time.monotonic()
        assert region.prefetch() == N
        assert time.monotonic() - start < 30
        assert bytes(region.view()) == data
        assert region.stats()["faults"] == 0
