"""Child processes for tests/test_errors.py, as importable code.

Run one as ``python errors_children.py NAME ARGS...``. These keep the stdout
protocol the tests parse: the whole of stdout is one JSON object (without the
"what"/"pid" keys of tests/child.py).
"""
from __future__ import annotations

import faulthandler
import json
import os
import threading

import uffd_pager
from child import PlainRegistry

CHILDREN = PlainRegistry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE


@child("without-ptrace")
def without_ptrace(url: str) -> None:
    """Run without CAP_SYS_PTRACE: maps a region, writes, flushes and reads
    it back, then forks; the forked child reports what a request about the
    region raised and then touches it (a SIGSEGV: it does not have that
    memory). Reports as JSON lines: the child's, then the parent's."""
    with uffd_pager.Pager() as pager:
        region = pager.map(url, 4 * 4096, writeback_interval=0)
        view = region.view()
        view[:5] = b"hello"
        flushed = region.flush()["pages"]
        pid = os.fork()
        if pid == 0:
            try:
                region.stats()
                error = None
            except Exception as exc:
                error = [type(exc).__name__, str(exc)]
            os.write(1, (json.dumps({"child_error": error}) + "\n").encode())
            view[0]  # not mapped in this process: SIGSEGV
            os._exit(4)
        _, status = os.waitpid(pid, 0)
        read_back = bytes(view[:5]).decode()
        del view
        region.close()
        regions = pager.status()["regions"]
    with open("/proc/self/status") as f:
        caps = int(f.read().split("CapEff:")[1].split()[0], 16)
    print(json.dumps({"caps": caps, "flushed": flushed, "read_back": read_back, "regions": regions,
                      "child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "child_exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)


@child("older-kernel")
def older_kernel(url: str) -> None:
    """Run with features hidden ($UFFD_PAGER_HIDE_FEATURES, as on an older
    kernel): maps with the default tracking, writes, flushes, and tries
    dirty_tracking="async" explicitly. One JSON line."""
    with uffd_pager.Pager() as pager:
        region = pager.map(url, 4 * 4096, writeback_interval=0)
        region.view()[:5] = b"older"
        report = {"tracking": region.stats()["tracking"], "flushed": region.flush()["pages"]}
        region.close()
        try:
            pager.map(url, 4096, dirty_tracking="async").close()
            report["async"] = None
        except OSError as exc:
            report["async"] = [type(exc).__name__, str(exc)]
        report["regions"] = pager.status()["regions"]
    print(json.dumps(report), flush=True)


@child("embedded-read")
def embedded_read(url: str) -> None:
    """A private pager's region of url: its first byte, as JSON."""
    with uffd_pager.Pager() as pager, pager.map(url, PAGE) as region:
        print(json.dumps({"first": region.view()[0]}), flush=True)


@child("no-poison")
def no_poison(url: str) -> None:
    """Run with POISON hidden from the pager (as on Linux < 6.6): writes two
    pages of an encrypted region, flushes, alters a byte of page 1's
    ciphertext in the file, maps again and reads page 0 (its first byte,
    as JSON), then touches page 1 from a thread of its own: faulthandler
    shows which thread the SIGBUS reached (the faulting one is in touch_page)."""
    key = uffd_pager.Key.generate()
    with uffd_pager.Pager() as pager:
        with pager.map(url, 2 * PAGE, key=key, writeback_interval=0) as region:
            region.view()[:] = b"\x5a" * (2 * PAGE)
            region.flush()
        with open(url.removeprefix("file://"), "r+b") as f:
            f.seek(PAGE + 100)
            byte = f.read(1)
            f.seek(PAGE + 100)
            f.write(bytes([byte[0] ^ 1]))
        region = pager.map(url, 2 * PAGE, key=key, writeback_interval=0, read_ahead="off")
        print(json.dumps({"page0": region.view()[0]}), flush=True)
        faulthandler.enable()
        toucher = threading.Thread(target=touch_page, args=(region, 1), name="toucher")
        toucher.start()
        toucher.join()
    print(json.dumps({"page1": "handed out"}), flush=True)  # never: those would be unauthenticated bytes


def touch_page(region: uffd_pager.Region, page: int) -> None:
    region.view()[page * PAGE]


if __name__ == "__main__":
    CHILDREN.main()
