"""Child processes for tests/test_fill.py, as importable code.

Run one as ``python fill_children.py NAME ARGS...``. These keep the stdout
protocol the tests parse: plain ``print`` lines. They are expected to die of
a signal (SIGSEGV), so nothing after the fatal access runs.
"""
from __future__ import annotations


import uffd_pager
from child import PlainRegistry

CHILDREN = PlainRegistry()
child = CHILDREN.register


@child("view-used-after-close")
def view_used_after_close(path: str, size: str) -> None:
    """Closes a region and then reads its still-alive view: SIGSEGV, not stale bytes."""
    with uffd_pager.Pager() as pager:
        region = pager.map(f"file://{path}", int(size))
        view = region.view()
        view[0]
        region.close()
        print("closed", flush=True)
        print("read", view[0], flush=True)


if __name__ == "__main__":
    CHILDREN.main()
