"""Who may use a pager, and what each tenant (a client uid) may hold at once.

A connection's peer is known by SO_PEERCRED (uid and primary gid as the
kernel recorded them at connect()) and its supplementary groups by
/proc/PID/status, read right after accept: root and the pager's own uid
always, and the users and groups a daemon was told to allow.

The pager's state per region is small and sparse, but a client that maps
without end would still exhaust the pager's descriptors and memory for
every other client: each uid is held to a number of root regions, a
number of bytes mapped (forked children's copies count with their root)
and a number of the pager's descriptors: a connection costs two (its
socket and its page-out agent's), a root region three (its uffd, the
process's pagemap and pidfd). Store files are shared by every region of
a file, whoever mapped it, and are not counted.
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
from dataclasses import dataclass, field

from uffd_pager.errors import LimitExceeded

DEFAULT_MAX_REGIONS = 4096
DEFAULT_MAX_MAPPED = 1 << 50  # 1 PiB of address space: regions cost what is touched


def _ids(text: str, lookup: str) -> frozenset[int]:
    """The ids of a comma-separated list of names or numbers (`lookup`:
    "user" or "group"); ValueError names what is unknown."""
    ids: set[int] = set()
    if not text.strip():
        return frozenset()  # `allow-users = ""`: none
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"an empty {lookup} name in {text!r}")
        if item.isdigit():
            ids.add(int(item))
            continue
        try:
            ids.add(pwd.getpwnam(item).pw_uid if lookup == "user" else grp.getgrnam(item).gr_gid)
        except KeyError:
            raise ValueError(f"no {lookup} named {item!r} on this machine") from None
    return frozenset(ids)


def parse_users(text: str) -> frozenset[int]:
    """uids of "alice,1001"."""
    return _ids(text, "user")


def parse_groups(text: str) -> frozenset[int]:
    """gids of "pager-users,1001"."""
    return _ids(text, "group")


def _supplementary_groups(pid: int) -> frozenset[int]:
    """pid's supplementary groups as our user namespace sees them; none if
    it is gone (then it is not admitted by a group)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(gid) for gid in line.split()[1:])
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class Access:
    """Who may connect: root, the pager's uid, and these users and groups."""
    users: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()

    def admits(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()) or uid in self.users:
            return True
        return bool(self.groups) and (gid in self.groups or bool(self.groups & _supplementary_groups(pid)))

    def refusal(self, uid: int) -> PermissionError:
        allowed = "root and uid %d" % os.getuid()
        return PermissionError(errno.EACCES, f"uid {uid} may not use this pager: it admits {allowed}"
                                             f"{' and the users and groups it was given' if self.users or self.groups else ''}"
                                             " (uffd-pager serve --allow-users, --allow-groups)")


CONNECTION_FDS = 2
REGION_FDS = 3


@dataclass
class TenantLimits:
    max_regions: int = DEFAULT_MAX_REGIONS
    max_mapped: int = DEFAULT_MAX_MAPPED
    max_fds: int = 0  # 0: half of the pager's open-file limit (see PagerService)


@dataclass
class Tenants:
    limits: TenantLimits = field(default_factory=TenantLimits)
    _regions: dict[int, int] = field(default_factory=dict)
    _mapped: dict[int, int] = field(default_factory=dict)
    _connections: dict[int, int] = field(default_factory=dict)

    def descriptors(self, uid: int) -> int:
        """The pager's descriptors uid holds (see the module's doc)."""
        return CONNECTION_FDS * self._connections.get(uid, 0) + REGION_FDS * self._regions.get(uid, 0)

    def _check_fds(self, uid: int, more: int) -> None:
        if self.limits.max_fds and self.descriptors(uid) + more > self.limits.max_fds:
            raise LimitExceeded(errno.EDQUOT, f"uid {uid} holds {self.descriptors(uid)} of this pager's descriptors, "
                                              f"its limit is {self.limits.max_fds} (uffd-pager serve --tenant-max-fds)")

    def check_connect(self, uid: int) -> None:
        """Raises LimitExceeded if uid may not open another connection."""
        self._check_fds(uid, CONNECTION_FDS)

    def connected(self, uid: int) -> None:
        self._connections[uid] = self._connections.get(uid, 0) + 1

    def disconnected(self, uid: int) -> None:
        self._connections[uid] -= 1
        if not self._connections[uid]:
            del self._connections[uid]

    def check_map(self, uid: int, size: int) -> None:
        """Raises LimitExceeded if uid may not map another `size` bytes."""
        if self._regions.get(uid, 0) + 1 > self.limits.max_regions:
            raise LimitExceeded(errno.EDQUOT, f"uid {uid} holds {self._regions[uid]} regions, the limit of this "
                                              "pager (uffd-pager serve --max-regions)")
        if self._mapped.get(uid, 0) + size > self.limits.max_mapped:
            raise LimitExceeded(errno.EDQUOT, f"uid {uid} would map {self._mapped.get(uid, 0) + size} bytes, past "
                                              f"the limit of {self.limits.max_mapped} (uffd-pager serve --max-mapped)")
        self._check_fds(uid, REGION_FDS)

    def add(self, uid: int, size: int) -> None:
        self._regions[uid] = self._regions.get(uid, 0) + 1
        self._mapped[uid] = self._mapped.get(uid, 0) + size

    def usage(self) -> dict[int, tuple[int, int]]:
        """uid -> (root regions, bytes mapped), of every uid holding any."""
        return {uid: (count, self._mapped[uid]) for uid, count in self._regions.items()}

    def remove(self, uid: int, size: int) -> None:
        self._regions[uid] -= 1
        self._mapped[uid] -= size
        if not self._regions[uid]:
            del self._regions[uid], self._mapped[uid]
