"""Claim 21: clients in containers. A client in its own pid and mount
namespace (made with unshare, the daemon's socket bind-mounted in) maps a
file only its namespace can see, forks, and both processes' portions are
byte-exact. The daemon knows each process by its connection: a fault's
thread id is namespace-local (the forked child is pid 2 in there, which on
the host is kthreadd), SO_PEERCRED's pid is translated by the kernel.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import uffd_pager
from conftest import Daemon
from support import ChildScript
from uffd_pager.sigbus import find_thread

CHILDREN_PY = Path(__file__).with_name("container_children.py")
PAGE = uffd_pager.PAGE_SIZE
PAGES = 16
UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--mount")

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")


def host_pid_of(ns_pid: int, candidates: list[int]) -> int | None:
    """The one of `candidates` (host pids) that its own pid namespace calls
    ns_pid (the last field of NSpid), if any."""
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = next(line for line in f if line.startswith("NSpid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if len(fields) > 1 and int(fields[-1]) == ns_pid:
            return pid
    return None


def regions_of(daemon: Daemon) -> list[dict]:
    with uffd_pager.connect(daemon.path) as pager:
        return pager.status()["region_list"]


@pytest.mark.parametrize("fork_policy", ["on-write", "at-fork", "on-access"])
def test_a_client_in_its_own_pid_and_mount_namespace_maps_a_file_only_it_sees_and_forks(
        daemon: Daemon, tmp_path: Path, fork_policy: str) -> None:
    hidden = tmp_path / "container-root"
    hidden.mkdir()
    client = ChildScript(CHILDREN_PY, "contained", daemon.path, hidden, fork_policy, wrapper=UNSHARE)
    try:
        mapped = client.expect("mapped")
        assert mapped["ns_pid"] == 1  # really in a pid namespace of its own
        assert not (hidden / "data").exists(), "the container's tmpfs is visible on the host"
        client.send("fork")
        reports = {m["what"]: m for m in (client.next(60), client.next(60)) if m is not None}
        assert set(reports) == {"child", "parent"}, f"{reports}{client.context()}"
        child, parent = reports["child"], reports["parent"]
        assert child["view_ok"] and child["portion_ok"], child
        assert parent["view_ok"] and parent["portion_ok"], parent
        assert child["offset"] != parent["offset"]  # the child's portion is its own

        # The daemon names the child by its host pid, not by its thread id in there (2).
        regions = regions_of(daemon)
        forked = [r for r in regions if r["parent"] is not None]
        roots = [r for r in regions if r["parent"] is None]
        assert len(forked) == 1 and len(roots) == 1, regions
        assert forked[0]["pid"] not in (0, 2) and roots[0]["pid"] != 1, regions
        assert host_pid_of(child["ns_pid"], [forked[0]["pid"]]) == forked[0]["pid"], forked
        assert host_pid_of(1, [roots[0]["pid"]]) == roots[0]["pid"], roots
        # Where a kernel has no UFFDIO_POISON, a fault's thread is found from its
        # namespace-local id (sigbus.py): by its process, or (a child not known
        # yet) by the namespace its parent forks into.
        assert find_thread(1, roots[0]["pid"]) == (roots[0]["pid"], roots[0]["pid"])
        assert find_thread(child["ns_pid"], 0, roots[0]["pid"]) == (forked[0]["pid"], forked[0]["pid"])

        # ... and watches that process: its region goes when it exits.
        client.send("end-child")
        assert client.expect("reaped")["status"] == 0
        deadline = time.monotonic() + 10
        while any(r["parent"] is not None for r in regions_of(daemon)):
            assert time.monotonic() < deadline, f"the exited child's region is still held: {regions_of(daemon)}"
            time.sleep(0.05)
        client.send("close")
        client.expect("closed")
    finally:
        client.kill(join_readers=True)


def test_a_forked_copy_is_claimed_only_with_the_token_its_own_tag_page_holds(daemon: Daemon, tmp_path: Path) -> None:
    """A child that never claims its copy (forked past Python's hooks): a
    process of the same uid naming the region cannot take the copy without
    the token, which only the child could read; the daemon finds the child
    gone once it exits, without ever knowing its pid."""
    data = tmp_path / "data"
    data.write_bytes(bytes(PAGES * PAGE))
    client = ChildScript(CHILDREN_PY, "unclaimed", daemon.path, f"file://{data}")
    try:
        forked = client.expect("forked")
        with uffd_pager.connect(daemon.path) as thief:
            for token, refused in (("00" * 16, KeyError), ("zz" * 16, ValueError), ("00", ValueError), (None, ValueError)):
                fields = {"token": token} if token is not None else {}
                with pytest.raises(refused):
                    thief._conn.request_fds("adopt", region=forked["region"], **fields)
        copies = [r for r in regions_of(daemon) if r["parent"] == forked["region"]]
        assert len(copies) == 1 and copies[0]["pid"] == 0, copies  # still unclaimed, still held for the child
        client.send("exit")
        client.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(r["parent"] is not None for r in regions_of(daemon)):
            assert time.monotonic() < deadline, f"the exited child's copy is still held: {regions_of(daemon)}"
            time.sleep(0.1)
    finally:
        client.kill(join_readers=True)
