"""Child processes for tests/test_writeback.py, as importable code.

Run one as ``python writeback_children.py NAME ARGS...``. These keep the
stdout protocol the tests parse: plain ``print`` lines (a hex digest, a
"flushed PAGES PID" line, "close failed ERRNO") or one JSON object a line
*without* the "what"/"pid" keys of tests/child.py, since the tests compare
whole lines. A child that raises prints its traceback on stderr and exits
with status 1, as a ``python -c`` script would; each ends through the
interpreter's own exit unless it says os._exit.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from typing import Any

import uffd_pager
from child import PlainRegistry

PAGE = uffd_pager.PAGE_SIZE

CHILDREN = PlainRegistry()
child = CHILDREN.register


# --- libc ----------------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.mremap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.munmap.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
MAP_FAILED = ctypes.c_void_p(-1).value


def check(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --- helpers -------------------------------------------------------------------------------


def pattern(tag: str, page: int) -> bytes:
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def pages_of(data: bytes) -> list[bytes]:
    return [bytes(data[p * PAGE:(p + 1) * PAGE]) for p in range(len(data) // PAGE)]


def differing(actual: bytes, expected: list[bytes]) -> list[int]:
    return [p for p, (a, e) in enumerate(zip(pages_of(actual), expected)) if a != e]


def mapped(start: int, end: int) -> bool:
    """Whether any byte of [start, end) is mapped in this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            s, e = (int(x, 16) for x in line.split()[0].split("-"))
            if s < end and start < e:
                return True
    return False


def original_pages(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return pages_of(f.read())


# --- 1. a new process reads the region --------------------------------------------------------


@child("read-sha256")
def read_sha256(path: str, size_arg: str, offset_arg: str) -> None:
    size, offset = int(size_arg), int(offset_arg)
    with uffd_pager.Pager() as pager:
        region = pager.map("file://" + path, size, offset=offset, writeback_interval=0)
        view = region.view()
        digest = hashlib.sha256()
        for start in range(0, size, 1 << 20):
            digest.update(view[start:start + (1 << 20)])
        del view
        region.close()
    print(digest.hexdigest(), flush=True)


# --- 3. a client killed right after flush ------------------------------------------------------


@child("killed-client")
def killed_client(path: str, mode: str, npages_arg: str) -> None:
    npages = int(npages_arg)
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, npages * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    for page in range(0, npages, 2):
        view[page * PAGE:(page + 1) * PAGE] = pattern("flushed", page)
    result = region.flush()
    print("flushed", result["pages"], pager.pid, flush=True)
    for page in range(1, npages, 2):
        view[page * PAGE:(page + 1) * PAGE] = pattern("unflushed", page)
    time.sleep(120)


# --- 5. the program's own madvise(DONTNEED), mremap, munmap ----------------------------------


@child("remove")
def remove(path: str, mode: str) -> None:
    original = original_pages(path)
    N = 64
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, N * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = region.view()

    def put(tag: str, pages) -> None:
        for p in pages:
            view[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)

    put("A", range(0, 16))
    first = region.flush()
    put("B", range(0, 16))        # pages 0-15: flushed A, now B not flushed
    put("C", range(16, 32))       # pages 16-31: C, never flushed
    bytes(view[32 * PAGE:48 * PAGE])  # pages 32-47: read only
    check(libc.madvise(region.address + 8 * PAGE, 16 * PAGE, MADV_DONTNEED) == 0, "madvise")  # drop pages 8-23
    after = region.stats()
    expected = list(original[:N])
    for p in range(0, 8):
        expected[p] = pattern("B", p)
    for p in range(8, 16):
        expected[p] = pattern("A", p)    # the last flushed content
    for p in range(24, 32):
        expected[p] = pattern("C", p)
    memory_differs = differing(bytes(view), expected)
    put("D", [10, 20])            # written again after the drop
    second = region.flush()
    report(first=first, remove=after["events"]["remove"], memory_differs=memory_differs, second=second,
           dirty_after=region.stats()["dirty_pages"])
    del view
    region.close()
    pager.close()
    report(closed=True)


@child("remap")
def remap(path: str, mode: str) -> None:
    original = original_pages(path)
    N = 1024
    size = N * PAGE
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, size, dirty_tracking=mode, writeback_interval=0)
    view = region.view()

    def put(tag: str, pages) -> None:
        for p in pages:
            view[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)

    put("A", range(0, 10))
    first = region.flush()
    put("B", range(5, 10))        # flushed, then written again: dirty when moved
    put("C", range(20, 30))       # written, never flushed: dirty when moved
    bytes(view[30 * PAGE:40 * PAGE])  # read only
    old = region.address
    del view
    target = libc.mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    check(target not in (None, MAP_FAILED), "mmap")
    new = libc.mremap(old, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    check(new not in (None, MAP_FAILED), "mremap")
    after = region.stats()
    for p in [35, 36, 37] + list(range(900, 910)):  # read before the move / never touched
        ctypes.memmove(new + p * PAGE, pattern("D", p), PAGE)
    expected = list(original[:N])
    for p in range(0, 5):
        expected[p] = pattern("A", p)
    for p in range(5, 10):
        expected[p] = pattern("B", p)
    for p in range(20, 30):
        expected[p] = pattern("C", p)
    for p in [35, 36, 37] + list(range(900, 910)):
        expected[p] = pattern("D", p)
    memory_differs = differing(ctypes.string_at(new, size), expected)  # every other page faults in at `new`
    second = region.flush()
    third = region.flush()
    report(moved=new == target, old_is_new=old == new, first=first, events=after["events"],
           memory_differs=memory_differs, second=second, third=third, dirty_after=region.stats()["dirty_pages"],
           errors=region.stats()["errors"], old=old, new=new)
    try:
        region.close()
        close_error = None
    except Exception as exc:
        close_error = f"{type(exc).__name__}: {exc}"
    report(closed=region.closed, close_error=close_error, new_still_mapped=mapped(new, new + size))
    pager.close()
    report(done=True)


@child("unmap")
def unmap(path: str, mode: str) -> None:
    original = original_pages(path)
    N = 512
    half = N // 2
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, N * PAGE, dirty_tracking=mode, writeback_interval=0)
    view = region.view()

    def put(tag: str, pages) -> None:
        for p in pages:
            view[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)

    put("A", list(range(0, 10)) + list(range(300, 310)))
    first = region.flush()
    put("B", list(range(5, 15)) + list(range(305, 315)))   # not flushed, in both halves
    bytes(view[100 * PAGE:110 * PAGE])
    bytes(view[400 * PAGE:410 * PAGE])
    addr = region.address
    del view
    check(libc.munmap(addr + half * PAGE, half * PAGE) == 0, "munmap")
    after = region.stats()
    expected = list(original[:half])
    for p in range(0, 5):
        expected[p] = pattern("A", p)
    for p in range(5, 15):
        expected[p] = pattern("B", p)
    for p in range(20, 30):
        ctypes.memmove(addr + p * PAGE, pattern("C", p), PAGE)
        expected[p] = pattern("C", p)
    memory_differs = differing(ctypes.string_at(addr, half * PAGE), expected)
    second = region.flush()
    third = region.flush()
    report(first=first, events=after["events"], memory_differs=memory_differs, second=second, third=third,
           dirty_after=region.stats()["dirty_pages"])
    try:
        region.close()
        close_error = None
    except Exception as exc:
        close_error = f"{type(exc).__name__}: {exc}"
    report(closed=region.closed, close_error=close_error)
    pager.close()
    report(done=True)


