"""``uffd-pager bench``: fault latency and write-back beside their floors.

Every latency row is measured by the same C timing loop (one byte read or
written per page, in one random page order, timed with CLOCK_MONOTONIC
around each access), and all rows run in interleaved rounds so that the
machine's drift from minute to minute spreads over all of them alike. A
figure is only a result beside its floor from the same run: each row names
its floor and prints the ratio to it.

Floors: for read faults, the C reference handler (poll + read + pread +
UFFDIO_COPY) in another process, the floor of an out-of-process pager; for
writes, the kernel doing the same work for its own mappings (anonymous first
write; first write to a clean page of a MAP_SHARED file mapping, which is
the kernel's own dirty tracking); for write-back, the kernel's msync(MS_SYNC)
of a MAP_SHARED mapping of the same file with the same pages written.
"""
from __future__ import annotations

import array
import contextlib
import math
import mmap
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from uffd_pager.catalog import forget_store
from uffd_pager.client import Pager
from uffd_pager.crypto import Key
from uffd_pager.layout import READ_AHEAD_MAX
from uffd_pager.bench_progress import Progress
from uffd_pager.native import ffi, lib
from uffd_pager.uffd import PAGE_SIZE, Feature, RegisterMode, Uffd, buffer_address

READ_FLOOR = "read: C reference, other process"
OURS = "read: uffd_pager"
OURS_NO_READ_AHEAD = "read: uffd_pager, read-ahead off"
SEQUENTIAL_BYTES = 512 << 20  # 128 MiB with --quick
CDF_POINTS = 257  # quantiles kept of a latency row: 0, 1/256, ..., 1 (min and max included)


@dataclass
class Row:
    name: str
    floor: str
    p50_us: float
    p99_us: float
    mean_us: float
    per_s: float
    unit: str
    samples: int
    ratio: float = 0.0
    # A latency row's distribution for the report's CDF plots: cdf_us[i] is
    # the latency at quantile i / (len - 1), so a saved run plots without
    # keeping every sample. Empty for throughput rows (one sample a round).
    cdf_us: list[float] = field(default_factory=list)


@dataclass
class Results:
    """A run: what the table shows, what --json saves and --report plots."""

    title: str  # the line above the table
    rows: list[Row]
    notes: list[str]  # the lines below it: the ratios the README quotes
    kernel: str
    pages: int
    rounds: int


def quantiles_us(ordered_ns: list[int], points: int = CDF_POINTS) -> list[float]:
    """`points` quantiles (in us, 3 decimals: ns) of sorted samples in ns, evenly spaced from min to max."""
    last = len(ordered_ns) - 1
    if last < 0:
        return []
    return [round(ordered_ns[round(i * last / (points - 1))] / 1000, 3) for i in range(points)]


@dataclass
class Case:
    """What a row measures, given the file, its size and the page offsets."""

    name: str
    floor: str
    run: Callable[["Workload"], list[int]]
    unit: str = "faults/s"


@dataclass
class Workload:
    path: str
    size: int
    offsets: array.array
    pager: Pager
    key: Key


def _touch(address: int, offsets: array.array, *, write: bool = False) -> list[int]:
    """Touches every page at address + offsets[i]; returns each latency in ns."""
    latencies = ffi.new("int64_t[]", len(offsets))
    lib.up_touch_pages(address, ffi.from_buffer("uint64_t[]", offsets), len(offsets), int(write), latencies)
    return list(latencies)


@contextlib.contextmanager
def _anonymous(size: int) -> Iterator[mmap.mmap]:
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield memory
    finally:
        memory.close()


@contextlib.contextmanager
def _file_mapping(path: str, size: int, *, shared: bool) -> Iterator[mmap.mmap]:
    with open(path, "r+b") as f:
        memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
    try:
        memory.madvise(mmap.MADV_RANDOM)  # no fault-around: one page per fault, like ours
        yield memory
    finally:
        memory.close()


# --- read faults ------------------------------------------------------------------


