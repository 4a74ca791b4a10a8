"""systemd's part in tests/test_systemd.py, as importable code.

Run one as ``python systemd_children.py NAME ARGS...``.
"""
from __future__ import annotations

import os

from child import PlainRegistry

CHILDREN = PlainRegistry()
child = CHILDREN.register


@child("activate")
def activate(fd: str, *command: str) -> None:
    """What systemd does for the service of a socket unit: the listening
    socket `fd` becomes descriptor 3, and LISTEN_FDS/LISTEN_PID say so for
    this very process, whose pid `command` keeps (exec)."""
    if int(fd) != 3:  # (passed as 3, it is inheritable already)
        os.dup2(int(fd), 3)  # inheritable, as dup2 makes it
        os.close(int(fd))
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="uffd-pager.socket")
    os.execvp(command[0], list(command))


if __name__ == "__main__":
    CHILDREN.main()
