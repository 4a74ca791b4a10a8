"""Failing an access where the kernel has no UFFDIO_POISON (Linux < 6.6):
SIGBUS sent to the faulting thread itself, so a page that cannot be filled
still ends the access as a poisoned page would, never in a hang.

Kernel facts this relies on:
- A fault message's thread id (UFFD_FEATURE_THREAD_ID) is task_pid_vnr of
  the faulting task (fs/userfaultfd.c): its id in its *own* pid namespace.
  /proc/<pid>/task/<tid>/status lists in NSpid a task's ids from the pid
  namespace of that /proc down to the task's own; the last one is what the
  message carries.
- A user fault waits in handle_userfault interruptibly (FAULT_FLAG_
  INTERRUPTIBLE): a signal ends the wait, the fault returns VM_FAULT_RETRY
  and the signal is delivered before the access is retried. SIGBUS's
  default action ends the process; a handler that returns retries the
  access, which faults again and is failed again.
- tgkill(tgid, tid, sig) directs the signal at that one thread (a signal
  to the process could be taken by another thread, leaving the faulting one
  waiting), and fails with ESRCH unless tid is one of tgid's threads, so a
  reused id never gets it. Unlike UFFDIO_POISON's, this SIGBUS carries
  si_code SI_TKILL and no si_addr.
"""
from __future__ import annotations

import os
import signal

from uffd_pager.native import ffi, lib


def _pid_namespace(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _innermost_id(tgid: int, tid: str) -> int | None:
    """The thread's id in its own pid namespace (NSpid's last field)."""
    try:
        with open(f"/proc/{tgid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def find_thread(ns_tid: int, owner_pid: int, ancestor_pid: int = 0) -> tuple[int, int] | None:
    """(tgid, tid) as this pager's namespace numbers them, of the thread its
    own pid namespace calls ns_tid: one of owner_pid's threads if the owner
    is known, else (a forked child not known yet) of a process in the pid
    namespace ancestor_pid makes its children in."""
    if owner_pid > 0:
        candidates = [owner_pid]
    else:
        namespace = _pid_namespace(f"/proc/{ancestor_pid}/ns/pid_for_children") if ancestor_pid > 0 else None
        if namespace is None:
            return None
        candidates = [int(name) for name in os.listdir("/proc")
                      if name.isdigit() and _pid_namespace(f"/proc/{name}/ns/pid") == namespace]
    for tgid in candidates:
        try:
            tids = os.listdir(f"/proc/{tgid}/task")
        except OSError:
            continue
        for tid in tids:
            if _innermost_id(tgid, tid) == ns_tid:
                return tgid, int(tid)
    return None


def signal_thread(tgid: int, tid: int) -> None:
    """SIGBUS to the thread; OSError if it is gone (ESRCH) or not ours to signal."""
    if lib.up_tgkill(tgid, tid, signal.SIGBUS) < 0:
        raise OSError(ffi.errno, f"tgkill({tgid}, {tid}, SIGBUS): {os.strerror(ffi.errno)}")