def kernel_anonymous(w: Workload, *, write: bool = False) -> list[int]:
    with _anonymous(w.size) as memory:
        return _touch(buffer_address(memory), w.offsets, write=write)


def kernel_file_read(w: Workload) -> list[int]:
    with _file_mapping(w.path, w.size, shared=False) as memory:
        return _touch(buffer_address(memory), w.offsets)


@contextlib.contextmanager
def _c_handled(path: str, size: int, start: Callable[..., object]) -> Iterator[int]:
    """Anonymous memory of `size` bytes whose faults a C reference handler
    serves from the file at path: start(uffd, file fd, address, file
    offset) starts it. Yields the memory's address."""
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
                yield address
            finally:
                lib.up_ref_stop(handler)
                uffd.unregister(address, size)
    finally:
        uffd.close()
        os.close(fd)


def _c_reference(start: Callable[..., object]) -> Callable[[Workload], list[int]]:
    def run(w: Workload) -> list[int]:
        with _c_handled(w.path, w.size, start) as address:
            return _touch(address, w.offsets)

    return run


def _pager_map(w: Workload, tracking: str):
    return w.pager.map(f"file://{w.path}", w.size, dirty_tracking=tracking, writeback_interval=0)


def pager_read(w: Workload) -> list[int]:
    with _pager_map(w, "async") as region:
        return _touch(region.address, w.offsets)


def pager_read_off(w: Workload) -> list[int]:
    with w.pager.map(f"file://{w.path}", w.size, read_ahead="off", writeback_interval=0) as region:
        return _touch(region.address, w.offsets)


def pager_read_encrypted(w: Workload) -> list[int]:
    """Read faults of pages stored encrypted (written and flushed first)."""
    with w.pager.map(f"file://{w.path}", w.size, key=w.key, writeback_interval=0) as region:
        _touch(region.address, w.offsets, write=True)
    with w.pager.map(f"file://{w.path}", w.size, key=w.key, writeback_interval=0) as region:
        return _touch(region.address, w.offsets)


PAIR_SLICE = 256  # faults of one kind between two of the other


def _taking_turns(ours: int, theirs: int, offsets: array.array,
                  latencies: tuple[list[int], list[int]] | None = None) -> list[float]:
    """Read faults over two regions mapped side by side (at addresses ours
    and theirs) taking turns, PAIR_SLICE pages at a time, who goes first
    alternating: the p50 ratio ours / theirs of each pair of slices. This
    machine's wake-up latency swings several-fold within seconds; a ratio
    of rows measured a minute apart says more about the minute than about
    what the rows differ in. latencies: lists that get every fault's ns,
    ours and theirs, for rows printed beside the ratios."""
    ratios = []
    for n, first in enumerate(range(0, len(offsets), PAIR_SLICE)):
        part = offsets[first:first + PAIR_SLICE]
        if n % 2:
            mine, other = _touch(ours, part), _touch(theirs, part)
        else:
            other, mine = _touch(theirs, part), _touch(ours, part)
        ratios.append(statistics.median(mine) / statistics.median(other))
        if latencies is not None:
            latencies[0].extend(mine)
            latencies[1].extend(other)
    return ratios


def paired_read_ahead_ratios(pager: Pager, path: str, offsets: array.array) -> list[float]:
    """Random read faults with read-ahead (adaptive) beside without, taking turns."""
    size = os.path.getsize(path)
    with pager.map(f"file://{path}", size, writeback_interval=0) as adaptive, \
            pager.map(f"file://{path}", size, read_ahead="off", writeback_interval=0) as off:
        return _taking_turns(adaptive.address, off.address, offsets)


