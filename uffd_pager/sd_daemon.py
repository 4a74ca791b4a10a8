"""The daemon under systemd (sd-daemon(3)): socket activation and sd_notify, without libsystemd.

Socket activation (sd_listen_fds(3)): systemd passes the sockets of the
`.socket` unit as descriptors 3, 4, ... and says so in `LISTEN_FDS`, with
`LISTEN_PID` the pid they are meant for. The variables are inherited by
every process the daemon starts, so they count only when `LISTEN_PID` is
ours, and are removed from the environment once read.

Notification (sd_notify(3)): one datagram of `KEY=VALUE` lines to the
AF_UNIX socket named by `NOTIFY_SOCKET` (a leading "@" means the abstract
namespace). `READY=1` once serving (a Type=notify unit's start is done),
`STOPPING=1` when shutting down, and with `WatchdogSec=` in the unit
(`WATCHDOG_USEC`, and `WATCHDOG_PID` if set must be ours) `WATCHDOG=1` at
half that interval, from the loop that serves faults: a loop that stops
turning stops the keep-alives, and systemd restarts the daemon.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Coroutine

log = logging.getLogger("uffd_pager.sd_daemon")

_LISTEN_FDS_START = 3


def activated_listener() -> socket.socket | None:
    """The listening socket systemd passed to this process, or None if it
    passed none. Refuses (SystemExit) what the pager cannot serve on."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise SystemExit(f"uffd-pager: systemd passed LISTEN_FDS={count!r}; the pager serves on exactly one "
                         "socket (one ListenSequentialPacket= in the .socket unit)")
    fd = _LISTEN_FDS_START
    os.set_inheritable(fd, False)  # passed to us, not to what we start
    listener = socket.socket(fileno=fd)
    if (listener.family, listener.type) != (socket.AF_UNIX, socket.SOCK_SEQPACKET) or \
            not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.detach()
        raise SystemExit("uffd-pager: the socket systemd passed is not a listening AF_UNIX SOCK_SEQPACKET socket "
                         "(the .socket unit needs ListenSequentialPacket=PATH)")
    return listener


class Notifier:
    """Reports the daemon's state to $NOTIFY_SOCKET; does nothing without one."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
        watchdog_usec = os.environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.pop("WATCHDOG_PID", "")
        # Removed, as sd_notify(unset_environment=1) does: a process we start must not speak for us.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        if self._sock and watchdog_usec.isdigit() and int(watchdog_usec) > 0 and \
                watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 2e6

    def notify(self, state: str) -> None:
        """Sends `state` ("READY=1", ...); a failure is logged, never raised:
        the pager serves on whatever its supervisor does."""
        if self._sock is None:
            return
        try:
            self._sock.sendto(state.encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify %s to %r failed: %s", state, self._address, exc)

    async def supervise(self, serving: Coroutine[Any, Any, None]) -> None:
        """Runs `serving`: READY=1 once it has started (its listener is in
        the loop), WATCHDOG=1 meanwhile if asked for."""
        task = asyncio.ensure_future(serving)
        await asyncio.sleep(0)
        if not task.done():
            self.notify("READY=1")
        keep_alive = asyncio.ensure_future(self._keep_alive())
        try:
            await task
        finally:
            keep_alive.cancel()

    async def _keep_alive(self) -> None:
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
