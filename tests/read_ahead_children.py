"""Child processes for tests/test_read_ahead.py, as importable code.

Run one as ``python read_ahead_children.py NAME ARGS...``; plain ``print``
lines on stdout. A child that touches a poisoned page dies of SIGBUS, so
nothing after that access runs.
"""
from __future__ import annotations

import array

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


if __name__ == "__main__":
    CHILDREN.main()