def paired_encrypted_ratios(pager: Pager, directory: str, state: str, pristine: str, key: Key,
                            offsets: array.array) -> list[float]:
    """Encrypted beside plain read faults, taking turns (see _taking_turns)."""
    plain_path, sealed_path = os.path.join(directory, "paired-plain.bin"), os.path.join(directory, "paired-sealed.bin")
    shutil.copyfile(pristine, plain_path)
    size = os.path.getsize(pristine)
    with open(sealed_path, "wb"):
        pass  # sealed anew below: every page written through the key
    with pager.map(f"file://{sealed_path}", size, key=key, writeback_interval=0) as region:
        _touch(region.address, offsets, write=True)
    with pager.map(f"file://{plain_path}", size, writeback_interval=0) as plain, \
            pager.map(f"file://{sealed_path}", size, key=key, writeback_interval=0) as sealed:
        ratios = _taking_turns(sealed.address, plain.address, offsets)
    forget_store(sealed_path, state)
    os.unlink(sealed_path)
    return ratios


# --- writes -----------------------------------------------------------------------


def pager_first_write(tracking: str) -> Callable[[Workload], list[int]]:
    """A write to a page never touched: one MISSING fault, filled writable."""
    def run(w: Workload) -> list[int]:
        with _pager_map(w, tracking) as region:
            latencies = _touch(region.address, w.offsets, write=True)
            region.flush()
            return latencies
    return run


def pager_write_resident(tracking: str) -> Callable[[Workload], list[int]]:
    """A first write to a page already read (resident, clean): the cost of
    dirty tracking alone."""
    def run(w: Workload) -> list[int]:
        with _pager_map(w, tracking) as region:
            _touch(region.address, w.offsets)
            latencies = _touch(region.address, w.offsets, write=True)
            region.flush()
            return latencies
    return run


def kernel_shared_write_resident(w: Workload) -> list[int]:
    with _file_mapping(w.path, w.size, shared=True) as memory:
        address = buffer_address(memory)
        _touch(address, w.offsets)
        latencies = _touch(address, w.offsets, write=True)
        memory.flush()
        return latencies


# --- write-back throughput: one sample per round, in ns per page ---------------------


