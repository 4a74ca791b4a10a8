"""The daemon's durable state: what a pager started again on the same
socket needs to take over the regions of the one that died (see
takeover.py).

One SQLite database per socket in the state directory, in WAL mode with
synchronous=NORMAL: a commit is in the WAL file, in the page cache, before
it returns, so it survives the pager's own death (not a power cut, which
ends the clients too). It changes only when a region comes or goes, and
once when a kept child's portion is placed (below): never on the path of
any other fault or of a write-back.

A row per root region: its process (pid and start time, so that a pid
reused since is never taken for it), its uid, the map request as the
pager accepted it, and the identity (st_dev, st_ino) of each descriptor
the client passed and keeps open for the region's life (store files,
catalogs, the key's memfd): a new pager finds them again in the client's
fd table. The uffd has no identity of its own (every userfaultfd shares
one anonymous inode); takeover.py finds it by its registration.

A forked child's copy of a region has a row too, from the moment its
process claims it (adopt): its parent's row id, and its portion: the
offset it was placed at and the runs of pages materialized in it (native/
portion.c). Those grow between writes of the row (a page copied on access
holds what the parent chain holds), which is safe as long as the row is
written again before any page of the parent's portion changes: the
parent's write-back does it, after the copies its children need and
before its own writes (lineage.Lineage.preserve_for_children). A row whose
process is gone stays, marked released, while children inherit from its
portion. So are a region's pages that the kernel no longer reports dirty
but that are not in the store: the whole region while a write-back is
under way (it takes the dirty pages first), then the pages a failed one
left to retry, so that a pager killed meanwhile has its successor write
them.

And the slots of a store that are never to be handed out again: the
portions of children kept by keep_child_portions, from the moment each is
placed (a pager may die before it sees the child exit; its row is then
forgotten with the offset in it), and slots a remote store could not
discard, by the store's identity, so that a pager taking over never places
a new child's portion over one.

The file carries its format version: a pager refuses, clearly, a state
written by a newer format, rather than serve from what it cannot read; an
older one is brought up to date (format 1 had no forked children and no
write-backs in progress, format 2 no kept slots).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 3

PageRuns = list[tuple[int, int]]  # (first page, npages)


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
    parent: int | None = None  # a forked child's copy: its parent's row (request and descriptors are the root's)
    offset: int | None = None  # a forked child's portion, once placed
    materialized: PageRuns = field(default_factory=list)  # pages a forked child's portion holds
    released: bool = False  # its process is gone; kept while children inherit from its portion
    flushing: PageRuns = field(default_factory=list)  # pages clean in the kernel's eyes, not in the store


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
    """The process's start time (clock ticks since boot), or None if it is
    gone: exited, a zombie not reaped yet included (its memory is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
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
        if row is not None and (not row[0].isdigit() or int(row[0]) > FORMAT_VERSION):
            raise StateError(f"state file {path} has format {row[0]!r}, newer than this pager's "
                             f"{FORMAT_VERSION}: it was written by a newer uffd-pager; run that version, "
                             "or move the file away to start without taking over its clients")
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS regions (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, "
                             "pid_start INTEGER NOT NULL, uid INTEGER NOT NULL, request TEXT NOT NULL, "
                             "descriptors TEXT NOT NULL)")
            if row is None or int(row[0]) < 2:
                for column in ("parent INTEGER", "portion TEXT", "released INTEGER NOT NULL DEFAULT 0",
                               "flushing TEXT"):
                    self._db.execute(f"ALTER TABLE regions ADD COLUMN {column}")
            self._db.execute("CREATE TABLE IF NOT EXISTS kept (store TEXT NOT NULL, offset INTEGER NOT NULL, "
                             "length INTEGER NOT NULL, PRIMARY KEY (store, offset))")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))

    def record(self, record: RegionRecord) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO regions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (record.id, record.pid, record.pid_start, record.uid, json.dumps(record.request),
                              json.dumps(record.descriptors), record.parent,
                              json.dumps({"offset": record.offset, "materialized": record.materialized}),
                              int(record.released), json.dumps(record.flushing) if record.flushing else None))

    def record_portions(self, portions: list[tuple[int, int | None, PageRuns]]) -> None:
        """Forked children's portions (row id, offset, materialized runs), in one transaction."""
        if portions:
            with self._db:
                self._db.executemany("UPDATE regions SET portion = ? WHERE id = ?",
                                     [(json.dumps({"offset": offset, "materialized": runs}), region_id)
                                      for region_id, offset, runs in portions])

    def flushing(self, region_id: int, runs: PageRuns) -> None:
        """These pages are clean in the kernel's eyes but not in the store
        (none: every page is)."""
        with self._db:
            self._db.execute("UPDATE regions SET flushing = ? WHERE id = ?",
                             (json.dumps(runs) if runs else None, region_id))

    def released(self, region_id: int) -> None:
        with self._db:
            self._db.execute("UPDATE regions SET released = 1 WHERE id = ?", (region_id,))

    def forget(self, region_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM regions WHERE id = ?", (region_id,))

    def keep_slot(self, store: tuple[object, ...], offset: int, length: int) -> None:
        """A slot of the store of this identity (stores/base.py) is never to be handed out again."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?, ?)", (repr(store), offset, length))

    def kept_slots(self, store: tuple[object, ...]) -> list[tuple[int, int]]:
        return [(offset, length) for offset, length in
                self._db.execute("SELECT offset, length FROM kept WHERE store = ? ORDER BY offset", (repr(store),))]

    def regions(self) -> list[RegionRecord]:
        """Every row, parents before their children (a child's id is greater)."""
        rows = self._db.execute("SELECT id, pid, pid_start, uid, request, descriptors, parent, portion, released, "
                                "flushing FROM regions ORDER BY id")
        records = []
        for id, pid, start, uid, request, descriptors, parent, portion, released, flushing in rows:
            placed = json.loads(portion) if portion else {}
            records.append(RegionRecord(
                id, pid, start, uid, json.loads(request),
                {name: tuple(ident) for name, ident in json.loads(descriptors).items()},  # type: ignore[misc]
                parent, placed.get("offset"), [tuple(r) for r in placed.get("materialized", [])],  # type: ignore[misc]
                bool(released), [tuple(r) for r in json.loads(flushing)] if flushing else []))  # type: ignore[misc]
        return records

    def close(self) -> None:
        self._db.close()
