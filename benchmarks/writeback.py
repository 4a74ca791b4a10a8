"""Write-back throughput beside msync(MS_SYNC), over more rounds than the
quick bench's three (one sample a round each): random pages of a file
written through a region of the embedded Pager() (which keeps durable
state) and flushed, with "async" and "sync" tracking, taking turns with the
kernel's msync of the same pages in a MAP_SHARED mapping; each from the
same bytes, hot in the page cache. Prints the medians and their ratios.

    .venv/bin/python benchmarks/writeback.py [--pages N] [--rounds N]
"""
from __future__ import annotations

import argparse
import array
import os
import random
import shutil
import statistics
import tempfile

from uffd_pager import PAGE_SIZE, Pager, bench
from uffd_pager.crypto import Key

ROWS = {"msync": bench.kernel_msync, "async": bench.pager_flush("async"), "sync": bench.pager_flush("sync")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    size = args.pages * PAGE_SIZE
    rng = random.Random(1)
    rates: dict[str, list[float]] = {name: [] for name in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        pristine = os.path.join(tmp, "pristine.bin")
        with open(pristine, "wb") as f:
            f.write(os.urandom(size))
        with Pager(state_dir=os.path.join(tmp, "state")) as pager:
            for _ in range(args.rounds):
                order = list(range(args.pages))
                rng.shuffle(order)
                offsets = array.array("Q", (p * PAGE_SIZE for p in order))
                for name, run in ROWS.items():
                    path = os.path.join(tmp, "data.bin")
                    shutil.copyfile(pristine, path)
                    (ns_per_page,) = run(bench.Workload(path, size, offsets, pager, Key.generate()))
                    rates[name].append(PAGE_SIZE * 1e3 / ns_per_page)  # MB/s
    for name, values in rates.items():
        print(f"{name:6} median {statistics.median(values):6.0f} MB/s (min {min(values):.0f}, max {max(values):.0f})")
    floor = statistics.median(rates["msync"])
    print(f"write-back / msync, medians of {args.rounds} rounds: async "
          f"{statistics.median(rates['async']) / floor:.2f}x, sync {statistics.median(rates['sync']) / floor:.2f}x")


if __name__ == "__main__":
    main()
