"""systemd's part in tests/test_systemd.py, as importable code.

Run one as ``python systemd_children.py NAME ARGS...``.
"""
from __future__ import annotations

import os
import sys

from child import PlainRegistry

CHILDREN = PlainRegistry()
child = CHILDREN.register


@child("activate")
def activate(fd: str, *command: str) -> None:
    """What systemd does for the service of a socket unit: the listening
    socket `fd` becomes descriptor 3, and LISTEN_FDS/LISTEN_PID say so for
    this very process, whose pid `command` keeps (exec)."""
    os.dup2(int(fd), 3)  # inheritable, as dup2 makes it
    if int(fd) != 3:
        os.close(int(fd))
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="uffd-pager.socket")
    sys.stdout.flush()
    os.execvp(command[0], list(command))


if __name__ == "__main__":
    CHILDREN.main()
