"""Child processes for tests/test_page_out.py, as importable code.

Run one as ``python page_out_children.py NAME ARGS...``; plain ``print``
lines on stdout.
"""
from __future__ import annotations

import array
import hashlib
import os
import random

import uffd_pager
from child import PlainRegistry
from uffd_pager.bench import _touch

PAGE = uffd_pager.PAGE_SIZE
SLICE = 256 * PAGE

CHILDREN = PlainRegistry()
child = CHILDREN.register


def _rss() -> int:
    """This process's Rss (bytes), from /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Rss:"))


@child("read-capped")
def read_capped(group: str, path: str, size_arg: str, cap: str, tracking: str) -> None:
    """Joins the memory cgroup `group` ("-": none), then reads a region of
    the file through a private pager (which joins it too) capped at `cap`
    bytes, with `tracking`: in order (printing the sha256 of what it read),
    then every page at random (comparing each with the file: "random
    exact"); "rss_growth": how far the process's Rss rose at most above
    what it was before the map."""
    if group != "-":
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    size = int(size_arg)
    with uffd_pager.Pager() as pager:
        before = _rss()
        growth = 0
        with pager.map(f"file://{path}", size, dirty_tracking=tracking, max_resident=int(cap),
                       writeback_interval=0) as region:
            view = region.view()
            digest = hashlib.sha256()
            for at in range(0, size, SLICE):
                digest.update(view[at:at + SLICE])
                growth = max(growth, _rss() - before)
            print("in-order", digest.hexdigest(), flush=True)
            pages = list(range(size // PAGE))
            random.Random(3).shuffle(pages)
            fd = os.open(path, os.O_RDONLY)
            wrong = 0
            for first in range(0, len(pages), 4096):
                part = pages[first:first + 4096]
                _touch(region.address, array.array("Q", (p * PAGE for p in part)))
                growth = max(growth, _rss() - before)
                for p in part[:64]:  # and a sample of them, byte for byte
                    wrong += bytes(view[p * PAGE:(p + 1) * PAGE]) != os.pread(fd, PAGE, p * PAGE)
            os.close(fd)
            print("random", "exact" if not wrong else f"{wrong} pages differ", flush=True)
            stats = region.stats()
            print("evictions", stats["evictions"], "resident_peak", stats["resident_peak"], flush=True)
            print("rss_growth", growth, flush=True)
            del view


def _pattern(tag: str, page: int) -> bytes:
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def _check_and_sweep(region: uffd_pager.Region, model: dict[int, str], npages: int) -> dict[str, int]:
    """Reads the region through twice in order (dropping pages as it goes)
    and counts the pages that differ from the model."""
    view = region.view()
    wrong = 0
    for _ in range(2):
        for p in range(npages):
            wrong += bytes(view[p * PAGE:(p + 1) * PAGE]) != _pattern(model[p], p)
    del view
    stats = region.stats()
    return {"wrong": wrong, "evictions": stats["evictions"], "resident_peak": stats["resident_peak"],
            "max_resident": stats["max_resident"]}


@child("fork-capped")
def fork_capped(path: str, npages_arg: str, cap: str, tracking: str) -> None:
    """A capped region written, flushed, then forked: parent and child each
    write their own pages and sweep the region (evicting as they go); each
    must read its own view. One JSON line each: {"who", "wrong", "evictions", ...}."""
    import json
    import sys

    npages = int(npages_arg)
    with uffd_pager.Pager() as pager:
        region = pager.map(f"file://{path}", npages * PAGE, dirty_tracking=tracking, max_resident=int(cap),
                           writeback_interval=0)
        view = region.view()
        for p in range(npages):
            view[p * PAGE:(p + 1) * PAGE] = _pattern("A", p)
        del view
        region.flush()
        model = {p: "A" for p in range(npages)}
        pid = os.fork()
        who, tag, mine = ("child", "B", range(0, npages, 2)) if pid == 0 else ("parent", "C", range(1, npages, 3))
        try:
            view = region.view()
            for p in mine:
                view[p * PAGE:(p + 1) * PAGE] = _pattern(tag, p)
                model[p] = tag
            del view
            report = _check_and_sweep(region, model, npages)
            region.flush()
            report.update(_check_and_sweep(region, model, npages))
            print(json.dumps({"who": who, **report}), flush=True)
        finally:
            if pid == 0:
                region.close()
                sys.stdout.flush()
                os._exit(0)
        os.waitpid(pid, 0)
        region.close()


if __name__ == "__main__":
    CHILDREN.main()
