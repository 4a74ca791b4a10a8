"""The private pager process of a `Pager()`, started again when it dies.

The process is spawned, and respawned, by a native thread of this process
(native/restart.c): a thread stuck in a fault holds the GIL, so nothing in
Python could notice the pager's death while the program waits on it. The
new pager takes every region over from the durable state its predecessor
kept (takeover.py) and wakes the waiting threads; the library's next
request reconnects and claims the regions back (client.Connection).
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from dataclasses import dataclass

from uffd_pager.native import ffi, lib

# A pager that dies this often is not started again: one that cannot start
# (a state file it refuses, a broken install) must not be respawned forever.
MAX_RESTARTS = 5
MAX_RESTARTS_LIMIT = 64  # native/restart.c's ring of restart times
RESTART_WINDOW = 30.0  # seconds
LISTEN_FD = lib.UP_RESTART_LISTEN_FD  # where the pager finds the listening socket (serve --listen-fd)


@dataclass(frozen=True)
class RestartStatus:
    watching: bool  # a pager runs, or is being started again
    gave_up: bool  # it died too often (said on stderr), or could not be spawned
    pid: int  # the current pager's, 0 once there is none
    alive: bool
    restarts: int  # pagers started after the first


class PagerProcess:
    """The pager serving `listener` (whose descriptor it owns from now on),
    run as `argv` (argv[0] a path) with this process's environment."""

    def __init__(self, argv: list[str], listener: socket.socket, *, max_restarts: int = MAX_RESTARTS,
                 restart_window: float = RESTART_WINDOW) -> None:
        strings = [ffi.new("char[]", os.fsencode(a)) for a in argv]
        environment = [ffi.new("char[]", k + b"=" + v) for k, v in os.environb.items()]
        handle = lib.up_restart_spawn(ffi.new("char *[]", [*strings, ffi.NULL]),
                                      ffi.new("char *[]", [*environment, ffi.NULL]), listener.fileno(),
                                      max_restarts, int(restart_window * 1000))
        if handle == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot start the private pager {argv[0]}: {os.strerror(err)}")
        listener.detach()  # closed with the handle
        self._handle = handle
        self._restarting = False

    def restart_when_it_dies(self) -> None:
        if lib.up_restart_start(self._handle) < 0:
            err = ffi.errno
            raise OSError(err, f"cannot start the thread that restarts the private pager: {os.strerror(err)}")
        self._restarting = True

    def never_restart(self) -> None:
        """Once this pager is gone, no other listens at its address."""
        lib.up_restart_unbind(self._handle)

    def successor_may_come(self) -> bool:
        """Whether a new pager may still take this one's place."""
        return self._restarting and self.status().watching

    def status(self) -> RestartStatus:
        out = ffi.new("struct up_restart_status *")
        lib.up_restart_status(self._handle, out)
        return RestartStatus(watching=out.state == lib.UP_RESTART_WATCHING,
                             gave_up=out.state == lib.UP_RESTART_GAVE_UP, pid=out.pid, alive=bool(out.alive),
                             restarts=out.restarts)

    def stop(self, grace: float) -> None:
        """Stops restarting it, waits up to `grace` s for the pager to exit
        (it does once idle), then SIGTERM, then SIGKILL; reaps it; closes
        the listening socket."""
        lib.up_restart_stop(self._handle)
        pidfd = lib.up_restart_take_pidfd(self._handle)
        try:
            if pidfd >= 0:
                for sig in (None, signal.SIGTERM, signal.SIGKILL):
                    if sig is not None:
                        with contextlib.suppress(ProcessLookupError):  # it has just exited
                            signal.pidfd_send_signal(pidfd, sig)
                    if select.select([pidfd], [], [], grace)[0]:
                        break
                with contextlib.suppress(ChildProcessError):  # the program reaped it itself (a wait() for any child)
                    os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            lib.up_restart_free(self._handle)
            self._handle = ffi.NULL

    def forget_after_fork(self) -> None:
        """In a forked child: the restarter thread is the parent's, and so is
        the pager; drops the child's copies of their descriptors."""
        lib.up_restart_forget(self._handle)
        self._handle = ffi.NULL
