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
- /proc/PID/smaps lists the VMAs by address, and the kernel walks each
  one's page tables to write its entry (some 15 us each; a Python client
  has hundreds, its regions usually low, just above the heap): it is read
  once per process, and only as far as the highest page looked for.
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
import errno
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

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


@dataclass(frozen=True)
class Claim:
    """What a recorded region needs from a live process: its uffd and the
    descriptors it keeps, from its own process; or the store descriptors
    alone from `source`, a forked descendant that inherited them."""
    record: RegionRecord
    source: RegionRecord
    uffd: bool = True
    descriptors: bool = True


class Reclaimer:
    """The claims of a takeover, a process's all at once when the first of
    them is taken: each live process's fd table and mappings are read once
    for every claim on it, just before its uffds are probed, so that what
    was read is as fresh as it can be."""

    def __init__(self, claims: Iterable[Claim]) -> None:
        self._claims: dict[tuple[int, int], list[Claim]] = defaultdict(list)
        self._process_of: dict[int, tuple[int, int]] = {}
        for claim in claims:
            self._claims[claim.source.pid, claim.source.pid_start].append(claim)
            self._process_of[claim.record.id] = claim.source.pid, claim.source.pid_start
        self._results: dict[int, Reclaimed | Exception] = {}

    def take(self, record: RegionRecord) -> Reclaimed:
        """The claim's descriptors, ours now; ProcessLookupError if the
        process is gone (or its pid is another's now), LookupError if a
        descriptor cannot be found there."""
        if record.id not in self._results:
            process = self._process_of[record.id]
            self._results.update(_reclaim_from(*process, self._claims.pop(process)))
        result = self._results.pop(record.id)
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        """Closes what no one took (a parent's takeover failed)."""
        for result in self._results.values():
            if isinstance(result, Reclaimed):
                result.close()
        self._results.clear()


def _reclaim_from(pid: int, start: int, claims: list[Claim]) -> dict[int, Reclaimed | Exception]:
    """Each claim on one process, by its record's id, or why not."""
    try:
        process = _LiveProcess(pid, start, [c.record for c in claims if c.uffd])
    except Exception as exc:
        return {c.record.id: exc for c in claims}
    results: dict[int, Reclaimed | Exception] = {}
    try:
        for claim in claims:
            try:
                results[claim.record.id] = process.reclaim(claim)
            except Exception as exc:
                results[claim.record.id] = exc
    except BaseException:
        for result in results.values():
            if isinstance(result, Reclaimed):
                result.close()
        raise
    finally:
        process.close()
    return results