# --- 8. close() and exit after something went wrong --------------------------------------------


@child("give-up-after-a-failed-close")
def give_up_after_a_failed_close(path: str) -> None:
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, 1 << 20, writeback_interval=0)
    view = region.view()
    view[:] = os.urandom(1 << 20)
    try:
        region.close()
    except OSError as exc:
        print("close failed", exc.errno, flush=True)
    # The writes cannot be saved: the program gives up on them and drops its
    # objects, the view last (as interpreter shutdown may well do).
    del region, pager
    time.sleep(0.5)
    del view  # the last reference to the mapping: munmap
    print("released", flush=True)


@child("close-after-remap")
def close_after_remap(path: str, mode: str) -> None:
    size = 256 * PAGE
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, size, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    view[:PAGE] = pattern("A", 0)
    old = region.address
    del view
    target = libc.mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    check(target not in (None, MAP_FAILED), "mmap")
    new = libc.mremap(old, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    check(new == target, "mremap")
    # The old range is free now: the program (or its allocator) maps something there.
    mine = libc.mmap(old, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    check(mine == old, "mmap at the old address")
    ctypes.memmove(mine, b"mine", 4)
    ctypes.memmove(new + PAGE, pattern("B", 1), PAGE)
    try:
        region.close()
        close_error = None
    except Exception as exc:
        close_error = f"{type(exc).__name__}: {exc}"
    mine_still_mapped = mapped(old, old + 4 * PAGE)
    report(close_error=close_error, closed=region.closed, region_still_mapped=mapped(new, new + size),
           mine_still_mapped=mine_still_mapped)
    if mine_still_mapped:
        report(mine=ctypes.string_at(mine, 4).decode())
    if close_error:
        os._exit(3)  # a region left open can hang the interpreter's exit; that is another test
    pager.close()
    report(done=True)


@child("map-into-unmapped-half")
def map_into_unmapped_half(path: str, mode: str) -> None:
    size = 256 * PAGE
    half = size // 2
    pager = uffd_pager.Pager()
    region = pager.map("file://" + path, size, dirty_tracking=mode, writeback_interval=0)
    view = region.view()
    view[:PAGE] = pattern("A", 0)
    first = region.flush()
    addr = region.address
    del view
    check(libc.munmap(addr + half, half) == 0, "munmap")
    # The unmapped half is free now: the program (or its allocator) maps something there.
    mine = libc.mmap(addr + half, 4 * PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    check(mine == addr + half, "mmap in the unmapped half")
    ctypes.memmove(mine, b"mine", 4)
    ctypes.memmove(addr + PAGE, pattern("B", 1), PAGE)
    try:
        second = region.flush()
        flush_error = None
    except Exception as exc:
        second, flush_error = None, f"{type(exc).__name__}: {exc}"
    try:
        region.close()
        close_error = None
    except Exception as exc:
        close_error = f"{type(exc).__name__}: {exc}"
    mine_still_mapped = mapped(addr + half, addr + half + 4 * PAGE)
    report(first=first, second=second, flush_error=flush_error, close_error=close_error, closed=region.closed,
           region_still_mapped=mapped(addr, addr + half), mine_still_mapped=mine_still_mapped)
    if mine_still_mapped:
        report(mine=ctypes.string_at(mine, 4).decode())
    if close_error:
        os._exit(3)  # a region left open can hang the interpreter's exit; that is another test
    pager.close()
    report(done=True)


if __name__ == "__main__":
    CHILDREN.main()
