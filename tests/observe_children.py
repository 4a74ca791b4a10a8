"""Client processes for tests/test_observe.py, as importable code:
``python observe_children.py NAME ARGS...`` (see tests/child.py for the
reports on stdout and the orders on stdin).

A tenant maps a file with read-ahead off, so that each page it reads first
is one fault the pager counts, and async tracking, so that a write to a
page it read costs no fault and leaves the page dirty until a flush.
"""
from __future__ import annotations

import uffd_pager
from child import Registry, order, report

CHILDREN = Registry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE


def _serve_orders(pager: uffd_pager.Pager, region: uffd_pager.Region) -> None:
    """Orders: "read FIRST STOP" (pages [FIRST, STOP)), "write FIRST STOP",
    "flush", "bad" (a request the pager refuses), "close" (the region,
    then the pager); each answered with a report of what it did."""
    view = region.view()
    while line := order():
        word, *args = line.split()
        if word == "read":
            first, stop = map(int, args)
            report("read", total=sum(view[p * PAGE] for p in range(first, stop)))
        elif word == "write":
            first, stop = map(int, args)
            for p in range(first, stop):
                view[p * PAGE] = 0x5A
            report("written")
        elif word == "flush":
            report("flushed", **region.flush())
        elif word == "bad":
            try:
                region.prefetch(region.size + PAGE, PAGE)  # past the region's end: the pager says ValueError
            except ValueError as exc:
                report("refused", message=str(exc))
        elif word == "close":
            del view
            region.close()
            pager.close()
            report("closed")
            return


@child("tenant")
def tenant(socket_path: str, url: str, size: str, cap: str = "0") -> None:
    """A client of the daemon at socket_path mapping url; with a cap (bytes),
    "sync" tracking and max_resident=cap: page-out keeps it."""
    pager = uffd_pager.connect(socket_path)
    capped = {"dirty_tracking": "sync", "max_resident": int(cap)} if int(cap) else {"dirty_tracking": "async"}
    region = pager.map(url, int(size), read_ahead="off", writeback_interval=0, **capped)
    report("mapped", address=region.address)
    _serve_orders(pager, region)


@child("embedded")
def embedded(level: str, url: str, size: str) -> None:
    """The same with a private pager started with Pager(log_level=level):
    the pager's log lines go to this process's stderr."""
    pager = uffd_pager.Pager(log_level=level)
    region = pager.map(url, int(size), read_ahead="off", dirty_tracking="async", writeback_interval=0)
    report("mapped", pager=pager.pid)
    _serve_orders(pager, region)


@child("many")
def many(socket_path: str, url: str, count: str) -> None:
    """A client of the daemon holding `count` one-page regions of url,
    until ordered to "close" them."""
    pager = uffd_pager.connect(socket_path)
    regions = [pager.map(url, PAGE, writeback_interval=0) for _ in range(int(count))]
    report("mapped", count=len(regions))
    if order() == "close":
        for region in regions:
            region.close()
        pager.close()
        report("closed")


if __name__ == "__main__":
    CHILDREN.main()
