"""A client process in a container of its own, for tests/test_containers.py:
``unshare --pid --fork --mount-proc --mount python container_children.py
NAME ARGS...`` (see tests/child.py for the reports and orders).

Inside, the process is pid 1 of a new pid namespace with a mount
namespace of its own: it mounts a tmpfs that no other namespace sees, puts
its data file there, bind-mounts the daemon's socket in (as a container
runtime would), maps the file through the daemon, and forks.
"""
from __future__ import annotations

import ctypes
import os
import subprocess

import uffd_pager
from child import Registry, order, report

CHILDREN = Registry()
child = CHILDREN.register
PAGE = uffd_pager.PAGE_SIZE
PAGES = 16


def original(page: int) -> bytes:
    return bytes([page + 1]) * PAGE


def _portion(url: str, offset: int) -> bytes:
    with open(url.removeprefix("file://"), "rb") as f:
        f.seek(offset)
        return f.read(PAGES * PAGE)


def _private_mounts(directory: str, host_socket: str) -> str:
    """A tmpfs on `directory`, in this mount namespace only, holding the
    data file and the daemon's socket bound in; returns the socket's path."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "uffd-ns", directory], check=True)
    with open(os.path.join(directory, "data"), "wb") as f:
        f.write(b"".join(original(page) for page in range(PAGES)))
    socket_path = os.path.join(directory, "pager.sock")
    open(socket_path, "w").close()
    subprocess.run(["mount", "--bind", host_socket, socket_path], check=True)
    return socket_path


@child("contained")
def contained(host_socket: str, directory: str, fork_policy: str) -> None:
    """Reports "mapped" (this process's pid as its namespace sees it), then
    on the order "fork": the forked child writes pages 0-3, flushes and
    checks its own portion, reports "child" and waits; the parent writes
    pages 4-7, flushes, checks its portion and reports "parent". On
    "end-child" the child exits and the parent reports "reaped"; on "close"
    the region closes."""
    pager = uffd_pager.connect(_private_mounts(directory, host_socket))
    url = "file://" + os.path.join(directory, "data")
    region = pager.map(url, PAGES * PAGE, fork_policy=fork_policy, writeback_interval=0)
    view = region.view()
    assert bytes(view) == b"".join(original(page) for page in range(PAGES)), "the region does not read the file"
    report("mapped", ns_pid=os.getpid())
    assert order() == "fork"
    go_on, hold = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(hold)
        for page in range(4):
            view[page * PAGE:(page + 1) * PAGE] = b"\x22" * PAGE
        region.flush()
        backing = region.backing()
        assert backing is not None, "the child's portion is not placed after its flush"
        expected = b"\x22" * (4 * PAGE) + b"".join(original(page) for page in range(4, PAGES))
        report("child", ns_pid=os.getpid(), offset=backing.offset, view_ok=bytes(view) == expected,
               portion_ok=_portion(backing.url, backing.offset) == expected)
        os.read(go_on, 1)  # until the parent says so
        os._exit(0)
    os.close(go_on)
    for page in range(4, 8):
        view[page * PAGE:(page + 1) * PAGE] = b"\x33" * PAGE
    region.flush()
    expected = b"".join(original(page) for page in range(4)) + b"\x33" * (4 * PAGE) \
        + b"".join(original(page) for page in range(8, PAGES))
    report("parent", view_ok=bytes(view) == expected, portion_ok=_portion(url, 0) == expected,
           offset=region.backing().offset)
    assert order() == "end-child"
    os.close(hold)
    _, status = os.waitpid(pid, 0)
    report("reaped", status=status)
    assert order() == "close"
    del view
    region.close()
    pager.close()
    report("closed")


@child("unclaimed")
def unclaimed(socket_path: str, url: str) -> None:
    """Maps url through the daemon and forks with libc's fork(), which runs
    none of Python's at-fork hooks: the child never claims its copy. Reports
    "forked" (the region's id, the child's pid); on any order the child exits."""
    pager = uffd_pager.connect(socket_path)
    region = pager.map(url, PAGES * PAGE, writeback_interval=0)
    go_on, hold = os.pipe()
    pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        os.close(hold)
        os.read(go_on, 1)  # until the parent closes its end
        os._exit(0)
    assert pid > 0, os.strerror(ctypes.get_errno())
    report("forked", region=region._id, child=pid)
    order()
    os.close(hold)
    os.waitpid(pid, 0)
    os._exit(0)


if __name__ == "__main__":
    CHILDREN.main()
