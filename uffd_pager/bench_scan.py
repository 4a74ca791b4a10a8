"""The kernel's side of the out-of-core benchmark, run as a child process
(`python -m uffd_pager.bench_scan PATH`) that the benchmark puts in a memory
cgroup: prints the nanoseconds bench.kernel_scan_ns took over the file."""
from __future__ import annotations

import sys

from uffd_pager.bench import kernel_scan_ns


def main(argv: list[str]) -> int:
    (path,) = argv
    print(kernel_scan_ns(path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
