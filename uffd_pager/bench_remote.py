"""``uffd-pager bench --store redis|redis+unix``: remote-memory faults and
write-back beside their floors, from one run.

The benchmark starts its own redis-server (Debian's, from PATH) in a temp
dir, on a free loopback port or a Unix socket, without persistence, and
stops it at the end. Floors, measured in the same rounds as the rows:
- the C reference handler's uffd round trip (another process, pread +
  UFFDIO_COPY from a file in the page cache): what any pager pays;
- a plain 4 KiB GET round trip through the same client library (redis-py's
  asyncio client with hiredis, on uvloop, as the pager uses it);
- their sum, which is what a remote fault cannot go below;
- the stricter floor the pager's fault path is built on: a GET over a bare
  hiredis connection (redis_wire.py, which the pager reads faults with), and
  its sum with the uffd round trip;
- for write-back, a pipelined SET loop of the same pages through the same
  library (batches of 256, as many bytes as the flush writes).
"""
from __future__ import annotations

import array
import contextlib
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Iterator

from uffd_pager.bench import (Case, Results, Row, Workload, _c_reference, _touch, format_ratio, print_results,
                               summarize)
from uffd_pager.bench_progress import Progress
from uffd_pager.client import Pager
from uffd_pager.crypto import Key
from uffd_pager.native import lib
from uffd_pager.stores.redis_wire import Wire
from uffd_pager.uffd import PAGE_SIZE

SEQUENTIAL_BYTES = 64 << 20
SLICE = 256  # random faults measured between two measurements of the floors
C_FLOOR = "floor: C reference uffd round trip"
GET_FLOOR = "floor: redis-py GET 4 KiB"
SUM_FLOOR = "floor: C uffd round trip + GET"
SET_FLOOR = "floor: redis-py pipelined SET loop"
WIRE_FLOOR = "floor: bare hiredis GET 4 KiB"
WIRE_SUM_FLOOR = "floor: C uffd round trip + bare GET"
OURS = "read: uffd_pager over {store}"
SEQUENTIAL = "sequential read over {store}"
FLUSH = "write-back: uffd_pager flush over {store}"
OUT_OF_CORE = "out-of-core: sequential over {store}, max_resident 1/4"


