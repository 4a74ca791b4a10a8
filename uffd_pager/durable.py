"""The daemon's durable state: what a pager started again on the same
socket needs to take over the regions of the one that died (see
takeover.py).

One SQLite database per socket in the state directory, in WAL mode with
synchronous=NORMAL: a commit is in the WAL file, in the page cache, before
it returns, so it survives the pager's own death (not a power cut, which
ends the clients too). It changes only when a region comes or goes: never
on the fault or the write-back path.

A row per root region: its process (pid and start time, so that a pid
reused since is never taken for it), its uid, the map request as the
pager accepted it, and the identity (st_dev, st_ino) of each descriptor
the client passed and keeps open for the region's life (store files,
catalogs, the key's memfd): a new pager finds them again in the client's
fd table. The uffd has no identity of its own (every userfaultfd shares
one anonymous inode); takeover.py finds it by its registration.

The file carries its format version: a pager refuses, clearly, a state
written by a newer format, rather than serve from what it cannot read.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1


class StateError(RuntimeError):
    """The state database cannot be used (a newer format, not a database)."""


@dataclass(frozen=True)
class RegionRecord:
    id: int
    pid: int
    pid_start: int  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)
    uid: int
    request: dict[str, Any]  # the map fields: url, size, offset, address, tracking, ...
    descriptors: dict[str, tuple[int, int]]  # name -> (st_dev, st_ino), of what the client keeps open


def state_path(state_dir: str, address: str | bytes) -> str:
    """The database of the pager listening on address: a socket path, or
    an abstract name (bytes, a NUL first: a private pager's, one a Pager)."""
    name = os.fsencode(os.path.abspath(address)) if isinstance(address, str) else address
    digest = hashlib.sha256(name).hexdigest()[:16]
    return os.path.join(state_dir, f"takeover-{digest}.sqlite3")


def remove_state(path: str) -> None:
    """Removes a state database and SQLite's files beside it (WAL mode)."""
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class DurableState:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state file {path}: not a state database this pager can read ({exc}); move it away "
                             "to start without taking over") from None
        if row is None:
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        elif not row[0].isdigit() or int(row[0]) > FORMAT_VERSION:
            raise StateError(f"state file {path} has format {row[0]!r}, newer than this pager's "
                             f"{FORMAT_VERSION}: it was written by a newer uffd-pager; run that version, "
                             "or move the file away to start without taking over its clients")
        self._db.execute("CREATE TABLE IF NOT EXISTS regions (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, "
                         "pid_start INTEGER NOT NULL, uid INTEGER NOT NULL, request TEXT NOT NULL, "
                         "descriptors TEXT NOT NULL)")

    def record(self, record: RegionRecord) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO regions VALUES (?, ?, ?, ?, ?, ?)",
                             (record.id, record.pid, record.pid_start, record.uid, json.dumps(record.request),
                              json.dumps(record.descriptors)))

    def forget(self, region_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM regions WHERE id = ?", (region_id,))

    def regions(self) -> list[RegionRecord]:
        rows = self._db.execute("SELECT id, pid, pid_start, uid, request, descriptors FROM regions ORDER BY id")
        return [RegionRecord(id, pid, start, uid, json.loads(request),
                             {name: tuple(ident) for name, ident in json.loads(descriptors).items()})
                for id, pid, start, uid, request, descriptors in rows]

    def close(self) -> None:
        self._db.close()