def _per_page(elapsed_ns: int, pages: int) -> list[int]:
    return [elapsed_ns // max(pages, 1)]


def kernel_msync(w: Workload) -> list[int]:
    with _file_mapping(w.path, w.size, shared=True) as memory:
        _touch(buffer_address(memory), w.offsets, write=True)
        start = time.perf_counter_ns()
        memory.flush()  # msync(MS_SYNC)
        return _per_page(time.perf_counter_ns() - start, len(w.offsets))


def pager_flush(tracking: str, *, encrypted: bool = False) -> Callable[[Workload], list[int]]:
    def run(w: Workload) -> list[int]:
        with w.pager.map(f"file://{w.path}", w.size, dirty_tracking=tracking, writeback_interval=0,
                         key=w.key if encrypted else None) as region:
            _touch(region.address, w.offsets, write=True)
            start = time.perf_counter_ns()
            region.flush()
            return _per_page(time.perf_counter_ns() - start, len(w.offsets))
    return run


FIRST_WRITE_FLOOR = "write: kernel anonymous first write"
TRACKING_FLOOR = "write: kernel MAP_SHARED, resident clean page"
WRITEBACK_FLOOR = "write-back: kernel msync(MS_SYNC)"

CASES = [
    Case("read: kernel anonymous first touch", READ_FLOOR, kernel_anonymous),
    Case("read: kernel file mmap (MADV_RANDOM)", READ_FLOOR, kernel_file_read),
    Case("read: C reference, same process", READ_FLOOR, _c_reference(lib.up_ref_start_thread)),
    Case(READ_FLOOR, READ_FLOOR, _c_reference(lib.up_ref_start_process)),
    Case(OURS, READ_FLOOR, pager_read),
    Case(OURS_NO_READ_AHEAD, READ_FLOOR, pager_read_off),
    Case("read: uffd_pager encrypted", OURS, pager_read_encrypted),
    Case(FIRST_WRITE_FLOOR, FIRST_WRITE_FLOOR, lambda w: kernel_anonymous(w, write=True)),
    Case("write: uffd_pager fresh page, async", FIRST_WRITE_FLOOR, pager_first_write("async")),
    Case("write: uffd_pager fresh page, sync", FIRST_WRITE_FLOOR, pager_first_write("sync")),
    Case(TRACKING_FLOOR, TRACKING_FLOOR, kernel_shared_write_resident),
    Case("write: uffd_pager resident clean, async", TRACKING_FLOOR, pager_write_resident("async")),
    Case("write: uffd_pager resident clean, sync", TRACKING_FLOOR, pager_write_resident("sync")),
    Case(WRITEBACK_FLOOR, WRITEBACK_FLOOR, kernel_msync, unit="MB/s"),
    Case("write-back: uffd_pager flush, async", WRITEBACK_FLOOR, pager_flush("async"), unit="MB/s"),
    Case("write-back: uffd_pager flush, sync", WRITEBACK_FLOOR, pager_flush("sync"), unit="MB/s"),
    Case("write-back: uffd_pager flush, encrypted", "write-back: uffd_pager flush, async",
         pager_flush("async", encrypted=True), unit="MB/s"),
]


# --- sequential reads: read-ahead ---------------------------------------------------

SEQ_KERNEL = "sequential: kernel file mmap"
SEQ_FLOOR = f"sequential: C reference, {READ_AHEAD_MAX // PAGE_SIZE}-page copies from a mapping"
SEQ_OURS = "sequential: uffd_pager, read-ahead adaptive"
SEQ_OFF = "sequential: uffd_pager, read-ahead off"


def _elapsed_per_page(touch: Callable[[], object], pages: int) -> list[int]:
    start = time.perf_counter_ns()
    touch()
    return _per_page(time.perf_counter_ns() - start, pages)


def kernel_scan_ns(path: str) -> int:
    """The kernel's mmap of the whole file read a byte a page in order
    (read-only, private): the nanoseconds it took. Run here, and in a
    memory cgroup by bench_scan.py."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        offsets = array.array("Q", range(0, size, PAGE_SIZE))
        start = time.perf_counter_ns()
        _touch(buffer_address(memory), offsets)
        return time.perf_counter_ns() - start
    finally:
        memory.close()


def sequential_samples(pager: Pager, path: str, rounds: int, progress: Progress) -> dict[str, list[int]]:
    """A file region read in order, a byte a page (ns per page, one sample a
    round): the kernel's mmap of the file (with its own read-ahead and
    fault-around), the clustered C reference (another process; the same
    largest window as ours, copied from a mapping of the file), uffd_pager
    with adaptive read-ahead and without. The file is in the page cache."""
    size = os.path.getsize(path)
    pages = size // PAGE_SIZE
    offsets = array.array("Q", range(0, size, PAGE_SIZE))
    samples: dict[str, list[int]] = {SEQ_KERNEL: [], SEQ_FLOOR: [], SEQ_OURS: [], SEQ_OFF: []}
    with open(path, "rb") as f:
        while f.read(8 << 20):  # into the page cache
            pass
    for round_ in range(1, rounds + 1):
        progress.step(f"round {round_}/{rounds}: {SEQ_KERNEL}")
        samples[SEQ_KERNEL] += _per_page(kernel_scan_ns(path), pages)
        progress.step(f"round {round_}/{rounds}: {SEQ_FLOOR}")
        samples[SEQ_FLOOR] += _clustered_reference(path, size, offsets)
        for name, read_ahead in ((SEQ_OURS, "adaptive"), (SEQ_OFF, "off")):
            progress.step(f"round {round_}/{rounds}: {name}")
            with pager.map(f"file://{path}", size, read_ahead=read_ahead, writeback_interval=0) as region:
                samples[name] += _elapsed_per_page(lambda: _touch(region.address, offsets), pages)
    return samples


def _clustered_reference(path: str, size: int, offsets: array.array) -> list[int]:
    def start(uffd: int, fd: int, address: int, offset: int) -> object:
        return lib.up_ref_start_cluster_process(uffd, fd, address, offset, size, READ_AHEAD_MAX // PAGE_SIZE)

    with _c_handled(path, size, start) as address:
        return _elapsed_per_page(lambda: _touch(address, offsets), size // PAGE_SIZE)


SEQUENTIAL_CASES = [
    Case(SEQ_KERNEL, SEQ_KERNEL, lambda w: [], unit="MB/s"),
    Case(SEQ_FLOOR, SEQ_FLOOR, lambda w: [], unit="MB/s"),
    Case(SEQ_OURS, SEQ_FLOOR, lambda w: [], unit="MB/s"),
    Case(SEQ_OFF, SEQ_FLOOR, lambda w: [], unit="MB/s"),
]


# --- out of core: a region 4x its cap -------------------------------------------------

OOC_KERNEL = "out-of-core: kernel mmap, memory cgroup of 1/4"
OOC_OURS = "out-of-core: uffd_pager, max_resident 1/4"
CGROUP_ROOT = "/sys/fs/cgroup/memory"


def has_memory_cgroup() -> bool:
    """Whether the kernel's out-of-core row can run: a memory cgroup (v1) to cap it."""
    return os.path.exists(os.path.join(CGROUP_ROOT, "memory.limit_in_bytes"))


