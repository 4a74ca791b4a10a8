"""Taking a dead pager's clients over: the descriptors of a recorded region
(durable.py), fetched from the client's own fd table with pidfd_getfd, so
that a client whose only thread is stuck in a fault (holding the GIL, so
it could never reconnect) is served again without running any code.

Kernel facts this relies on:
- pidfd_getfd(2) (Linux 5.6) duplicates another process's descriptor into
  ours: the same open file description (its access mode, its uffd
  context). It needs PTRACE_MODE_ATTACH_REALCREDS over the process: the
  same uid and no dumpable/yama restriction, or CAP_SYS_PTRACE (a root
  daemon has it).
- Every userfaultfd is the same anonymous inode ("anon_inode:[userfaultfd]"
  in /proc/PID/fd): it is told apart by what it has registered. A range
  registered with uffd A is refused by UFFDIO_REGISTER through uffd B
  (EBUSY, fs/userfaultfd.c userfaultfd_register), and registering it again
  through A with the same mode changes nothing. The probe registers only a
  page whose VMA /proc/PID/smaps shows registered already ("um" in
  VmFlags), so it never registers anything new.
- A thread waiting in a fault whose message the dead pager had read waits
  for a wake-up that will never come; UFFDIO_WAKE over the range wakes it,
  and its access faults again, into a message the new pager reads. Messages
  not read yet are still queued in the uffd.
- With WP_ASYNC the kernel keeps every unflushed write in the page tables
  (the uffd-wp bit is clear on written pages), so PAGEMAP_SCAN finds them at
  the next flush; with "sync" tracking the dead pager's record of written
  pages is gone, and the same scan recovers it (a page the pager
  unprotected on its first write has the bit clear too).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from uffd_pager.durable import RegionRecord, process_start
from uffd_pager.native import ffi, lib
from uffd_pager.uffd import PAGE_SIZE, RegisterMode, Uffd

log = logging.getLogger("uffd_pager.pager")
_UFFD_LINK = "anon_inode:[userfaultfd]"
REGISTER_MODE = RegisterMode.MISSING | RegisterMode.WP  # the library's registration (client.REGION_REGISTER_MODE)


@dataclass
class Reclaimed:
    """A recorded region's descriptors, ours now (the caller closes them)."""
    pidfd: int
    uffd: int
    descriptors: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in (self.pidfd, self.uffd, *self.descriptors.values()):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def pidfd_getfd(pidfd: int, target: int) -> int:
    fd = lib.up_pidfd_getfd(pidfd, target)
    if fd < 0:
        raise OSError(ffi.errno, f"pidfd_getfd of descriptor {target}: {os.strerror(ffi.errno)}")
    return fd


def reclaim(record: RegionRecord, *, source: RegionRecord | None = None, uffd: bool = True,
            descriptors: bool = True) -> Reclaimed:
    """The region's descriptors (its uffd, those it keeps open) from its
    live process, or the store descriptors alone from `source`'s, a forked
    descendant that inherited them; ProcessLookupError if the process is
    gone (or its pid is another's now), LookupError if a descriptor cannot
    be found there."""
    source = source or record
    pid = source.pid
    if process_start(pid) != source.pid_start:
        raise ProcessLookupError(f"pid {pid} has exited")
    pidfd = os.pidfd_open(pid)
    reclaimed = Reclaimed(pidfd, -1)
    try:
        if process_start(pid) != source.pid_start:  # the pidfd names whoever held the pid when opened
            raise ProcessLookupError(f"pid {pid} has exited")
        address, size = record.request["address"], record.request["size"]
        links = _descriptors_of(pid)
        probe = _registered_page(pid, address, size) if uffd else None
        for target, link in links.items():
            if link == _UFFD_LINK and reclaimed.uffd < 0 and probe is not None:
                fd = pidfd_getfd(pidfd, target)
                if _registers(fd, probe):
                    reclaimed.uffd = fd
                else:
                    os.close(fd)
        if uffd and reclaimed.uffd < 0:
            raise LookupError(f"pid {pid} holds no userfaultfd with {address:#x}+{size:#x} registered")
        for name, identity in record.descriptors.items() if descriptors else ():
            target = _find_file(pid, links, tuple(identity))
            if target is None:
                raise LookupError(f"pid {pid} no longer holds the {name} descriptor it passed")
            reclaimed.descriptors[name] = pidfd_getfd(pidfd, target)
    except BaseException:
        reclaimed.close()
        raise
    return reclaimed


def _descriptors_of(pid: int) -> dict[int, str]:
    links = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return links


def _registered_page(pid: int, address: int, size: int) -> int | None:
    """A page of the registration (the tag page first, then the region's)
    whose VMA is uffd-registered for missing faults, or None."""
    vmas = []
    with open(f"/proc/{pid}/smaps") as f:
        start = end = 0
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
            elif head == "VmFlags:" and "um" in line.split()[1:]:
                vmas.append((start, end))
    for page in (address + size, address):
        if any(s <= page < e for s, e in vmas):
            return page
    return None


def _registers(fd: int, page: int) -> bool:
    """Whether page is registered with this uffd (see the module's doc)."""
    try:
        Uffd(fd).register(page, PAGE_SIZE, REGISTER_MODE)
    except OSError as exc:
        log.debug("takeover: the probe of page %#x through a userfaultfd: %s", page, exc)
        return False
    return True


def _find_file(pid: int, links: dict[int, str], identity: tuple[int, ...]) -> int | None:
    """The process's descriptor of the file with that (st_dev, st_ino), a
    writable one if it has several."""
    found = []
    for target, link in links.items():
        if link == _UFFD_LINK:
            continue
        try:
            st = os.stat(f"/proc/{pid}/fd/{target}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == identity:
            found.append(target)
    for target in found:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/fdinfo/{target}") as f:
            flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            if flags & os.O_ACCMODE == os.O_RDWR:
                return target
    return found[0] if found else None


def identity_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