@contextlib.contextmanager
def redis_server(directory: str, unix: bool) -> Iterator[tuple[str, dict[str, object]]]:
    """A private redis-server: (the URL prefix, redis-py connection kwargs)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: install Debian's redis-server (./test.sh does)")
    sock_path = os.path.join(directory, "redis.sock")
    if unix:
        port = 0
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", directory, "--daemonize", "no", "--logfile", os.path.join(directory, "redis.log")]
    if unix:
        args += ["--unixsocket", sock_path, "--unixsocketperm", "700"]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kwargs: dict[str, object] = {"unix_socket_path": sock_path} if unix else {"host": "127.0.0.1", "port": port}
        deadline = time.monotonic() + 10
        while True:
            try:
                if unix:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(sock_path)
                else:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (see {directory}/redis.log)") from None
                time.sleep(0.05)
        prefix = f"redis+unix://{sock_path}?name=" if unix else f"redis://127.0.0.1:{port}/"
        yield prefix, kwargs
    finally:
        process.kill()
        process.wait()


async def _get_round_trips(kwargs: dict[str, object], count: int) -> list[int]:
    from redis.asyncio import Redis

    client = Redis(**kwargs)  # type: ignore[arg-type]
    try:
        await client.set(b"bench:get", os.urandom(PAGE_SIZE))
        times = []
        for _ in range(count):
            start = time.perf_counter_ns()
            await client.get(b"bench:get")
            times.append(time.perf_counter_ns() - start)
        return times
    finally:
        await client.aclose()


async def _wire_round_trips(kwargs: dict[str, object], count: int) -> list[int]:
    wire = Wire(unix_path=kwargs.get("unix_socket_path"), host=kwargs.get("host"),  # type: ignore[arg-type]
                port=kwargs.get("port", 0))  # type: ignore[arg-type]
    try:
        await wire.request([(b"SET", b"bench:get", os.urandom(PAGE_SIZE))])
        times = []
        for _ in range(count):
            start = time.perf_counter_ns()
            await wire.request([(b"GET", b"bench:get")])
            times.append(time.perf_counter_ns() - start)
        return times
    finally:
        wire.close()


async def _set_loop(kwargs: dict[str, object], pages: int) -> list[int]:
    from redis.asyncio import Redis

    client = Redis(**kwargs)  # type: ignore[arg-type]
    payload = [os.urandom(PAGE_SIZE) for _ in range(64)]
    try:
        start = time.perf_counter_ns()
        for first in range(0, pages, 256):
            pipe = client.pipeline(transaction=False)
            for p in range(first, min(first + 256, pages)):
                pipe.set(b"bench:set:%d" % p, payload[p % 64])
            await pipe.execute()
        return [(time.perf_counter_ns() - start) // max(pages, 1)]
    finally:
        await client.aclose()


def _asyncio(coro: object) -> list[int]:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


REMOTE_STEPS = 5  # per round: flush, SET loop, random faults beside the floors, sequential, out of core


def run_remote_bench(store: str, *, quick: bool = False, pages: int | None = None,
                     directory: str | None = None) -> Results:
    """Runs the benchmark (progress on stderr), prints its table and notes on stdout, returns them."""
    pages = pages or (2048 if quick else 8192)
    rounds = 3 if quick else 5
    size = pages * PAGE_SIZE
    unix = store == "redis+unix"
    names = {k: v.format(store=store) for k, v in (("ours", OURS), ("seq", SEQUENTIAL), ("flush", FLUSH),
                                                    ("ooc", OUT_OF_CORE))}
    samples: dict[str, list[int]] = {n: [] for n in (C_FLOOR, GET_FLOOR, WIRE_FLOOR, SET_FLOOR, *names.values())}
    progress = Progress(f"uffd-pager bench --store {store}", rounds * REMOTE_STEPS)
    with tempfile.TemporaryDirectory(dir=directory, prefix="uffd-pager-bench-") as tmp, \
            redis_server(tmp, unix) as (prefix, kwargs), Pager(state_dir=os.path.join(tmp, "state")) as pager:
        data_path = os.path.join(tmp, "data.bin")
        with open(data_path, "wb") as f:
            f.write(os.urandom(size))
        rng = random.Random(1)
        key = Key.generate()
        slices: list[tuple[float, float]] = []  # per slice: ours / (uffd + GET), ours / (uffd + bare GET)
        order = list(range(pages))
        for round_ in range(rounds):
            step = f"round {round_ + 1}/{rounds}: "
            rng.shuffle(order)
            offsets = array.array("Q", (p * PAGE_SIZE for p in order))
            url = f"{prefix}bench{round_}"
            progress.step(step + names["flush"])
            with pager.map(url, size, writeback_interval=0) as region:
                _touch(region.address, offsets, write=True)  # every page written: none is a hole
                start = time.perf_counter_ns()
                region.flush()
                samples[names["flush"]].append((time.perf_counter_ns() - start) // pages)
            progress.step(step + SET_FLOOR)
            samples[SET_FLOOR] += _asyncio(_set_loop(kwargs, pages))
            progress.step(step + f"{names['ours']}, taking turns with the floors")
            with pager.map(url, size, writeback_interval=0) as region:
                # Floors and faults take turns, a slice at a time: this
                # machine's wake-up latency swings several-fold within
                # seconds, and a ratio means something only when both sides
                # saw the same minute.
                for first in range(0, pages, SLICE):
                    part = offsets[first:first + SLICE]
                    work = Workload(data_path, size, part, pager, key)
                    uffd = _c_reference(lib.up_ref_start_process)(work)
                    get = _asyncio(_get_round_trips(kwargs, len(part)))
                    bare = _asyncio(_wire_round_trips(kwargs, len(part)))
                    ours = _touch(region.address, part)
                    for name, times in ((C_FLOOR, uffd), (GET_FLOOR, get), (WIRE_FLOOR, bare), (names["ours"], ours)):
                        samples[name] += times
                    slices.append((statistics.median(ours) / (statistics.median(uffd) + statistics.median(get)),
                                   statistics.median(ours) / (statistics.median(uffd) + statistics.median(bare))))
            seq_url = f"{prefix}seq{round_}"
            seq_pages = SEQUENTIAL_BYTES // PAGE_SIZE // (4 if quick else 1)
            sequential = array.array("Q", (p * PAGE_SIZE for p in range(seq_pages)))
            with pager.map(seq_url, seq_pages * PAGE_SIZE, writeback_interval=0) as region:
                _touch(region.address, sequential, write=True)
                region.flush()
            progress.step(step + names["seq"])
            with pager.map(seq_url, seq_pages * PAGE_SIZE, writeback_interval=0) as region:
                start = time.perf_counter_ns()
                _touch(region.address, sequential)
                samples[names["seq"]].append((time.perf_counter_ns() - start) // seq_pages)
            progress.step(step + names["ooc"])
            with pager.map(seq_url, seq_pages * PAGE_SIZE, dirty_tracking="sync", writeback_interval=0,
                           max_resident=seq_pages * PAGE_SIZE // 4) as region:
                start = time.perf_counter_ns()
                _touch(region.address, sequential)
                samples[names["ooc"]].append((time.perf_counter_ns() - start) // seq_pages)
    progress.finish()
    cases = [Case(C_FLOOR, C_FLOOR, lambda w: []), Case(GET_FLOOR, GET_FLOOR, lambda w: []),
             Case(WIRE_FLOOR, WIRE_FLOOR, lambda w: []), Case(names["ours"], SUM_FLOOR, lambda w: []),
             Case(names["seq"], names["seq"], lambda w: [], unit="MB/s"),
             Case(names["ooc"], names["seq"], lambda w: [], unit="MB/s"),
             Case(SET_FLOOR, SET_FLOOR, lambda w: [], unit="MB/s"),
             Case(names["flush"], SET_FLOOR, lambda w: [], unit="MB/s")]
    rows = [summarize(case, samples[case.name]) for case in cases]
    by_name = {row.name: row for row in rows}
    for at, (name, get) in enumerate(((SUM_FLOOR, by_name[GET_FLOOR]), (WIRE_SUM_FLOOR, by_name[WIRE_FLOOR]))):
        uffd = by_name[C_FLOOR]
        # Summed quantile by quantile, as its p50 and p99 are: the report plots it as a CDF like any floor.
        floor = Row(name, name, uffd.p50_us + get.p50_us, uffd.p99_us + get.p99_us, uffd.mean_us + get.mean_us,
                    0.0, "", 0, cdf_us=[round(a + b, 3) for a, b in zip(uffd.cdf_us, get.cdf_us)])
        floor.per_s = 1e6 / floor.mean_us if floor.mean_us else 0.0
        floor.unit = "faults/s"
        rows.insert(3 + at, floor)
        by_name[name] = floor
    for row in rows:
        row.ratio = by_name[row.floor].p50_us and row.p50_us / by_name[row.floor].p50_us
    flush, set_loop = by_name[names["flush"]], by_name[SET_FLOOR]
    ours = by_name[names["ours"]]
    notes = [f"{names['ours']} / ({C_FLOOR[7:]} + GET): p50 {format_ratio(ours.ratio)}",
             f"{names['ours']} / ({C_FLOOR[7:]} + bare GET): p50 "
             f"{format_ratio(ours.p50_us / by_name[WIRE_SUM_FLOOR].p50_us)}"]
    for i, floor_name in enumerate(("GET", "bare GET")):
        ratios = sorted(pair[i] for pair in slices)
        notes.append(f"  the same, slice by slice ({len(ratios)} slices of {min(SLICE, pages)} faults, each beside the "
                     f"floors measured just before it), vs uffd + {floor_name}: median "
                     f"{format_ratio(statistics.median(ratios))}, min {format_ratio(ratios[0])}, "
                     f"max {format_ratio(ratios[-1])}")
    notes.append(f"write-back: {flush.per_s:.0f} MB/s vs pipelined SET {set_loop.per_s:.0f} MB/s = "
                 f"{format_ratio(flush.per_s / set_loop.per_s if set_loop.per_s else float('nan'))} its throughput")
    notes.append(f"sequential read: {by_name[names['seq']].per_s:.0f} MB/s (adaptive read-ahead: windows of up to "
                 "256 pages, each one pipelined batch)")
    ooc = by_name[names["ooc"]]
    notes.append(f"out-of-core: a sequential scan under max_resident of a quarter of it: {ooc.per_s:.0f} MB/s = "
                 f"{format_ratio(ooc.per_s / by_name[names['seq']].per_s if by_name[names['seq']].per_s else float('nan'))} "
                 "the uncapped scan")
    results = Results(title=f"uffd-pager bench --store {store}: {pages} random 4 KiB pages x {rounds} rounds, "
                            f"sequential {seq_pages * PAGE_SIZE >> 20} MiB",
                      rows=rows, notes=notes, kernel=platform.release(), pages=pages, rounds=rounds)
    print_results(results)
    return results