def _drop_cache(path: str) -> None:
    """The file out of the page cache: both sides of the out-of-core rows
    read it from the disk, the kernel's under its cgroup's cap."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def out_of_core_samples(pager: Pager, path: str, rounds: int, progress: Progress) -> dict[str, list[int]]:
    """A sequential scan of a file region 4x larger than a memory cap (ns
    per page, one sample a round): the kernel's mmap of the file in a child
    process in a memory cgroup (v1) capped at a quarter of it, and
    uffd_pager with max_resident a quarter of it. Without a memory cgroup
    the kernel's row is left out."""
    size = os.path.getsize(path)
    pages = size // PAGE_SIZE
    samples: dict[str, list[int]] = {OOC_KERNEL: [], OOC_OURS: []}
    offsets = array.array("Q", range(0, size, PAGE_SIZE))
    group = None
    if has_memory_cgroup():
        group = os.path.join(CGROUP_ROOT, f"uffd-pager-bench-{os.getpid()}")
        os.makedirs(group, exist_ok=True)
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(size // 4))
    try:
        for round_ in range(1, rounds + 1):
            if group is not None:
                progress.step(f"round {round_}/{rounds}: {OOC_KERNEL}")
                _drop_cache(path)
                procs = os.path.join(group, "cgroup.procs")
                result = subprocess.run(
                    [sys.executable, "-m", "uffd_pager.bench_scan", path], capture_output=True, text=True,
                    timeout=600, preexec_fn=lambda: _join(procs), check=True)
                samples[OOC_KERNEL] += _per_page(int(result.stdout.split()[0]), pages)
            progress.step(f"round {round_}/{rounds}: {OOC_OURS}")
            _drop_cache(path)
            with pager.map(f"file://{path}", size, max_resident=size // 4,
                           writeback_interval=0) as region:
                samples[OOC_OURS] += _elapsed_per_page(lambda: _touch(region.address, offsets), pages)
    finally:
        if group is not None:
            for _ in range(50):
                try:
                    os.rmdir(group)
                    break
                except OSError:
                    time.sleep(0.1)
    return samples


def _join(procs: str) -> None:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))


OUT_OF_CORE_CASES = [
    Case(OOC_KERNEL, OOC_KERNEL, lambda w: [], unit="MB/s"),
    Case(OOC_OURS, OOC_KERNEL, lambda w: [], unit="MB/s"),
]


# --- fork ----------------------------------------------------------------------------

FORK_FLOOR = "fork: process without the region"
FORK_ANON = "fork: plain anonymous 1 GiB, 10% resident"
CHILD_FLOOR = "fork: parent first-touch read fault"
FORK_REGION = 1 << 30
FORK_RESIDENT = 0.10


def _time_forks(count: int) -> list[int]:
    """Wall time of os.fork() in the parent; each child exits at once."""
    times = []
    for _ in range(count):
        start = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter_ns() - start)
        os.waitpid(pid, 0)
    return times


