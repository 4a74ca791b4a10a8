"""The kernel's side of the out-of-core benchmark, run as a child process
(`python -m uffd_pager.bench_scan PATH`) that the benchmark puts in a memory
cgroup: maps the file read-only, reads a byte of each page in order, and
prints the nanoseconds it took."""
from __future__ import annotations

import array
import mmap
import os
import sys
import time

from uffd_pager.bench import _touch
from uffd_pager.uffd import PAGE_SIZE, buffer_address


def main(argv: list[str]) -> int:
    (path,) = argv
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        offsets = array.array("Q", range(0, size, PAGE_SIZE))
        start = time.perf_counter_ns()
        _touch(buffer_address(memory), offsets)
        print(time.perf_counter_ns() - start, flush=True)
    finally:
        memory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
