"""Programs for tests/test_restart.py, as importable code: ``python
restart_children.py NAME ARGS...`` (see tests/child.py for the reports on
stdout and the orders on stdin)."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import uffd_pager
from child import Registry, order, report

CHILDREN = Registry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE
PAGES = 64
WRITTEN = range(4)  # pages written before the pager dies, never flushed by it


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@child("program")
def program(url: str, tracking: str, state_dir: str) -> None:
    """A program with a private pager: maps url (64 pages), writes 0x5A
    into pages 0-3 and reports "mapped" (the pager's pid, how long Pager()
    took). A thread of its own counts, every millisecond, while it can run
    Python code. Orders, each answered with a report:
    "read N" (the page's sha256), "write N BYTE" (the whole page), "flush",
    "pid", "stuck N" (reports "touching", then reads page N in this
    thread, which holds the GIL while it waits in the fault; then "byte"
    with the time it was served, and the counts before and after),
    "beats" (the count), "fork" (a child reports its threads and closes its
    Pager), "close"."""
    started = time.monotonic()
    pager = uffd_pager.Pager(state_dir=state_dir, timeout=30)
    startup = time.monotonic() - started
    # No read-ahead: every first read of a page is a fault the pager must answer.
    region = pager.map(url, PAGES * PAGE, dirty_tracking=tracking, writeback_interval=0, read_ahead="off")
    view = region.view()
    for page in WRITTEN:
        view[page * PAGE:(page + 1) * PAGE] = b"\x5a" * PAGE
    beats = [0]

    def beat() -> None:
        while True:
            beats[0] += 1
            time.sleep(0.001)

    threading.Thread(target=beat, daemon=True).start()
    report("mapped", pager=pager.pid, startup=startup, threads=threads())
    while line := order():
        word, *args = line.split()
        if word == "read":
            page = int(args[0])
            report("page", sha256=hashlib.sha256(view[page * PAGE:(page + 1) * PAGE]).hexdigest())
        elif word == "write":
            page = int(args[0])
            view[page * PAGE:(page + 1) * PAGE] = bytes([int(args[1])]) * PAGE
            report("written")
        elif word == "flush":
            asked = time.monotonic()
            try:
                report("flushed", **region.flush())
            except uffd_pager.PagerGone as exc:
                report("gone", error=str(exc), after=time.monotonic() - asked)
        elif word == "pid":
            report("pid", pager=pager.pid, alive=pager.alive())
        elif word == "stuck":
            page = int(args[0])
            before = beats[0]
            report("touching", beats=before)
            value = view[page * PAGE]
            served = time.monotonic()
            report("byte", value=value, served_at=served, beats_before=before, beats_after=beats[0])
        elif word == "beats":
            report("beats", beats=beats[0])
        elif word == "fork":
            pid = os.fork()
            if pid == 0:
                seen = threads()
                pager.close()  # the child's use only: neither the parent's pager nor its restarter
                report("forked", threads=seen)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            report("reaped", status=status, pager=pager.pid, alive=pager.alive())
        elif word == "close":
            old = pager.pid
            del view
            region.close()
            pager.close()
            report("closed", threads=threads(), pager=old)
            return


if __name__ == "__main__":
    CHILDREN.main()