def _child_touch(address: int, offsets: array.array) -> list[int]:
    """First-touch latencies measured in a forked child, sent back by pipe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            data = array.array("q", _touch(address, offsets)).tobytes()
            with os.fdopen(wfd, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        result = array.array("q", pipe.read())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if len(result) != len(offsets):
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise RuntimeError(f"the forked child sent {len(result)} of {len(offsets)} latencies ({how})")
    return list(result)


def fork_samples(pager: Pager, directory: str, forks: int, faults: int) -> dict[str, list[int]]:
    """fork() of this process while it holds a 1 GiB region with 10% of its
    pages resident, beside fork() without it; and a child's first-touch read
    faults beside the parent's, on pages missing at fork."""
    path = os.path.join(directory, "fork.bin")
    with open(path, "wb") as f:
        f.truncate(FORK_REGION)  # sparse: written pages are made resident below
    samples = {FORK_FLOOR: _time_forks(forks // 2)}
    pages = FORK_REGION // PAGE_SIZE
    rng = random.Random(2)
    chosen = rng.sample(range(pages), int(pages * FORK_RESIDENT) + 2 * faults)
    resident = array.array("Q", (p * PAGE_SIZE for p in chosen[: int(pages * FORK_RESIDENT)]))
    # The kernel's own cost for such memory: copying its page tables.
    with _anonymous(FORK_REGION) as memory:
        _touch(buffer_address(memory), resident, write=True)
        samples[FORK_ANON] = _time_forks(forks)
    parent_pages = array.array("Q", (p * PAGE_SIZE for p in chosen[len(resident): len(resident) + faults]))
    child_pages = array.array("Q", (p * PAGE_SIZE for p in chosen[len(resident) + faults:]))
    for policy in ("on-write",):
        with pager.map(f"file://{path}", FORK_REGION, fork_policy=policy, writeback_interval=0) as region:
            _touch(region.address, resident, write=True)
            samples[f"fork: with region, {policy}"] = _time_forks(forks)
            samples[CHILD_FLOOR] = _touch(region.address, parent_pages)
            samples["fork: child first-touch read fault"] = _child_touch(region.address, child_pages)
    samples[FORK_FLOOR] += _time_forks(forks - forks // 2)
    return samples


FORK_CASES = [
    Case(FORK_FLOOR, FORK_FLOOR, lambda w: [], unit="forks/s"),
    Case(FORK_ANON, FORK_FLOOR, lambda w: [], unit="forks/s"),
    Case("fork: with region, on-write", FORK_FLOOR, lambda w: [], unit="forks/s"),
    Case(CHILD_FLOOR, CHILD_FLOOR, lambda w: []),
    Case("fork: child first-touch read fault", CHILD_FLOOR, lambda w: []),
]


def summarize(case: Case, latencies_ns: list[int]) -> Row:
    ordered = sorted(latencies_ns)
    n = len(ordered)
    mean_ns = sum(ordered) / n
    rate = 1e9 / mean_ns if mean_ns else 0.0
    if case.unit == "MB/s":
        # One sample per round: the median round resists a noisy one.
        rate = PAGE_SIZE / (ordered[n // 2] / 1e9) / 1e6
    return Row(
        name=case.name,
        floor=case.floor,
        p50_us=ordered[n // 2] / 1000,
        p99_us=ordered[min(n - 1, (n * 99) // 100)] / 1000,
        mean_us=mean_ns / 1000,
        per_s=rate,
        unit=case.unit,
        samples=n,
        cdf_us=[] if case.unit == "MB/s" else quantiles_us(ordered),
    )


def ratio(value: float, floor: float) -> float:
    """value / floor; NaN when the floor figure is 0, which leaves nothing to compare with."""
    return value / floor if floor else math.nan


def format_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value < 0.01:
        return "<0.01x"  # "0.00x" would read as "costs nothing"
    return f"{value:.2f}x"


def format_difference(us: float) -> str:
    """A signed difference: "+2.41 us", "-1.06 us"."""
    return f"{us:+.2f} us"


# (header, alignment): names and units read from the left, numbers line up on the right.
COLUMNS = (("row", "<"), ("p50 us", ">"), ("p99 us", ">"), ("mean us", ">"), ("rate", ">"), ("", "<"),
           ("vs floor", ">"))


def format_table(rows: list[Row]) -> list[str]:
    """The table's lines, each column as wide as its widest cell."""
    table = [tuple(header for header, _ in COLUMNS)]
    for row in rows:
        table.append((row.name, f"{row.p50_us:.2f}", f"{row.p99_us:.2f}", f"{row.mean_us:.2f}",
                      f"{row.per_s:.0f}", row.unit,
                      "(floor)" if row.name == row.floor else format_ratio(row.ratio)))
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return ["  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in zip(line, COLUMNS, widths))
            for line in table]


def format_sequential(by_name: dict[str, Row]) -> str:
    ours, floor = by_name[SEQ_OURS], by_name[SEQ_FLOOR]
    return (f"sequential read: uffd_pager {ours.per_s:.0f} MB/s vs the clustered C reference {floor.per_s:.0f} MB/s = "
            f"{format_ratio(ratio(ours.per_s, floor.per_s))} its throughput (kernel mmap {by_name[SEQ_KERNEL].per_s:.0f} "
            f"MB/s, uffd_pager without read-ahead {by_name[SEQ_OFF].per_s:.0f} MB/s)")


def format_summary(by_name: dict[str, Row]) -> list[str]:
    """The ratios the README quotes, each figure beside its floor."""
    fork_row = by_name["fork: with region, on-write"]
    encrypted = by_name["read: uffd_pager encrypted"]
    encrypted_flush = by_name["write-back: uffd_pager flush, encrypted"]
    msync = by_name[WRITEBACK_FLOOR]
    lines = [
        f"{OURS} / {READ_FLOOR}: p50 {format_ratio(by_name[OURS].ratio)}",
        f"fork with a 1 GiB region (10% resident), on-write: p50 {format_ratio(fork_row.ratio)} fork without it, "
        f"{format_ratio(ratio(fork_row.p50_us, by_name[FORK_ANON].p50_us))} fork with plain anonymous memory "
        f"of that size and residency; child first touch: p50 "
        f"{format_ratio(by_name['fork: child first-touch read fault'].ratio)} the parent's",
        f"encrypted read fault: p50 {format_difference(encrypted.p50_us - by_name[OURS].p50_us)} over unencrypted; "
        f"encrypted write-back: {encrypted_flush.per_s:.0f} MB/s = "
        f"{format_ratio(ratio(encrypted_flush.per_s, by_name['write-back: uffd_pager flush, async'].per_s))} "
        "unencrypted",
    ]
    for tracking in ("async", "sync"):
        ours = by_name[f"write-back: uffd_pager flush, {tracking}"]
        lines.append(f"write-back {tracking}: {ours.per_s:.0f} MB/s vs msync {msync.per_s:.0f} MB/s "
                     f"= {format_ratio(ratio(ours.per_s, msync.per_s))} the kernel's throughput")
    return lines


def run_bench(*, quick: bool = False, pages: int | None = None, directory: str | None = None) -> Results:
    """Runs the benchmark (progress on stderr), prints its table and notes on stdout, returns them."""
    if pages is None:
        pages = 4096 if quick else 16384
    rounds = 3 if quick else 5
    size = pages * PAGE_SIZE
    samples: dict[str, list[int]] = {case.name: [] for case in CASES}
    progress = Progress("uffd-pager bench", rounds * (len(CASES) + 2) + 1 + rounds * len(SEQUENTIAL_CASES)
                        + rounds * (2 if has_memory_cgroup() else 1))
    with tempfile.TemporaryDirectory(dir=directory, prefix="uffd-pager-bench-") as tmp:
        pristine = os.path.join(tmp, "pristine.bin")
        with open(pristine, "wb") as f:
            f.write(os.urandom(size))
        rng = random.Random(1)
        order = list(range(pages))
        key = Key.generate()
        paired: dict[str, list[float]] = {"encrypted / unencrypted": [], "read-ahead adaptive / off": []}
        state = os.path.join(tmp, "state")  # the encrypted rows' anchors, gone with the run
        with Pager(state_dir=state) as pager:
            for round_ in range(1, rounds + 1):
                rng.shuffle(order)
                offsets = array.array("Q", (p * PAGE_SIZE for p in order))
                for case in CASES:
                    progress.step(f"round {round_}/{rounds}: {case.name}")
                    # Each row starts from the same bytes, hot in the page cache.
                    # (An encrypted row's store is forgotten: the next row starts it anew.)
                    path = os.path.join(tmp, "data.bin")
                    forget_store(path, state)
                    shutil.copyfile(pristine, path)
                    samples[case.name].extend(case.run(Workload(path, size, offsets, pager, key)))
                progress.step(f"round {round_}/{rounds}: read faults encrypted / unencrypted, taking turns")
                paired["encrypted / unencrypted"] += paired_encrypted_ratios(pager, tmp, state, pristine, key, offsets)
                progress.step(f"round {round_}/{rounds}: read faults read-ahead adaptive / off, taking turns")
                paired["read-ahead adaptive / off"] += paired_read_ahead_ratios(pager, pristine, offsets)
            progress.step("fork() with and without a 1 GiB region, and a child's faults")
            samples.update(fork_samples(pager, tmp, forks=20 if quick else 60, faults=1000 if quick else 4000))
            sequential = os.path.join(tmp, "sequential.bin")
            with open(sequential, "wb") as f:
                for _ in range(SEQUENTIAL_BYTES // (4 if quick else 1) // (8 << 20)):
                    f.write(os.urandom(8 << 20))
            samples.update(sequential_samples(pager, sequential, rounds, progress))
            samples.update(out_of_core_samples(pager, sequential, rounds, progress))
    progress.finish()
    out_of_core = OUT_OF_CORE_CASES if samples[OOC_KERNEL] else [Case(OOC_OURS, OOC_OURS, lambda w: [], unit="MB/s")]
    rows = [summarize(case, samples[case.name]) for case in CASES + SEQUENTIAL_CASES + out_of_core + FORK_CASES]
    by_name = {row.name: row for row in rows}
    for row in rows:
        # Latency: lower is better, ratio = ours / floor. Throughput rows keep
        # the same sense (time per page), so 1.0x or less is at least as fast.
        row.ratio = ratio(row.p50_us, by_name[row.floor].p50_us)
    notes = format_summary(by_name) + [format_sequential(by_name)]
    if OOC_KERNEL in by_name:
        ours, kernel = by_name[OOC_OURS], by_name[OOC_KERNEL]
        notes.append(f"out-of-core scan (a region 4x its cap, from the disk): uffd_pager {ours.per_s:.0f} MB/s vs the "
                     f"kernel's mmap in a memory cgroup of the same cap {kernel.per_s:.0f} MB/s = "
                     f"{format_ratio(ratio(ours.per_s, kernel.per_s))} its throughput")
    for what, ratios in paired.items():
        ratios.sort()
        notes.append(f"random read faults {what}, taking turns {min(PAIR_SLICE, pages)} faults at a time "
                     f"({len(ratios)} pairs): p50 ratio median {format_ratio(statistics.median(ratios))}, "
                     f"min {format_ratio(ratios[0])}, max {format_ratio(ratios[-1])}")
    results = Results(title=f"uffd-pager bench: {pages} random 4 KiB pages x {rounds} rounds, "
                            f"Linux {platform.release()}, {os.cpu_count()} cpus",
                      rows=rows, notes=notes, kernel=platform.release(), pages=pages, rounds=rounds)
    print_results(results)
    return results


def print_results(results: Results) -> None:
    """The table and its notes on stdout, as scripts read them."""
    print(results.title)
    print("\n".join(format_table(results.rows)))
    print()
    print("\n".join(results.notes))
