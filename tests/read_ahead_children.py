"""Child processes for tests/test_read_ahead.py and
tests/test_read_ahead_adversarial.py, as importable code.

Run one as ``python read_ahead_children.py NAME ARGS...``; plain ``print``
lines on stdout. A child that touches a poisoned page dies of SIGBUS, so
nothing after that access runs.
"""
from __future__ import annotations

import array
import ctypes
import os
import random
import sys
import threading
import time

import uffd_pager
from child import PlainRegistry
from uffd_pager.bench import _touch

PAGE = uffd_pager.PAGE_SIZE

CHILDREN = PlainRegistry()
child = CHILDREN.register


@child("touch-page")
def touch_page(path: str, key_file: str, npages: str, bad: str) -> None:
    """Reads pages 0..bad-1 of an encrypted store in order (read-ahead
    windows open), then page `bad`, which does not authenticate: SIGBUS."""
    with uffd_pager.Pager() as pager:
        region = pager.map(f"file://{path}", int(npages) * PAGE, key_file=key_file, writeback_interval=0)
        _touch(region.address, array.array("Q", (p * PAGE for p in range(int(bad)))))
        print(f"before {int(bad) - 1} ok", flush=True)
        _touch(region.address, array.array("Q", [int(bad) * PAGE]))
        print("read the tampered page", flush=True)


@child("redis-stall")
def redis_stall(store: str, npages_arg: str, order: str) -> None:
    """Writes a Redis region, maps it again and, once told the server is
    stopped, reads it in order; reports the pages that differ (and those
    read as zeros)."""
    npages = int(npages_arg)
    data = random.Random(1).randbytes(npages * PAGE)
    with uffd_pager.Pager() as pager:
        with pager.map(store, npages * PAGE, writeback_interval=0) as region:
            region.view()[:] = data
            region.flush()
        region = pager.map(store, npages * PAGE, writeback_interval=0)
        pages = list(range(npages)) if order == "forward" else list(range(npages - 1, -1, -1))
        print("ready", flush=True)
        sys.stdin.readline()  # the server is stopped now
        for k in range(0, npages, 8):
            _touch(region.address, array.array("Q", (p * PAGE for p in pages[k:k + 8])))
        print("touched", flush=True)
        view = region.view()
        bad = [p for p in range(npages) if view[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE]]
        zero = [p for p in bad if view[p * PAGE:(p + 1) * PAGE] == bytes(PAGE)]
        print("stats", region.stats(), flush=True)
        print("bad", len(bad), "zero", len(zero), bad[:20], flush=True)
        region.close()


@child("drop-race")
def drop_race(path: str, npages_arg: str, seconds_arg: str, tracking: str) -> None:
    """Two threads read a region in order (either way) while a third drops
    random ranges with MADV_DONTNEED; then every byte is checked."""
    npages, seconds = int(npages_arg), float(seconds_arg)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    data = open(path, "rb").read()
    with uffd_pager.Pager() as pager:
        region = pager.map("file://" + path, npages * PAGE, dirty_tracking=tracking, writeback_interval=0)
        stop = time.monotonic() + seconds
        def reader(backward):
            order = list(range(npages - 1, -1, -1)) if backward else list(range(npages))
            while time.monotonic() < stop:
                _touch(region.address, array.array("Q", (p * PAGE for p in order)))
        def dropper():
            rng = random.Random(5)
            while time.monotonic() < stop:
                lo = rng.randrange(npages)
                n = rng.randrange(1, 300)
                n = min(n, npages - lo)
                assert libc.madvise(region.address + lo * PAGE, n * PAGE, 4) == 0
        threads = [threading.Thread(target=reader, args=(False,), daemon=True),
                   threading.Thread(target=reader, args=(True,), daemon=True),
                   threading.Thread(target=dropper, daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 20)
        if any(t.is_alive() for t in threads):
            print("HUNG", region.stats(), flush=True)
            os._exit(3)
        _touch(region.address, array.array("Q", (p * PAGE for p in range(npages))))
        view = region.view()
        bad = [p for p in range(npages) if view[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE]]
        print("bad", len(bad), bad[:10], region.stats()["duplicates"], flush=True)
        region.close()


@child("prefetch-stall")
def prefetch_stall(store: str, npages_arg: str) -> None:
    """prefetch() of a Redis region while its server is stopped, then every page read once it runs again."""
    npages = int(npages_arg)
    data = random.Random(2).randbytes(npages * PAGE)
    with uffd_pager.Pager() as pager:
        with pager.map(store.split("?")[0], npages * PAGE, writeback_interval=0) as region:
            region.view()[:] = data
            region.flush()
        region = pager.map(store, npages * PAGE, writeback_interval=0)
        print("ready", flush=True)
        sys.stdin.readline()  # the server is stopped now
        print("prefetched", region.prefetch(), flush=True)
        sys.stdin.readline()  # the server runs again
        _touch(region.address, array.array("Q", (p * PAGE for p in range(npages))))
        view = region.view()
        bad = [p for p in range(npages) if view[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE]]
        print("stats", region.stats(), flush=True)
        print("bad", len(bad), bad[:20], "alive", pager.alive(), pager.status()["internal_errors"], flush=True)
        region.close()


@child("remap")
def remap(path: str, npages_arg: str, order: str, window_arg: str) -> None:
    """Reads part of a region, moves it with mremap, reads the rest at the new address."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.mremap.restype = ctypes.c_void_p
    npages = int(npages_arg)
    window = int(window_arg) if window_arg.isdigit() else window_arg
    size = npages * PAGE
    data = open(path, "rb").read()[:size]
    data += bytes(size - len(data))
    with uffd_pager.Pager() as pager:
        region = pager.map("file://" + path, size, read_ahead=window, writeback_interval=0)
        pages = list(range(npages)) if order == "forward" else list(range(npages - 1, -1, -1))
        _touch(region.address, array.array("Q", (p * PAGE for p in pages[:300])))
        target = libc.mmap(None, size, 0, 0x22, -1, 0)
        new = libc.mremap(region.address, size, size, 3, target)
        assert new == target, (new, target)
        _touch(new, array.array("Q", (p * PAGE for p in pages[300:])))
        seen = ctypes.string_at(new, size)
        bad = [p for p in range(npages) if seen[p * PAGE:(p + 1) * PAGE] != data[p * PAGE:(p + 1) * PAGE]]
        stats = region.stats()
        print("bad", len(bad), bad[:20], "errors", stats["errors"], "remap", stats["events"]["remap"],
              "ahead", stats["read_ahead_pages"], flush=True)
        region.close()


if __name__ == "__main__":
    CHILDREN.main()
