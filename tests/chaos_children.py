"""The client processes of tests/test_chaos.py, as importable code:
``python chaos_children.py client SOCKET URL POLICY TRACKING KEY_FILE SEED``
(see tests/child.py for the reports on stdout and the orders on stdin).

A client keeps a model of every page of its region: page p holds
`page_bytes(p, model[p])`. Two threads write and check pages of their own
(each holds a lock from the write until the model says it, so that a fork
sees the two agree); the main thread flushes now and then, and forks a
child now and then, which checks its view against the model as of the fork
page by page, slowly (so that its faults span the pager's deaths), writes
pages of its own, flushes and checks again. On "finish" the client stops,
flushes, checks every page in memory, closes the region and checks every
page of a fresh map of the store: what reached the store."""
from __future__ import annotations

import os
import random
import select
import struct
import threading
import time

import uffd_pager
from child import Registry, report

CHILDREN = Registry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE
PAGES = 64
WRITERS = 2


def page_bytes(page: int, value: int) -> bytes:
    """The bytes of page `page` after its value-th write (0: never written, zeros)."""
    if value == 0:
        return bytes(PAGE)
    return struct.pack("<HB", page, value) + bytes([value]) * (PAGE - 3)


def next_value(value: int) -> int:
    return value % 255 + 1


class Client:
    def __init__(self, socket_path: str, url: str, policy: str, tracking: str, key_file: str, seed: int) -> None:
        self.url, self.key = url, {"key_file": key_file} if key_file else {}
        self.pager = uffd_pager.connect(socket_path, timeout=60)
        self.region = self.pager.map(url, PAGES * PAGE, fork_policy=policy, dirty_tracking=tracking,
                                     writeback_interval=0, **self.key)
        self.view = self.region.view()
        self.model = [0] * PAGES
        self.locks = [threading.Lock() for _ in range(WRITERS)]
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.counts = {"writes": 0, "checks": 0, "flushes": 0, "forks": 0}
        self.random = random.Random(seed)

    def check(self, page: int, value: int, who: str) -> None:
        seen = bytes(self.view[page * PAGE:(page + 1) * PAGE])
        if seen != page_bytes(page, value):
            self.problems.append(f"{who}: page {page} holds {seen[:4].hex()}..., expected value {value}")

    def writer(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        own = [p for p in range(PAGES) if p % WRITERS == index]
        while not self.stop.is_set():
            page = rng.choice(own)
            if rng.random() < 0.6:
                with self.locks[index]:
                    value = next_value(self.model[page])
                    self.view[page * PAGE:(page + 1) * PAGE] = page_bytes(page, value)
                    self.model[page] = value
                self.counts["writes"] += 1
            else:
                self.check(page, self.model[page], f"writer {index}")
                self.counts["checks"] += 1
            time.sleep(0.002)

    def fork(self) -> int:
        for lock in self.locks:
            lock.acquire()
        try:
            snapshot = list(self.model)
            pid = os.fork()
        finally:
            for lock in self.locks:
                lock.release()
        if pid == 0:
            self.in_child(snapshot)
        self.counts["forks"] += 1
        return pid

    def in_child(self, snapshot: list[int]) -> None:
        """The forked child (its only thread): never returns."""
        try:
            if not self.region.served_here:
                report("child", outcome="unclaimed")  # killed with the pager between fork and claim
                os._exit(0)
            self.problems = []
            order = list(range(PAGES))
            self.random.shuffle(order)
            for page in order:  # one page every few ms: the faults span kills
                self.check(page, snapshot[page], "child before its writes")
                time.sleep(0.01)
            for page in order[:8]:
                snapshot[page] = next_value(snapshot[page])
                self.view[page * PAGE:(page + 1) * PAGE] = page_bytes(page, snapshot[page])
            self.region.flush()
            for page in range(PAGES):
                self.check(page, snapshot[page], "child after its flush")
            report("child", outcome="checked", problems=self.problems[:5])
        except BaseException as exc:
            report("child", outcome="raised", problems=[repr(exc)])
        os._exit(0)

    def run(self) -> None:
        threads = [threading.Thread(target=self.writer, args=(i, self.random.random()), daemon=True)
                   for i in range(WRITERS)]
        for thread in threads:
            thread.start()
        report("running")
        children: list[int] = []
        next_fork = time.monotonic() + self.random.uniform(0.5, 2.0)
        while True:
            ready, _, _ = select.select([0], [], [], self.random.uniform(0.05, 0.4))
            if ready:
                break  # "finish" (or the end of stdin)
            for pid in list(children):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.remove(pid)
            if time.monotonic() > next_fork and len(children) < 2:
                children.append(self.fork())
                next_fork = time.monotonic() + self.random.uniform(1.0, 3.0)
            else:
                self.flush()
        self.stop.set()
        for thread in threads:
            thread.join()
        for pid in children:
            _, status = os.waitpid(pid, 0)
            if status:
                self.problems.append(f"a forked child ended with status {status:#x}")
        self.finish()

    def flush(self) -> None:
        self.region.flush()  # a pager dying meanwhile: asked again of the one that takes over
        self.counts["flushes"] += 1

    def finish(self) -> None:
        self.flush()
        for page in range(PAGES):
            self.check(page, self.model[page], "in memory at the end")
        del self.view
        self.region.close()
        with self.pager.map(self.url, PAGES * PAGE, **self.key) as again:
            self.view = again.view()
            for page in range(PAGES):
                self.check(page, self.model[page], "in the store at the end")
            del self.view
        self.pager.close()
        report("done", problems=self.problems[:10], **self.counts)


@child("client")
def client(socket_path: str, url: str, policy: str, tracking: str, key_file: str, seed: str) -> None:
    Client(socket_path, url, policy, tracking, key_file, int(seed)).run()


if __name__ == "__main__":
    CHILDREN.main()