class _LiveProcess:
    """A live process's descriptors, read once from /proc: its fd table, and
    which of its uffds has each recorded region registered (see the
    module's doc). Hands out duplicates; close() closes its own."""

    def __init__(self, pid: int, start: int, regions: list[RegionRecord]) -> None:
        if process_start(pid) != start:
            raise ProcessLookupError(f"pid {pid} has exited")
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self._uffds: dict[int, int] = {}  # region id -> the uffd (ours) that registers it
        try:
            if process_start(pid) != start:  # the pidfd names whoever held the pid when opened
                raise ProcessLookupError(f"pid {pid} has exited")
            self._read_fd_table()
            if regions:
                self._match_uffds(regions)
        except BaseException:
            self.close()
            raise

    def _read_fd_table(self) -> None:
        self._links = _descriptors_of(self.pid)
        self._files: dict[tuple[int, int], list[int]] = defaultdict(list)  # (st_dev, st_ino) -> targets
        for target, link in self._links.items():
            if link == _UFFD_LINK:
                continue
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{self.pid}/fd/{target}")
                self._files[st.st_dev, st.st_ino].append(target)

    def _match_uffds(self, regions: list[RegionRecord]) -> None:
        probes = _registered_pages(self.pid, [(r.request["address"], r.request["size"]) for r in regions])
        if not any(page is not None for page in probes):
            return
        fetched = []
        try:
            for target, link in self._links.items():
                if link == _UFFD_LINK:
                    try:
                        fetched.append(pidfd_getfd(self.pidfd, target))
                    except OSError as exc:
                        if exc.errno != errno.EBADF:  # closed since the table was read: not a region's
                            raise
            for record, page in zip(regions, probes):
                if page is None:
                    continue
                # The uffds no region matched yet first: a uffd is one region's.
                for fd in sorted(fetched, key=lambda fd: fd in self._uffds.values()):
                    if _registers(fd, page):
                        self._uffds[record.id] = fd
                        break
        finally:
            for fd in fetched:
                if fd not in self._uffds.values():
                    os.close(fd)

    def reclaim(self, claim: Claim) -> Reclaimed:
        record = claim.record
        reclaimed = Reclaimed(os.dup(self.pidfd), -1)
        try:
            if claim.uffd:
                if record.id not in self._uffds:
                    raise LookupError(f"pid {self.pid} holds no userfaultfd with {record.request['address']:#x}"
                                      f"+{record.request['size']:#x} registered")
                reclaimed.uffd = os.dup(self._uffds[record.id])
            for name, identity in record.descriptors.items() if claim.descriptors else ():
                reclaimed.descriptors[name] = self._file(name, tuple(identity))  # type: ignore[arg-type]
        except BaseException:
            reclaimed.close()
            raise
        return reclaimed

    def _file(self, name: str, identity: tuple[int, int]) -> int:
        """Our copy of the process's descriptor of that file; the fd table is
        read again if the number found no longer names it (the process may
        have closed and opened descriptors since the table was read)."""
        for fresh in (False, True):
            if fresh:
                self._read_fd_table()
            target = self._writable_first(self._files.get(identity, []))
            if target is None:
                continue
            fd = pidfd_getfd(self.pidfd, target)
            if identity_of(fd) == identity:
                return fd
            os.close(fd)
        raise LookupError(f"pid {self.pid} no longer holds the {name} descriptor it passed")

    def _writable_first(self, targets: list[int]) -> int | None:
        """A writable one of the process's descriptors of one file, if any."""
        for target in targets:
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.pid}/fdinfo/{target}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
                if flags & os.O_ACCMODE == os.O_RDWR:
                    return target
        return targets[0] if targets else None

    def close(self) -> None:
        for fd in {self.pidfd, *self._uffds.values()}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._uffds.clear()


def _descriptors_of(pid: int) -> dict[int, str]:
    links = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return links


# A VMA's entry in /proc/PID/smaps, whole: its range first, its VmFlags line last.
_SMAPS_VMA = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (?:.*\n)+?VmFlags:(.*)\n", re.MULTILINE)


def _registered_pages(pid: int, regions: list[tuple[int, int]]) -> list[int | None]:
    """For each (address, size): a page of its registration (the tag page
    first, then the region's) whose VMA is uffd-registered for missing
    faults, or None."""
    vmas = _missing_registered_vmas(pid, max(address + size for address, size in regions))
    return [next((page for page in (address + size, address) if any(s <= page < e for s, e in vmas)), None)
            for address, size in regions]


def _missing_registered_vmas(pid: int, up_to: int) -> list[tuple[int, int]]:
    """The process's VMAs registered for missing faults, of those that start
    at or below up_to (smaps is read only that far: see the module's doc)."""
    vmas = []
    pending = b""
    with open(f"/proc/{pid}/smaps", "rb", buffering=0) as f:
        while chunk := f.read(16384):
            pending += chunk
            parsed = 0
            for vma in _SMAPS_VMA.finditer(pending):
                start = int(vma[1], 16)
                if start > up_to:
                    return vmas
                if b"um" in vma[3].split():
                    vmas.append((start, int(vma[2], 16)))
                parsed = vma.end()
            pending = pending[parsed:]  # a read may end inside an entry
    return vmas


def _registers(fd: int, page: int) -> bool:
    """Whether page is registered with this uffd (see the module's doc)."""
    try:
        Uffd(fd).register(page, PAGE_SIZE, REGISTER_MODE)
    except OSError as exc:
        log.debug("takeover: the probe of page %#x through a userfaultfd: %s", page, exc)
        return False
    return True


def identity_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
