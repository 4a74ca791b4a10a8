"""Client processes for tests/test_takeover.py, as importable code:
``python takeover_children.py NAME ARGS...`` (see tests/child.py for the
reports on stdout and the orders on stdin)."""
from __future__ import annotations

import os

import uffd_pager
from child import Registry, order, report

CHILDREN = Registry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE
PAGES = 32
WRITTEN = range(4)  # pages written before the pager dies, never flushed by it


@child("client")
def client(socket_path: str, url: str, tracking: str, key_file: str = "") -> None:
    """Maps url (32 pages; "encrypted" with key_file), reads pages 8-15,
    writes 0x5A into pages 0-3, reports "mapped". Orders: "touch N" (a
    read of page N by this, the only, thread: it holds the GIL while it
    waits in the fault), "write N BYTE", "flush", "stats", "close"; each
    answered with a report ("flush-failed" when a flush raises)."""
    pager = uffd_pager.connect(socket_path, timeout=30)
    key = {"key_file": key_file} if key_file else {}
    region = pager.map(url, PAGES * PAGE, dirty_tracking=tracking, writeback_interval=0, **key)
    view = region.view()
    report("mapped", read=[view[p * PAGE] for p in range(8, 16)])
    for page in WRITTEN:
        view[page * PAGE:(page + 1) * PAGE] = b"\x5a" * PAGE
    report("written")
    while line := order():
        word, *args = line.split()
        if word == "touch":
            report("byte", value=view[int(args[0]) * PAGE])
        elif word == "write":
            view[int(args[0]) * PAGE] = int(args[1])
            report("written")
        elif word == "flush":
            try:
                report("flushed", **region.flush())
            except OSError as exc:
                report("flush-failed", error=str(exc))
        elif word == "stats":
            report("stats", **region.stats())
        elif word == "close":
            del view
            region.close()
            pager.close()
            report("closed")
            return


@child("capped")
def capped(socket_path: str, url: str, pages: str, cap: str) -> None:
    """Maps url (`pages` pages, max_resident=cap bytes), reads every page,
    reports "mapped" with its stats. Orders: "stats"; "scan" (reads every
    page again, then reports its stats); "close"."""
    pager = uffd_pager.connect(socket_path, timeout=30)
    region = pager.map(url, int(pages) * PAGE, max_resident=int(cap), writeback_interval=0)
    view = region.view()
    first = [view[p * PAGE] for p in range(int(pages))]
    report("mapped", first=first[:8], **region.stats())
    while line := order():
        if line == "stats":
            report("stats", **region.stats())
        elif line == "scan":
            same = [view[p * PAGE] for p in range(int(pages))] == first
            report("scanned", same=same, **region.stats())
        elif line == "close":
            del view
            region.close()
            pager.close()
            report("closed")
            return


@child("family")
def family(socket_path: str, url: str, policy: str, go_path: str, fate: str, children: str = "") -> None:
    """Maps url (32 pages, fork_policy=policy, children's portions kept, in
    the store children if given),
    forks a child, writes 0x22 into pages 0-15 and flushes ("parent-flushed",
    with the child's pid). fate "gone": then exits. The child waits for a
    line on the FIFO go_path ("child-forked" first), reads every page ("child-read"), writes 0x33
    into page 20, flushes and reports where its portion is ("child-flushed"),
    and exits. The parent's orders: "read" (every page's first byte),
    "write N BYTE", "flush", "close"."""
    pager = uffd_pager.connect(socket_path, timeout=30)
    region = pager.map(url, PAGES * PAGE, fork_policy=policy, keep_child_portions=True, writeback_interval=0,
                       children=children or None)
    view = region.view()
    pid = os.fork()
    if pid == 0:
        try:
            report("child-forked")  # it holds its own uffd now (it claimed it at fork)
            with open(go_path) as go:
                go.readline()
            report("child-read", bytes=[view[p * PAGE] for p in range(PAGES)])
            view[20 * PAGE] = 0x33
            flushed = region.flush()
            backing = region.backing()
            report("child-flushed", pages=flushed["pages"], offset=backing.offset if backing else None)
        except BaseException as exc:
            report("child-error", error=repr(exc))
        finally:
            os._exit(0)
    for page in range(16):
        view[page * PAGE:(page + 1) * PAGE] = b"\x22" * PAGE
    report("parent-flushed", child=pid, **region.flush())
    if fate == "gone":
        os._exit(0)
    while line := order():
        word, *args = line.split()
        if word == "read":
            report("parent-read", bytes=[view[p * PAGE] for p in range(PAGES)])
        elif word == "write":
            view[int(args[0]) * PAGE] = int(args[1])
            report("written")
        elif word == "flush":
            report("flushed", **region.flush())
        elif word == "close":
            os.waitpid(pid, 0)
            del view
            region.close()
            pager.close()
            report("closed")
            return


@child("keeper")
def keeper(socket_path: str, url: str) -> None:
    """Maps url (32 pages, children's portions kept); on each "fork BYTE"
    forks a child that writes BYTE into page 0, flushes and waits, and
    reports where the child's portion was ("forked", offset); "exit" lets
    that child exit and reports "exited" once it is reaped. "close"."""
    pager = uffd_pager.connect(socket_path, timeout=30)
    region = pager.map(url, PAGES * PAGE, keep_child_portions=True, writeback_interval=0)
    report("mapped")
    reader, writer = os.pipe()
    go_reader, go_writer = os.pipe()
    pid = 0
    while line := order():
        word, *args = line.split()
        if word == "fork":
            pid = os.fork()
            if pid == 0:
                offset = -1
                try:
                    region.view()[0] = int(args[0])
                    region.flush()
                    backing = region.backing()
                    offset = backing.offset if backing else -1
                finally:
                    os.write(writer, offset.to_bytes(8, "little", signed=True))
                    os.read(go_reader, 1)
                    os._exit(0)
            report("forked", offset=int.from_bytes(os.read(reader, 8), "little", signed=True))
        elif word == "exit":
            os.write(go_writer, b"x")
            os.waitpid(pid, 0)
            report("exited")
        elif word == "close":
            region.close()
            pager.close()
            report("closed")
            return


if __name__ == "__main__":
    CHILDREN.main()
