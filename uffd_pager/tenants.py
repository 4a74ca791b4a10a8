"""What each tenant (a client uid) of a pager may hold at once.

The pager's state per region is small and sparse, but a client that maps
without end would still exhaust the pager's descriptors and memory for
every other client: each uid is held to a number of root regions and a
number of bytes mapped (forked children's copies count with their root).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from uffd_pager.errors import LimitExceeded

DEFAULT_MAX_REGIONS = 4096
DEFAULT_MAX_MAPPED = 1 << 50  # 1 PiB of address space: regions cost what is touched


@dataclass
class TenantLimits:
    max_regions: int = DEFAULT_MAX_REGIONS
    max_mapped: int = DEFAULT_MAX_MAPPED


@dataclass
class Tenants:
    limits: TenantLimits = field(default_factory=TenantLimits)
    _regions: dict[int, int] = field(default_factory=dict)
    _mapped: dict[int, int] = field(default_factory=dict)

    def check_map(self, uid: int, size: int) -> None:
        """Raises LimitExceeded if uid may not map another `size` bytes."""
        if self._regions.get(uid, 0) + 1 > self.limits.max_regions:
            raise LimitExceeded(errno.EDQUOT, f"uid {uid} holds {self._regions[uid]} regions, the limit of this "
                                              "pager (uffd-pager serve --max-regions)")
        if self._mapped.get(uid, 0) + size > self.limits.max_mapped:
            raise LimitExceeded(errno.EDQUOT, f"uid {uid} would map {self._mapped.get(uid, 0) + size} bytes, past "
                                              f"the limit of {self.limits.max_mapped} (uffd-pager serve --max-mapped)")

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
