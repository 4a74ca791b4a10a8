"""Child processes for tests/test_errors.py, as importable code.

Run one as ``python errors_children.py NAME ARGS...``. These keep the stdout
protocol the tests parse: the whole of stdout is one JSON object (without the
"what"/"pid" keys of tests/child.py).
"""
from __future__ import annotations

import json
import os

import uffd_pager
from child import PlainRegistry

CHILDREN = PlainRegistry()
child = CHILDREN.register


def uffd_fds() -> int:
    return sum("userfaultfd" in os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))


@child("without-ptrace")
def without_ptrace(url: str) -> None:
    """Run without CAP_SYS_PTRACE: reports its capabilities and what map() raised."""
    with uffd_pager.Pager() as pager:
        fds = uffd_fds()
        try:
            pager.map(url, 4096)
            error = None
        except Exception as exc:
            error = [type(exc).__name__, str(exc)]
        regions = pager.status()["regions"]
    with open("/proc/self/status") as f:
        caps = int(f.read().split("CapEff:")[1].split()[0], 16)
    print(json.dumps({"caps": caps, "error": error, "new_uffd_fds": uffd_fds() - fds, "regions": regions}))


if __name__ == "__main__":
    CHILDREN.main()
