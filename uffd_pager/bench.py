"""``uffd-pager bench``: fault latency beside the floors it is compared with.

Every row is measured by the same C timing loop (one byte read per page, in
one random page order, timed with CLOCK_MONOTONIC around each access), and
the rows are run in interleaved rounds so that the machine's drift from
minute to minute spreads over all of them alike. A figure is only a result
beside its floor from the same run: the ratio column divides each p50 by the
C reference handler running in another process, the floor of an
out-of-process pager.
"""
from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import platform
import random
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from uffd_pager.client import Pager
from uffd_pager.native import ffi, lib
from uffd_pager.uffd import PAGE_SIZE, Feature, RegisterMode, Uffd, buffer_address

FLOOR = "C reference, other process"


@dataclass
class Row:
    name: str
    p50_us: float
    p99_us: float
    mean_us: float
    faults_per_s: float
    samples: int


def _touch(address: int, offsets: array.array) -> list[int]:
    """Faults every page at address + offsets[i]; returns each latency in ns."""
    latencies = ffi.new("int64_t[]", len(offsets))
    lib.up_touch_pages(address, ffi.from_buffer("uint64_t[]", offsets), len(offsets), latencies)
    return list(latencies)


@contextlib.contextmanager
def _anonymous(size: int) -> Iterator[mmap.mmap]:
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield memory
    finally:
        memory.close()


def kernel_anonymous(path: str, size: int, offsets: array.array) -> list[int]:
    with _anonymous(size) as memory:
        return _touch(buffer_address(memory), offsets)


def kernel_file_mmap(path: str, size: int, offsets: array.array) -> list[int]:
    with open(path, "rb") as f:
        memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        memory.madvise(mmap.MADV_RANDOM)  # no fault-around: one page per fault, like ours
        return _touch(buffer_address(memory), offsets)
    finally:
        memory.close()


def _c_reference(start: Callable[..., object]) -> Callable[[str, int, array.array], list[int]]:
    def run(path: str, size: int, offsets: array.array) -> list[int]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        uffd = Uffd.create(Feature(0))
        try:
            with _anonymous(size) as memory:
                address = buffer_address(memory)
                uffd.register(address, size, RegisterMode.MISSING)
                handler = start(uffd.fd, fd, address, 0)
                if handler == ffi.NULL:
                    raise OSError(ffi.errno, "cannot start the C reference handler")
                try:
                    return _touch(address, offsets)
                finally:
                    lib.up_ref_stop(handler)
                    uffd.unregister(address, size)
        finally:
            uffd.close()
            os.close(fd)

    return run


def uffd_pager_row(pager: Pager) -> Callable[[str, int, array.array], list[int]]:
    def run(path: str, size: int, offsets: array.array) -> list[int]:
        with pager.map(f"file://{path}", size) as region:
            return _touch(region.address, offsets)

    return run


def summarize(name: str, latencies_ns: list[int]) -> Row:
    ordered = sorted(latencies_ns)
    n = len(ordered)
    total = sum(ordered)
    return Row(
        name=name,
        p50_us=ordered[n // 2] / 1000,
        p99_us=ordered[min(n - 1, (n * 99) // 100)] / 1000,
        mean_us=total / n / 1000,
        faults_per_s=n / (total / 1e9) if total else 0.0,
        samples=n,
    )


def _print_table(rows: list[Row], floor: Row) -> None:
    print(f"{'row':<34} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'faults/s':>10} {'p50 / floor':>11}")
    for row in rows:
        print(f"{row.name:<34} {row.p50_us:>8.2f} {row.p99_us:>8.2f} {row.mean_us:>8.2f} "
              f"{row.faults_per_s:>10.0f} {row.p50_us / floor.p50_us:>10.2f}x")


def run_bench(*, quick: bool = False, pages: int | None = None, directory: str | None = None,
              json_path: str | None = None) -> int:
    pages = pages or (4096 if quick else 16384)
    rounds = 3 if quick else 5
    size = pages * PAGE_SIZE
    with tempfile.TemporaryDirectory(dir=directory, prefix="uffd-pager-bench-") as tmp:
        path = os.path.join(tmp, "data.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(size))  # written just now: the page cache is hot
        rng = random.Random(1)
        order = list(range(pages))
        with Pager() as pager:
            runners: dict[str, Callable[[str, int, array.array], list[int]]] = {
                "kernel anonymous first touch": kernel_anonymous,
                "kernel file mmap (MADV_RANDOM)": kernel_file_mmap,
                "C reference, same process": _c_reference(lib.up_ref_start_thread),
                FLOOR: _c_reference(lib.up_ref_start_process),
                "uffd_pager": uffd_pager_row(pager),
            }
            samples: dict[str, list[int]] = {name: [] for name in runners}
            for _ in range(rounds):
                rng.shuffle(order)
                offsets = array.array("Q", (p * PAGE_SIZE for p in order))
                for name, runner in runners.items():
                    samples[name].extend(runner(path, size, offsets))
    rows = [summarize(name, lat) for name, lat in samples.items()]
    by_name = {row.name: row for row in rows}
    floor = by_name[FLOOR]
    ratio = by_name["uffd_pager"].p50_us / floor.p50_us
    print(f"uffd-pager bench: {pages} random 4 KiB read faults x {rounds} rounds, "
          f"{platform.release()}, {os.cpu_count()} cpus")
    _print_table(rows, floor)
    print(f"\nuffd_pager / {FLOOR}: p50 {ratio:.2f}x "
          f"(mean {by_name['uffd_pager'].mean_us / floor.mean_us:.2f}x)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({
                "kernel": platform.release(),
                "pages": pages,
                "rounds": rounds,
                "rows": [asdict(row) for row in rows],
                "ratio_p50_vs_floor": ratio,
                "floor": FLOOR,
            }, f, indent=2)
    return 0
