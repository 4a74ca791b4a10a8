"""Child processes for tests/test_uffd.py, as importable code.

Run one as ``python uffd_children.py NAME ARGS...``. These keep the stdout
protocol the tests parse: plain ``print`` lines. They are expected to die of
a signal (SIGBUS), so nothing after the fatal access runs.
"""
from __future__ import annotations

import mmap

from child import PlainRegistry
from uffd_pager.uffd import PAGE_SIZE, Feature, RegisterMode, Uffd, buffer_address

CHILDREN = PlainRegistry()
child = CHILDREN.register


@child("poisoned-page")
def poisoned_page() -> None:
    """Prints the first byte of a zero page, then reads a poisoned page: SIGBUS."""
    uffd = Uffd.create(Feature.POISON)
    memory = mmap.mmap(-1, 2 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = buffer_address(memory)
    uffd.register(address, 2 * PAGE_SIZE, RegisterMode.MISSING)
    uffd.zeropage(address, PAGE_SIZE)
    uffd.poison(address + PAGE_SIZE, PAGE_SIZE)
    print(memory[0], flush=True)          # the zero page
    print(memory[PAGE_SIZE], flush=True)  # poisoned: SIGBUS


if __name__ == "__main__":
    CHILDREN.main()
