"""Child processes for tests/test_fork.py, as importable code.

Run one as ``python fork_children.py NAME ARGS...``. These keep the stdout
protocol the tests parse: one JSON object a line, *without* the "what"/"pid"
keys of tests/child.py (a failure in the forked child is reported as
``{"error": TRACEBACK}``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import traceback

import uffd_pager
from child import PlainRegistry

PAGE = uffd_pager.PAGE_SIZE

CHILDREN = PlainRegistry()
child = CHILDREN.register


def pattern(tag: str, page: int) -> bytes:
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


@child("orphan")
def orphan(path: str, npages_arg: str, policy: str, tracking: str) -> None:
    """A parent that exits (os._exit, no close) right after fork(); its child
    waits until it is gone, then reads, writes and flushes the region."""
    npages = int(npages_arg)
    size = npages * PAGE
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, size, fork_policy=policy, dirty_tracking=tracking, writeback_interval=0)
    view = region.view()
    for p in range(0, npages, 2):                      # flushed before the fork
        view[p * PAGE:(p + 1) * PAGE] = pattern("flushed", p)
    region.flush()
    for p in range(1, npages, 4):                      # dirty at fork, never flushed by the parent
        view[p * PAGE:(p + 1) * PAGE] = pattern("dirty", p)
    print(json.dumps({"pager": pager.pid}), flush=True)
    parent = os.getpid()
    pid = os.fork()
    if pid:
        os._exit(0)                                    # no close, no flush, no atexit
    code = 1
    try:
        deadline = time.monotonic() + 20
        while os.getppid() == parent:                  # until the parent is gone
            assert time.monotonic() < deadline, "the parent did not exit"
            time.sleep(0.01)
        time.sleep(0.3)                                # and the pager has seen its connection close
        v = region.view()
        seen = hashlib.sha256(v).hexdigest()
        for p in range(3, npages, 4):
            v[p * PAGE:(p + 1) * PAGE] = pattern("child", p)
        flushed = region.flush()
        backing = region.backing()
        print(json.dumps({"seen": seen, "view": hashlib.sha256(v).hexdigest(), "url": backing.url,
                          "offset": backing.offset, "pages": flushed["pages"]}), flush=True)
        del v, view
        region.close()
        pager.close()
        code = 0
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
    finally:
        os._exit(code)


if __name__ == "__main__":
    CHILDREN.main()
