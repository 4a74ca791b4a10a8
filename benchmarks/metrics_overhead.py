"""What `uffd-pager serve --metrics` costs the fault path: random 4 KiB read
faults served by a daemon with metrics on beside one with metrics off, in
the same run, taking turns (uffd_pager.bench._taking_turns), while a
scraper reads /metrics of the first every --scrape-interval seconds (far
more often than Prometheus would, so its cost shows if it has any).

    .venv/bin/python benchmarks/metrics_overhead.py [--pages N] [--rounds N] [--scrape-interval S]

Prints both rows beside each other (the daemon without metrics is the
floor), and the median, min and max of the per-pair p50 ratios on / off.
The goal: a median of at most 1.03x.
"""
from __future__ import annotations

import argparse
import array
import contextlib
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Iterator

import uffd_pager
from uffd_pager.bench import PAIR_SLICE, Case, _taking_turns, format_ratio, format_table, ratio, summarize

PAGE = uffd_pager.PAGE_SIZE
ON, OFF = "read: uffd_pager, metrics on", "read: uffd_pager, metrics off"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _daemon(path: str, cpu: int | None, *options: str) -> Iterator[uffd_pager.Pager]:
    process = subprocess.Popen([sys.executable, "-m", "uffd_pager", "serve", "--socket", path, *options],
                               stdin=subprocess.DEVNULL)
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})  # before it starts threads: they inherit it
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                pager = uffd_pager.connect(path)
                break
            except (FileNotFoundError, uffd_pager.PagerGone):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the daemon on {path} did not start") from None
                time.sleep(0.05)
        with pager:
            yield pager
    finally:
        process.terminate()
        process.wait(timeout=10)


class _Scraper(threading.Thread):
    """Scrapes url every interval seconds until stopped; keeps the last fault count."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.scrapes, self.faults = 0, 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.scrape()

    def scrape(self) -> None:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        self.scrapes += 1
        self.faults = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                          if line.startswith("uffd_pager_faults_total{"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=4096, help="faults per round on each daemon (default 4096)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each over fresh regions (default 5)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, metavar="S",
                        help="seconds between two scrapes of /metrics (default 1)")
    parser.add_argument("--pager-cpu", type=int, default=max(os.sched_getaffinity(0)), metavar="N",
                        help="the CPU both daemons run on (default: the last; -1: not pinned). On a loaded "
                             "machine two unpinned daemons land on a busy and an idle core by chance, and the "
                             "ratio measures that")
    args = parser.parse_args()
    if args.pages < 1 or args.rounds < 1 or args.scrape_interval <= 0:
        parser.error("--pages and --rounds must be at least 1, --scrape-interval above 0")
    port = _free_port()
    latencies: tuple[list[int], list[int]] = ([], [])
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="uffd-metrics-bench-") as tmp:
        data = os.path.join(tmp, "data.bin")
        with open(data, "wb") as f:
            f.write(os.urandom(args.pages * PAGE))
        url, size = f"file://{data}", args.pages * PAGE
        cpu = None if args.pager_cpu < 0 else args.pager_cpu
        with _daemon(os.path.join(tmp, "on.sock"), cpu, "--metrics", f"127.0.0.1:{port}") as on, \
                _daemon(os.path.join(tmp, "off.sock"), cpu) as off:
            scraper = _Scraper(f"http://127.0.0.1:{port}/metrics", args.scrape_interval)
            scraper.start()
            order = list(range(args.pages))
            rng = random.Random(1)
            for _ in range(args.rounds):
                rng.shuffle(order)
                offsets = array.array("Q", (p * PAGE for p in order))
                with on.map(url, size, read_ahead="off", writeback_interval=0) as measured, \
                        off.map(url, size, read_ahead="off", writeback_interval=0) as floor:
                    ratios += _taking_turns(measured.address, floor.address, offsets, latencies)
            scraper.stopping.set()
            scraper.join()
            scraper.scrape()  # the last: every fault of the run counted
    rows = [summarize(Case(ON, OFF, lambda w: []), latencies[0]), summarize(Case(OFF, OFF, lambda w: []), latencies[1])]
    rows[0].ratio = ratio(rows[0].p50_us, rows[1].p50_us)
    print(f"metrics overhead: {args.pages} random 4 KiB read faults x {args.rounds} rounds on each of two daemons, "
          f"Linux {platform.release()}, {os.cpu_count()} cpus, daemons on cpu {args.pager_cpu}")
    print("\n".join(format_table(rows)))
    ratios.sort()
    print(f"p50 ratio metrics on / off, taking turns {min(PAIR_SLICE, args.pages)} faults at a time "
          f"({len(ratios)} pairs): median {format_ratio(statistics.median(ratios))}, min {format_ratio(ratios[0])}, "
          f"max {format_ratio(ratios[-1])}")
    print(f"/metrics scraped {scraper.scrapes} times (the last after the run: {scraper.faults:.0f} faults counted, "
          f"{args.pages * args.rounds} taken)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
