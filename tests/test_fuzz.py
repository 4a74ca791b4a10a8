"""A seeded fuzz of the control socket: one daemon, at least 10,000 generated
inputs, over thousands of connections.

The inputs are random bytes (0 to 70,000 of them, past the 64 KiB a message
may hold), the requests the library itself sends (each op of the protocol,
and map with a key and with children, learned from a real client at the
start of the run) mutated field by field and byte by byte, random
descriptors attached (0 to 6 of a dozen kinds, userfaultfds of this process
and of another one among them; at times more than a message may carry),
and maps whose "uffd" is a pipe full of forged `struct uffd_msg`s (FORK
events naming descriptor numbers, UNMAP events of huge ranges, page
faults). Connections live for one message or
for hundreds, some start without hello, some are dropped with requests
unanswered, up to four are open at once, some hold a region the daemon
serves (and whose pages this process writes).

After every batch, once the fuzz's connections are closed, the daemon must
be alive, back to its idle descriptor count (and hold no region, store or
connection but the observer's), idle (under 0.3 s of CPU over 1 s), answer
status within 2 s, and serve a normal client byte-exact; the daemon fixture
then checks that it exits with status 0 on SIGTERM. A request that goes
unanswered for REPLY_TIMEOUT seconds is a hang. What is odd but none of
these (a message past 64 KiB served, an error of an unexpected type) is
reported as a warning.

The run is seeded: UFFD_PAGER_FUZZ_SEED=N picks another seed (the default
is fixed), UFFD_PAGER_FUZZ_INPUTS=N another number of inputs. The inputs'
contents come from the seed alone. A failure reports the seed, the batch
and the last inputs sent (their bytes, descriptors and replies), then
replays the batch on a new daemon, each input alone, to name the one that
crashes, hangs, spins or leaks it on its own.

Every path an input names is under the test's temporary directory (see
`Generator.confine`): a daemon that creates files beside a store's path
creates none elsewhere. The daemon's state directory is there too.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import pytest

import uffd_pager
from hostile_clients import MAX_MESSAGE, PAGE, REGION_UFFD_FEATURES, Raw, registered_uffd
from support import describe_returncode, descriptor_kind
from uffd_pager import protocol
from uffd_pager.client import _key_memfd
from uffd_pager.crypto import Key
from uffd_pager.stores.file import file_path, open_store_file
from uffd_pager.uffd import Uffd

HOSTILE_CLIENTS = Path(__file__).with_name("hostile_clients.py")

DEFAULT_SEED = 0x5EED_F022
SEED = int(os.environ.get("UFFD_PAGER_FUZZ_SEED", str(DEFAULT_SEED)), 0)
INPUTS = int(os.environ.get("UFFD_PAGER_FUZZ_INPUTS", "10000"), 0)
BATCH = 500  # inputs between two checks of the daemon

REPLY_TIMEOUT = 5.0  # seconds a request may go unanswered before it counts as a hang
SETTLE = 1.5  # seconds the daemon may take to release what closed connections held
FD_SLACK = 2  # descriptors above the idle baseline still taken as settled
TASK_SLACK = 2
IDLE_WINDOW = 1.0  # seconds of no traffic over which the daemon's CPU time is measured
IDLE_CPU = 0.3  # seconds of CPU it may use in that window
STATUS_WITHIN = 2.0
RSS_LIMIT_KIB = 300 * 1024
MAX_OPEN = 4  # fuzz connections open at once
LARGEST_SENT = 100_000  # bytes; the kernel refuses a datagram near the socket's send buffer (EMSGSIZE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Error types a refusal is expected to carry; others are reported (not failed).
EXPECTED_ERRORS = {"ProtocolError", "ValueError", "KeyError", "DescriptorsDropped", "LimitExceeded",
                   "StoreReadOnly", "OSError", "PermissionError", "FileNotFoundError", "ProcessLookupError",
                   "IsADirectoryError", "NotADirectoryError", "BlockingIOError", "FileExistsError"}


# --- the files of the run ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Files:
    """The run's stores: `plain` (most maps), `encrypted` (maps with the
    run's key), `children` (maps with children=), `held` (the regions
    connections hold, which no fuzzed input may touch), all under `root`."""

    root: Path
    plain: Path
    encrypted: Path
    children: Path
    held: Path

    @classmethod
    def make(cls, root: Path) -> "Files":
        root.mkdir()
        files = cls(root, root / "plain.bin", root / "encrypted.bin", root / "children.bin", root / "held.bin")
        for path, pages in ((files.plain, 16), (files.encrypted, 0), (files.children, 0), (files.held, 8)):
            path.write_bytes(os.urandom(pages * PAGE))
        return files

    def url(self, path: Path) -> str:
        return f"file://{path}"

    def reset(self, state: Path, sent: set[Path]) -> None:
        """Between batches (no store open): every file but the four stores
        goes (catalogs beside them, files made at paths inputs named), or is
        emptied if it is one the library sent a descriptor of (`sent`, a
        catalog say), and the daemon's state directory is emptied: a store
        an input made encrypted is plain again for the next batch."""
        keep = {self.plain, self.encrypted, self.children, self.held}
        for directory in (self.root, state):
            for path in directory.rglob("*"):
                if path in sent:
                    os.truncate(path, 0)
                elif path not in keep and (path.is_symlink() or not path.is_dir()):
                    path.unlink()


# --- the requests the library sends ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Template:
    """One request as the library sent it: its fields in order (op first)
    and what each descriptor attached was ("uffd", "memfd", or "file PATH")."""

    name: str
    fields: tuple[tuple[str, Any], ...]
    slots: tuple[str, ...]


def file_descriptor_kind(fd: int) -> str:
    """descriptor_kind, with a file's path ("file PATH")."""
    kind = descriptor_kind(fd)
    return f"file {os.readlink(f'/proc/self/fd/{fd}')}" if kind == "file" else kind


def record_library_requests(socket_path: str, files: Files, key: Key) -> dict[str, Template]:
    """Every request a real client sends to the daemon at `socket_path`, each
    looked at on its way out: hello, status, map (plain, with `key`, with
    children=), stats, backing, prefetch, flush, reopen, reattach and adopt (as the
    library sends them after a read-only flush, a takeover and in a forked child), unmap."""
    seen: dict[str, Template] = {}
    maps = iter(["map", "map with key", "map with children"])
    real_sendmsg = socket.socket.sendmsg

    def recording_sendmsg(sock: socket.socket, buffers: Any, ancdata: Any = (), *args: Any) -> int:
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(b"".join(bytes(b) for b in buffers))
            if isinstance(message, dict) and isinstance(message.get("op"), str):
                fds = [fd for level, kind, data in ancdata if level == socket.SOL_SOCKET
                       and kind == socket.SCM_RIGHTS for fd in memoryview(data).cast("B").cast("i")]
                name = next(maps, "another map") if message["op"] == "map" else message["op"]
                seen.setdefault(name, Template(name, tuple(message.items()), tuple(map(file_descriptor_kind, fds))))
        return real_sendmsg(sock, buffers, ancdata, *args)

    socket.socket.sendmsg = recording_sendmsg  # type: ignore[method-assign]
    try:
        with uffd_pager.connect(socket_path, timeout=20) as pager:
            pager.status()
            with pager.map(files.url(files.plain), 2 * PAGE) as region:
                region.stats()
                region.backing()
                region.prefetch(0, PAGE)
                region.flush()
                # What Region._request_writing sends after a flush refused with StoreReadOnly...
                fd = open_store_file(region.store)
                try:
                    pager._conn.request("reopen", (fd,), region=region._id, fds=["store"])
                finally:
                    os.close(fd)
                # ... what a client sends a pager that took over from a dead one (nothing to claim here) ...
                pager._conn.request("reattach", regions=[region._id])
                # ... and what Region._adopt_in_child sends in a forked child (refused here: no fork).
                with contextlib.suppress(KeyError):
                    pager._conn.request_fds("adopt", region=region._id, token="00" * protocol.CLAIM_TOKEN_SIZE)
            pager.map(files.url(files.encrypted), 2 * PAGE, key=key).close()
            pager.map(files.url(files.plain), 2 * PAGE, children=files.url(files.children)).close()
    finally:
        socket.socket.sendmsg = real_sendmsg  # type: ignore[method-assign]
    missing = {*protocol.REQUEST_FIELDS, "map with key", "map with children"} - set(seen)
    assert not missing, f"the library sent no {sorted(missing)} request while recorded"
    return seen


# --- JSON with what json.dumps will not write ------------------------------------------------------


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs: keys may repeat."""


class Verbatim(str):
    """JSON text (or not) written as is: huge numbers, deep nesting, bad syntax."""


@dataclasses.dataclass(frozen=True)
class Sym:
    """A value known only when the input is sent: the address or size of the
    uffd registered for it, a region id of this connection or another's."""

    name: str
    delta: int = 0


@dataclasses.dataclass
class Env:
    address: int = 1 << 40
    size: int = PAGE
    region: int = 1
    other_region: int = 424242

    def resolve(self, sym: Sym) -> int:
        base = {"address": self.address, "size": self.size, "region": self.region,
                "other-region": self.other_region}[sym.name]
        return base + sym.delta


def to_json(value: Any, env: Env, ascii_only: bool) -> str:
    if isinstance(value, Verbatim):
        return str(value)
    if isinstance(value, Sym):
        return str(env.resolve(value))
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{to_json(k, env, ascii_only)}:{to_json(v, env, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v, env, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity as Python writes them


# --- the inputs -------------------------------------------------------------------------------

# Descriptors an input may attach. Static ones exist for the whole run (the
# daemon gets its own copy of each); "registered-uffd" (a new userfaultfd of
# this process registered over new memory, the one a map's address names)
# and "forged-pipe" (the read end of a pipe holding forged uffd messages) are
# made for each input.
STATIC_KINDS = ("/dev/null", "pipe-read", "pipe-write", "socketpair", "eventfd", "memfd", "key-memfd",
                "directory", "file plain.bin", "file-ro plain.bin", "file encrypted.bin", "file children.bin",
                "uffd", "foreign-uffd", "pidfd", "epoll")
DYNAMIC_KINDS = ("registered-uffd", "forged-pipe")
ALL_KINDS = STATIC_KINDS + DYNAMIC_KINDS

UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = range(0x12, 0x17)
U64 = (1 << 64) - 1


@dataclasses.dataclass
class Input:
    index: int
    kind: str  # "random bytes", "mutated map", "valid status", "forged uffd messages", "json junk"
    message: Any  # Pairs / Verbatim / bytes
    fds: list[str]
    note: str = ""
    pages: int = 1  # of the registered uffd
    byte_ops: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    forged: list[bytes] = dataclasses.field(default_factory=list)
    ascii_only: bool = True

    def render(self, env: Env) -> bytes:
        if isinstance(self.message, bytes):
            data = self.message
        else:  # surrogatepass: a lone surrogate becomes bytes that are not UTF-8
            data = to_json(self.message, env, self.ascii_only).encode("utf-8", "surrogatepass")
        for op, arg in self.byte_ops:
            data = apply_byte_op(data, op, arg)
        return data[:LARGEST_SENT]


INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xf4\x90\x80\x80",
                b"\xf8\x88\x80\x80\x80", b"\xc3"]


def apply_byte_op(data: bytes, op: str, arg: Any) -> bytes:
    if op == "truncate":
        return data[: int(arg * len(data))]
    if op == "bad-utf8":
        for where, junk in arg:
            at = int(where * len(data))
            data = data[:at] + junk + data[at:]
        return data
    if op == "bitflip":
        out = bytearray(data)
        for where, bit in arg:
            if out:
                out[int(where * len(out)) % len(out)] ^= 1 << bit
        return bytes(out)
    if op == "pad":
        before, total, filler = arg
        pad = max(0, total - len(data)) // len(filler)
        head = int(pad * before)
        return filler * head + data + filler * (pad - head)
    if op == "append":
        return data + arg
    if op == "reencode":
        try:
            return data.decode("utf-8").encode(arg)
        except UnicodeError:
            return data
    raise AssertionError(op)


def forged_uffd_message(rng: random.Random) -> bytes:
    """32 bytes shaped like struct uffd_msg: event u8, reserved u8/u16/u32, a 24-byte union."""
    event = rng.choice([UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_FORK, UFFD_EVENT_REMAP,
                        UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_EVENT_UNMAP, rng.randrange(256)])
    head = struct.pack("<BBHI", event, rng.choice([0, 0, 0, 0xFF]), 0, rng.choice([0, 0, U64 >> 32]))
    if event == UFFD_EVENT_PAGEFAULT:  # flags, address, ptid
        body = struct.pack("<QQI4x", rng.choice([0, 1, 2, 4, 3, U64]),
                           rng.choice([0, PAGE, 1 << 40, (1 << 47) - PAGE, U64 & ~(PAGE - 1), rng.getrandbits(64)]),
                           rng.choice([0, 1, 0x7FFF, 0xFFFFFFFF, rng.getrandbits(32)]))
    elif event == UFFD_EVENT_FORK:  # the child's uffd: a descriptor number of the reader's
        body = struct.pack("<I20x", rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 16, 100, 1023, 1 << 20,
                                                 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)]))
    elif event == UFFD_EVENT_REMAP:  # from, to, len
        body = struct.pack("<QQQ", rng.getrandbits(64), rng.getrandbits(64), rng.choice([PAGE, U64, 0]))
    elif event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):  # start, end
        start, end = rng.choice([(0, U64), (1 << 63, U64), (U64, 0), (PAGE, 1 << 47), (0, 0),
                                 (rng.getrandbits(64), rng.getrandbits(64))])
        body = struct.pack("<QQ8x", start, end)
    else:
        body = rng.randbytes(24)
    message = head + body
    if rng.random() < 0.05:
        message = message[: rng.randrange(1, 32)]  # a short read's worth
    return message


class Generator:
    """Inputs from a seed. Nothing here depends on what the daemon answers:
    input N of a seed is the same whatever happened before it."""

    def __init__(self, seed: int, templates: dict[str, Template], files: Files) -> None:
        self.rng = random.Random(seed)
        self.templates = templates
        self.files = files
        self.count = 0
        self.ops = sorted(set(protocol.REQUEST_FIELDS))
        self.all_fields = sorted({name for fields in protocol.REQUEST_FIELDS.values() for name in fields})
        root = str(files.root)
        self.urls = [files.url(files.plain), files.url(files.encrypted), files.url(files.children),
                     files.url(files.plain) + "%00", files.url(files.plain) + "?q#f", f"file://{root}",
                     f"file://{root}/", f"file://{root}/missing/x", f"file://{root}/new.bin", f"file://{root}/../x",
                     "file:///proc/self/mem", "file:///dev/zero", "file:///sys/kernel/uevent_seqnum",
                     "file://host/tmp/x", "http://example.com/x", "file:", "relative/path",
                     "file:///tmp/../proc/self/mem", f"file://localhost{files.plain}", str(files.plain)]
        self.legit: dict[str, list[Any]] = {
            "tracking": ["async", "sync"], "fork_policy": ["on-write", "at-fork", "on-access"],
            "keep_child_portions": [True, False], "writeback_interval": [None, 0, 0.1, 0.5, 5.0, 3600],
            "offset": [0, PAGE, 8 * PAGE, 1 << 30, (1 << 62)], "size": [Sym("size"), Sym("size", -PAGE), PAGE],
            "address": [Sym("address"), Sym("address", PAGE)], "children": [None, files.url(files.children)],
            "url": [files.url(files.plain), files.url(files.encrypted), files.url(files.children)],
        }

    # values ------------------------------------------------------------

    def deep(self) -> Verbatim:
        rng = self.rng
        depth = rng.choice([2, 10, 100, 900, 1000, 1100, 5000, 20000, 40000])
        if rng.random() < 0.5:
            return Verbatim("[" * depth + "]" * depth)
        return Verbatim('{"a":' * depth + "1" + "}" * depth)

    def number(self) -> Any:
        rng = self.rng
        return rng.choice([
            lambda: rng.randint(-3, 3),
            lambda: rng.choice([1, -1]) * rng.randint(0, 64) * PAGE + rng.choice([0, 0, 0, 1, -1]),
            lambda: rng.choice([(1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 47) - PAGE, 1 << 47,
                                (1 << 56) - PAGE, 1 << 56, (1 << 63) - 1, 1 << 63, (1 << 63) - PAGE, U64, 1 << 64,
                                -(1 << 63), -(1 << 63) - 1, 1 << 200]),
            lambda: Verbatim(rng.choice("123456789") + "0" * rng.choice([20, 300, 4000, 4300, 5000, 20000])),
            lambda: Verbatim("-" + "9" * rng.choice([19, 20, 400])),
            lambda: rng.choice([0.0, -0.0, 0.5, 1.5, 4096.0, 1e-9, 0.05, 0.1, 1e308, 5e-324, -1.0,
                                math.nan, math.inf, -math.inf, rng.uniform(-1e6, 1e6)]),
            lambda: Verbatim(rng.choice(["1e400", "-1e400", "1E2", "4.096e3", "4096.000", "-0", "0e0",
                                         "1e-400", "40960000000000000000000e-19", "01", "0x10", "+1", ".5",
                                         "1.", "NaN", "-Infinity", "nan", "inf", "1_000"])),
        ])()

    def text(self) -> Any:
        rng = self.rng
        return rng.choice([
            lambda: "",
            lambda: "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40))),
            lambda: "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 20))),
            lambda: "\ud800" + rng.choice(["", "x", "\udfff"]),
            lambda: "x" * rng.choice([1000, 30000, 70000]),
            lambda: "a\0b",
            lambda: rng.choice(self.ops + ["MAP", "map ", " status", "__init__", "_op_status", "serve", "stop"]),
            lambda: rng.choice(self.urls),
            lambda: rng.choice(["async", "sync", "none", "on-write", "at-fork", "on-access", "true", "null", "1",
                                "4096", *protocol.MAP_DESCRIPTORS]),
        ])()

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return self.number()
        if roll < 0.6:
            return self.text()
        if roll < 0.7:
            return rng.choice([None, True, False])
        if roll < 0.8 and depth < 3:
            return [self.value(depth + 1) for _ in range(rng.randrange(0, 5))]
        if roll < 0.9 and depth < 3:
            return Pairs((self.key(), self.value(depth + 1)) for _ in range(rng.randrange(0, 4)))
        if roll < 0.95:
            return self.deep()
        return rng.choice([Sym("region"), Sym("other-region"), Sym("address"), Sym("size")])

    def key(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return rng.choice(self.all_fields + ["op"])
        if roll < 0.9:
            return self.text()
        return Verbatim(rng.choice(["1", "null", "true", "[]", "{}", "op"]))  # not a string: not JSON

    def confine(self, message: Any) -> None:
        """A url or children that names a path (as the daemon parses it) out
        of the run's directory is moved into it."""
        if not isinstance(message, Pairs):
            return
        for i, (name, value) in enumerate(message):
            if name in ("url", "children") and isinstance(value, str):
                try:
                    path = os.path.normpath(file_path(value))
                except ValueError:
                    continue
                if not (path + "/").startswith(str(self.files.root) + "/"):
                    message[i] = (name, f"file://{self.files.root}/confined{path}")

    # templates ---------------------------------------------------------

    def template_pairs(self, name: str, *, held: bool = False) -> tuple[Pairs, list[str]]:
        """The library's request as pairs (with this input's uffd, size and
        region in it) and the kinds of descriptors to attach; `held`: over
        the held store. "map with the store as children" is what
        map(url, children=url) sends: "map with children" whose children
        URL and descriptor are the store's own."""
        own_children = name == "map with the store as children"
        template = self.templates["map with children" if own_children else name]
        pairs = Pairs()
        for field, value in template.fields:
            if field == "address":
                value = Sym("address")
            elif field == "size":
                value = Sym("size")
            elif field == "region":
                value = Sym("region")
            elif field == "url" and held:
                value = self.files.url(self.files.held)
            pairs.append((field, value))
        fds = []
        for slot in template.slots:
            if slot == "uffd":
                fds.append("registered-uffd")
            elif slot == "memfd":
                fds.append("key-memfd")
            elif slot.startswith("file "):
                fds.append("file held.bin" if held else f"file {os.path.basename(slot[5:])}")
            else:
                raise AssertionError(f"the library attached a descriptor of an unexpected kind: {slot}")
        if own_children:
            url = dict(pairs)["url"]
            pairs = Pairs((field, url if field == "children" else value) for field, value in pairs)
            fds = [f"file {self.files.plain.name}" if kind == f"file {self.files.children.name}" else kind
                   for kind in fds]
        return pairs, fds

    def mutate(self, pairs: Pairs, fds: list[str]) -> str:
        """One change to a request; returns what it did."""
        rng = self.rng
        choice = rng.choice(["drop", "add", "add", "duplicate", "retype", "retype", "retype", "near", "op",
                             "fds-names", "attach", "attach", "nest", "reorder", "legit", "legit"])
        index = rng.randrange(len(pairs)) if pairs else 0
        if choice == "legit":  # a value the library itself could send: other options, served regions
            name = rng.choice(sorted(self.legit))
            value = rng.choice(self.legit[name])
            for i, (field, _value) in enumerate(pairs):
                if field == name:
                    pairs[i] = (name, value)
                    break
            else:
                pairs.append((name, value))
            return f"legit {name}={value!r}"
        if choice == "drop" and pairs:
            return f"drop {pairs.pop(index)[0]}"
        if choice == "add":
            name = self.key()
            pairs.insert(rng.randrange(len(pairs) + 1), (name, self.value()))
            return f"add {name!r}"
        if choice == "duplicate" and pairs:
            name = pairs[index][0]
            pairs.insert(rng.choice([0, len(pairs)]), (name, self.value()))
            return f"duplicate {name}"
        if choice == "retype" and pairs:
            name = pairs[index][0]
            pairs[index] = (name, self.value())
            return f"retype {name}"
        if choice == "near" and pairs:
            name, value = pairs[index]
            delta = rng.choice([1, -1, PAGE, -PAGE, 2 * PAGE, -2 * PAGE, 1 << 32, -(1 << 40)])
            if isinstance(value, Sym):
                pairs[index] = (name, Sym(value.name, value.delta + delta))
            elif isinstance(value, int) and not isinstance(value, bool):
                pairs[index] = (name, value + delta)
            else:
                pairs[index] = (name, rng.choice([Sym("address", delta), Sym("size", delta), Sym("region", delta)]))
            return f"near {name} {delta:+d}"
        if choice == "op":
            other = rng.choice(self.ops)
            for i, (name, _value) in enumerate(pairs):
                if name == "op":
                    pairs[i] = ("op", other)
                    break
            else:
                pairs.insert(0, ("op", other))
            return f"op -> {other}"
        if choice == "fds-names":
            known = list(protocol.MAP_DESCRIPTORS)
            names: Any = rng.choice([
                lambda: rng.sample(known, rng.randrange(len(known) + 1)),
                lambda: [rng.choice(known) for _ in range(rng.randrange(1, 6))],  # repeats
                lambda: [*rng.sample(known, rng.randrange(len(known) + 1)), rng.choice(["bogus", "", "UFFD"])],
                lambda: rng.choice(["uffd", None, 2, {}, [None], [1, 2], ["uffd", ["store"]]]),
            ])()
            for i, (name, _value) in enumerate(pairs):
                if name == "fds":
                    pairs[i] = ("fds", names)
                    break
            else:
                pairs.append(("fds", names))
            return f"fds names {names!r}"
        if choice == "attach":
            how = rng.choice(["drop", "add", "replace", "swap", "many", "none"])
            if how == "drop" and fds:
                fds.pop(rng.randrange(len(fds)))
            elif how == "add":
                fds.insert(rng.randrange(len(fds) + 1), rng.choice(ALL_KINDS))
            elif how == "replace" and fds:
                fds[rng.randrange(len(fds))] = rng.choice(ALL_KINDS)
            elif how == "swap" and len(fds) > 1:
                fds.reverse()
            elif how == "many":
                fds.extend(self.random_fds() or ["/dev/null"])
            elif how == "none":
                fds.clear()
            return f"attach {how}"
        if choice == "nest" and pairs:
            name, value = pairs[index]
            pairs[index] = (name, rng.choice([[value], Pairs([("v", value)]), self.deep()]))
            return f"nest {name}"
        if choice == "reorder":
            rng.shuffle(pairs)
            return "reorder"
        return f"{choice} (nothing to do)"

    def byte_op(self) -> tuple[str, Any]:
        rng = self.rng
        op = rng.choice(["truncate", "truncate", "bad-utf8", "bad-utf8", "bitflip", "pad", "pad", "append",
                         "reencode"])
        if op == "truncate":
            return op, rng.random()
        if op == "bad-utf8":
            return op, [(rng.random(), rng.choice(INVALID_UTF8)) for _ in range(rng.randrange(1, 4))]
        if op == "bitflip":
            return op, [(rng.random(), rng.randrange(8)) for _ in range(rng.randrange(1, 4))]
        if op == "pad":  # whitespace round a request, to past 64 KiB at times
            total = rng.choice([100, 4096, MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, 70000])
            return op, (rng.random(), total, rng.choice([b" ", b"\n", b"\t", b"\r\n"]))
        if op == "append":
            return op, rng.choice([b"\0", b"}", b" garbage", b'{"op":"status"}', rng.randbytes(rng.randrange(1, 64)),
                                   b"," + b" " * 10])
        return op, rng.choice(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1"])

    def random_fds(self) -> list[str]:
        """None most often, else 1 to 6; at times more than a message may carry."""
        rng = self.rng
        if rng.random() < 0.6:
            return []
        count = rng.randrange(1, 7) if rng.random() < 0.9 else protocol.MAX_FDS + rng.randrange(1, 3)
        return [rng.choice(ALL_KINDS) for _ in range(count)]

    # the input ---------------------------------------------------------

    def next(self) -> Input:
        item = self._next()
        self.confine(item.message)
        return item

    def _next(self) -> Input:
        rng = self.rng
        index = self.count
        self.count += 1
        roll = rng.random()
        pages = rng.choice([1, 1, 1, 2, 4, 8])
        if roll < 0.15:
            size = rng.choice([
                lambda: rng.randrange(0, 65),
                lambda: rng.randrange(64, 4097),
                lambda: rng.randrange(4096, MAX_MESSAGE + 1),
                lambda: rng.randrange(MAX_MESSAGE, 70001),
            ])()
            data = rng.randbytes(size)
            if size and rng.random() < 0.3:
                data = b"{" + data[1:]  # an object's start, to get the parser going
            return Input(index, "random bytes", data, self.random_fds(), note=f"{size} bytes")
        if roll < 0.23:
            junk = rng.choice([lambda: self.value(), lambda: Pairs((self.key(), self.value()) for _ in range(4)),
                               lambda: self.deep(), lambda: Verbatim(rng.choice(["", " ", "{", "}", "{}", "[]",
                                                                                  "null", '"op"', "{,}"]))])()
            return Input(index, "json junk", junk, self.random_fds(), ascii_only=rng.random() < 0.7)
        map_name = rng.choices(["map", "map with key", "map with children", "map with the store as children"],
                               [0.5, 0.2, 0.2, 0.1])[0]
        if roll < 0.33:
            pairs, fds = self.template_pairs(map_name)
            fds = ["forged-pipe" if kind == "registered-uffd" else kind for kind in fds]
            notes = [f"{map_name}, a pipe of forged uffd messages as its uffd"]
            if rng.random() < 0.3:
                fds = [rng.choice(["forged-pipe", "registered-uffd", "file plain.bin"]) for _ in fds]
                notes = [f"{map_name}, its descriptors drawn from forged pipes, a registered uffd, the plain store"]
            forged = [forged_uffd_message(rng) for _ in range(rng.randrange(1, 12))]
            if rng.random() < 0.3:
                notes.append(self.mutate(pairs, fds))
            return Input(index, "forged uffd messages", pairs, fds, note="; ".join(notes), pages=pages, forged=forged)
        op = rng.choice(self.ops + ["map"] * 4)
        name = map_name if op == "map" else op
        pairs, fds = self.template_pairs(name)
        if roll < 0.45:
            return Input(index, f"valid {name}", pairs, fds, pages=pages)
        notes = [self.mutate(pairs, fds) for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4]))]
        byte_ops = [self.byte_op()] if rng.random() < 0.25 else []
        notes += [op for op, _arg in byte_ops]
        forged = [forged_uffd_message(rng) for _ in range(4)] if "forged-pipe" in fds else []
        return Input(index, f"mutated {name}", pairs, fds, note="; ".join(notes), pages=pages, byte_ops=byte_ops,
                     forged=forged, ascii_only=rng.random() < 0.9)


# --- descriptors ------------------------------------------------------------------------------


class Descriptors:
    """The static descriptors of every kind, and the per-input ones."""

    def __init__(self, stack: contextlib.ExitStack, files: Files, key: Key, foreign_uffd: int,
                 templates: dict[str, Template]) -> None:
        fds: dict[str, int] = {}

        def keep(name: str, fd: int) -> None:
            fds[name] = fd
            stack.callback(os.close, fd)

        keep("/dev/null", os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        keep("pipe-read", read_end)
        keep("pipe-write", write_end)
        one, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep("socketpair", one.detach())
        keep("socketpair-other", other.detach())
        keep("eventfd", os.eventfd(1, os.EFD_CLOEXEC))
        memfd = os.memfd_create("fuzz-not-a-key", os.MFD_CLOEXEC)
        os.write(memfd, os.urandom(64))
        keep("memfd", memfd)
        keep("key-memfd", _key_memfd(key))  # the run's key, as the library sends it: sealed, 32 bytes
        keep("directory", os.open(files.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        for path in (files.plain, files.encrypted, files.children, files.held):
            keep(f"file {path.name}", os.open(path, os.O_RDWR | os.O_CLOEXEC))
        keep("file-ro plain.bin", os.open(files.plain, os.O_RDONLY | os.O_CLOEXEC))
        for template in templates.values():  # any other file the library sent (beside a store, say)
            for slot in template.slots:
                if slot.startswith("file ") and f"file {os.path.basename(slot[5:])}" not in fds:
                    keep(f"file {os.path.basename(slot[5:])}", os.open(slot[5:], os.O_RDWR | os.O_CLOEXEC))
        uffd = Uffd.create(REGION_UFFD_FEATURES)  # this process's, registered nowhere
        stack.callback(uffd.close)
        fds["uffd"] = uffd.fd
        fds["foreign-uffd"] = foreign_uffd
        keep("pidfd", os.pidfd_open(os.getpid()))
        epoll = select.epoll()
        stack.callback(epoll.close)
        fds["epoll"] = epoll.fileno()
        self.static = fds

    @contextlib.contextmanager
    def attached(self, item: Input, env: Env) -> Iterator[list[int]]:
        """The descriptors of `item`, per-input ones made (and `env` set to
        the registered uffd's address and size); those go at exit."""
        with contextlib.ExitStack() as stack:
            fds = []
            registered = None
            for kind in item.fds:
                if kind == "registered-uffd":
                    each = stack.enter_context(registered_uffd(item.pages))
                    registered = registered or each
                    fds.append(each.fd)
                elif kind == "forged-pipe":
                    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                    stack.callback(os.close, read_end)
                    stack.callback(os.close, write_end)
                    for message in item.forged or [bytes(32)]:
                        os.write(write_end, message)
                    fds.append(read_end)
                else:
                    fds.append(self.static[kind])
            if registered is not None:
                env.address, env.size = registered.address, registered.size
            else:
                env.address, env.size = 1 << 40, item.pages * PAGE
            yield fds


@contextlib.contextmanager
def foreign_uffd() -> Iterator[int]:
    """A userfaultfd of another process (tests/hostile_clients.py uffd-donor),
    registered over 2 pages of its own at an address this process leaves alone."""
    address = 0x3B5A_0000_0000 + (os.getpid() % 4096) * (1 << 24)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    donor = subprocess.Popen([sys.executable, str(HOSTILE_CLIENTS), "uffd-donor", str(theirs.fileno()),
                              str(address), "2"], pass_fds=[theirs.fileno()], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, start_new_session=True, cwd="/")
    theirs.close()
    try:
        ours.settimeout(30)
        _data, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        assert len(fds) == 1, "the uffd donor sent no descriptor"
        try:
            yield fds[0]
        finally:
            os.close(fds[0])
    finally:
        ours.close()
        with contextlib.suppress(OSError):
            donor.stdin.write(b"exit\n")  # type: ignore[union-attr]
            donor.stdin.close()  # type: ignore[union-attr]
        try:
            donor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(donor.pid, 9)
            donor.wait()


# --- connections ------------------------------------------------------------------------------


class Hang(Exception):
    pass


def shown(data: bytes) -> str:
    """repr of bytes with runs of one byte shortened, and the middle of a long message left out."""
    text = re.sub(rb"(.)\1{23,}", lambda m: b"<%d x %s>" % (len(m.group(0)), repr(m.group(1)).encode()), data,
                  flags=re.DOTALL)
    if len(text) > 700:
        text = text[:500] + b"<...>" + text[-150:]
    return repr(text)


@dataclasses.dataclass
class Sent:
    """What a failure message tells of one input."""

    item: Input
    conn: int
    mode: str
    greeted: bool
    data: bytes
    fds: list[str]
    reply: str = "(not read)"
    seconds: float = 0.0

    def describe(self) -> str:
        where = f"connection {self.conn} ({self.mode}{'' if self.greeted else ', before hello'})"
        what = self.item.kind + (f" [{self.item.note}]" if self.item.note else "")
        return (f"  #{self.item.index} on {where}: {what}\n"
                f"    fds: {self.fds or 'none'}; {len(self.data)} bytes: {shown(self.data)}\n"
                f"    -> {self.reply} ({self.seconds * 1000:.0f} ms)")


class FuzzConnection:
    """One connection of the fuzz: "await" reads each reply, "stream" sends
    without reading and is dropped with replies unread, "prehello" never
    says hello."""

    def __init__(self, number: int, path: str, mode: str, budget: int) -> None:
        self.number = number
        self.mode = mode
        self.budget = budget
        self.raw = Raw(path, hello=False)
        self.raw.sock.settimeout(REPLY_TIMEOUT)  # a send the daemon never takes is a hang too
        self.greeted = False
        self.open = True
        self.regions: list[int] = []
        self.stack = contextlib.ExitStack()  # what the regions the daemon serves on it need kept
        self.live: tuple[int, int] | None = None  # (address, size) of a served faithful region
        self.history: collections.deque[Sent] = collections.deque(maxlen=12)  # what was sent on it

    def send(self, data: bytes, fds: list[int]) -> bool:
        try:
            delivered = self.raw.send(data, fds)
        except TimeoutError:
            raise Hang(f"the daemon took no message on connection {self.number} for {REPLY_TIMEOUT:g} s") from None
        if not delivered:
            self.open = False
        return delivered

    def receive(self) -> dict[str, Any] | None:
        try:
            reply = self.raw.receive(REPLY_TIMEOUT)
        except TimeoutError:
            raise Hang(f"no reply on connection {self.number} within {REPLY_TIMEOUT:g} s") from None
        if reply is None:
            self.open = False
        return reply

    def close(self) -> None:
        self.raw.close()  # replies unread or not: abruptly, as a crashing client would
        self.stack.close()  # then each region's range is unregistered (before its memory goes)
        self.open = False


def summary(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "connection closed by the daemon"
    text = json.dumps(reply)
    return text if len(text) < 300 else text[:300] + "..."


def touch(address: int) -> bool:
    """Writes a byte at `address` (a page of a served region: the daemon
    fills it) from a thread, so that a fault the daemon never serves is
    seen: ctypes lets go of the GIL."""
    done = threading.Event()

    def write() -> None:
        ctypes.memset(address, 0x5A, 1)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(REPLY_TIMEOUT)


# --- the daemon's health ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def normal_client(path: str, store: Path) -> str | None:
    """tests/hostile_clients.py normal-client: connect, map the whole store,
    compare region.view() with the file, close. None, or what went wrong."""
    try:
        done = subprocess.run([sys.executable, str(HOSTILE_CLIENTS), "normal-client", path, str(store)],
                              capture_output=True, timeout=30, cwd="/", stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "the normal client did not finish within 30 s"
    reports = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
    reads = [m for m in reports if m.get("what") == "read"]
    if done.returncode != 0 or not reads:
        return (f"the normal client ended with {describe_returncode(done.returncode)}: {reports[-1:]} "
                f"{done.stderr.decode(errors='replace')[-1500:]}")
    if not reads[0]["same"]:
        return "the normal client's region does not read as its file"
    return None


def wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            where = f.read().strip()
    except OSError:
        return "(gone)"
    return "(running)" if where in ("", "0") else where


# --- the fuzz ---------------------------------------------------------------------------------


class Fuzz:
    """One run: the daemon, the generator, the connections, the checks."""

    def __init__(self, daemon: Any, tmp_path: Path, seed: int, stack: contextlib.ExitStack) -> None:
        self.daemon = daemon
        self.state = Path(os.environ["UFFD_PAGER_STATE_DIR"])  # see the fuzz_daemon fixture
        self.tmp_path = tmp_path
        self.seed = seed
        self.started = time.monotonic()
        self.check_rng = random.Random(f"{seed}-checks")
        self.flow = random.Random(f"{seed}-flow")  # connections: modes, lengths, which one carries the next input
        self.files = Files.make(tmp_path / "stores")
        self.key = Key.generate()
        self.templates = record_library_requests(daemon.path, self.files, self.key)
        self.generator = Generator(seed, self.templates, self.files)
        self.recent: collections.deque[Sent] = collections.deque(maxlen=8)
        self.stats: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.oddities: list[str] = []
        self.batch = 0
        self.batch_items: list[Input] = []
        self.conns: list[FuzzConnection] = []
        self.numbers = iter(range(1, 1 << 30))
        self.descriptors: Descriptors | None = None
        self.baseline = self.check(None)  # after the recording and a first normal client: the daemon at idle
        print(f"idle baseline: {self.baseline}")
        self.descriptors = Descriptors(stack, self.files, self.key, stack.enter_context(foreign_uffd()),
                                       self.templates)

    # reporting -----------------------------------------------------------

    def fail(self, what: str, *, replay: str | None = None, conn: FuzzConnection | None = None) -> NoReturn:
        """Fails the test with the seed, the batch and the inputs sent last
        (on `conn`, if given); a `replay` of the batch on a new daemon
        ("crash", "hang", "leak" or "spin") names the input that does it."""
        try:
            code = self.daemon.process.wait(timeout=0.5)  # a daemon that just closed every connection may be dying
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            what += f" (the daemon died: {describe_returncode(code)})"
            replay = "crash"
        first = self.batch_items[0].index if self.batch_items else self.generator.count
        lines = [f"fuzz seed {self.seed} (rerun: UFFD_PAGER_FUZZ_SEED={self.seed} pytest {__file__}), "
                 f"batch {self.batch} (inputs from #{first}; {self.generator.count} generated): {what}"]
        if conn is not None:
            lines.append(f"the last inputs sent on connection {conn.number}, oldest first:")
            lines += [sent.describe() for sent in conn.history]
        else:
            lines.append("the last inputs sent, oldest first:")
            lines += [sent.describe() for sent in self.recent] or ["  (none)"]
        if replay and self.descriptors is not None:
            lines.append(self.replay_alone(replay))
        pytest.fail("\n".join(lines), pytrace=False)

    # the daemon ----------------------------------------------------------

    def status(self, path: str | None = None) -> dict[str, Any]:
        """status on a new connection, as a user would ask it."""
        try:
            with Raw(path or self.daemon.path, timeout=STATUS_WITHIN) as raw:
                return raw.status(timeout=STATUS_WITHIN)
        except (TimeoutError, AssertionError, OSError) as exc:
            if path is not None:
                raise
            self.fail(f"status failed: {exc!r}")

    def check(self, baseline: dict[str, Any] | None) -> dict[str, Any]:
        """The daemon alive, settled back to `baseline` (descriptors, and no
        region, store or connection but the one asking), idle, answering
        status within 2 s, serving a normal client byte-exact."""
        pid = self.daemon.process.pid
        if self.daemon.process.poll() is not None:
            self.fail("the daemon is not running")
        deadline = time.monotonic() + SETTLE
        while True:
            now = self.status()
            settled = now["regions"] == 0 and now["connections"] == 1
            if baseline is not None:
                settled = (settled and now["open_fds"] <= baseline["open_fds"] + FD_SLACK and now["stores"] == 0
                           and now["portions"] == 0 and now["tasks"] <= baseline["tasks"] + TASK_SLACK)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not settled:
            time.sleep(3)
            self.fail(f"{SETTLE:g} s after the fuzz's connections closed, the daemon still holds more than at idle: "
                      f"{now} (idle: {baseline}; 3 s later: {self.status()})", replay="leak")
        if now["rss_kib"] > RSS_LIMIT_KIB:
            self.fail(f"the daemon grew to {now['rss_kib'] // 1024} MiB of RSS")
        before = cpu_seconds(pid)
        time.sleep(IDLE_WINDOW)
        spent = cpu_seconds(pid) - before
        if spent >= IDLE_CPU:
            self.fail(f"the daemon spins: {spent:.2f} s of CPU over {IDLE_WINDOW:g} s with no client sending anything "
                      f"(it is in {wchan(pid)})", replay="spin")
        asked = time.monotonic()
        self.status()
        if (took := time.monotonic() - asked) >= STATUS_WITHIN:
            self.fail(f"status took {took:.2f} s")
        normal = self.tmp_path / f"normal-{self.batch}.bin"
        normal.write_bytes(self.check_rng.randbytes(self.check_rng.randint(1, 32) * PAGE))
        wrong = normal_client(self.daemon.path, normal)
        normal.unlink()
        if wrong:
            self.fail(wrong)
        self.stats["idle cpu ms (max)"] = max(self.stats["idle cpu ms (max)"], int(spent * 1000))
        return now

    # connections ---------------------------------------------------------

    def hello(self) -> Input:
        return Input(-1, "hello (the connection's start)", self.generator.template_pairs("hello")[0], [])

    def held_map(self, pages: int) -> Input:
        pairs, fds = self.generator.template_pairs("map", held=True)
        return Input(-1, "valid map (the connection's own region)", pairs, fds, pages=pages)

    def open_connection(self) -> FuzzConnection:
        flow = self.flow
        mode = flow.choices(["await", "stream", "prehello"], [0.75, 0.15, 0.10])[0]
        budget = {"await": min(400, int(flow.expovariate(1 / 40)) + 1), "stream": flow.randint(1, 30),
                  "prehello": 1}[mode]
        hold = mode == "await" and flow.random() < 0.4
        conn = FuzzConnection(next(self.numbers), self.daemon.path, mode, budget)
        self.conns.append(conn)
        self.stats["connections"] += 1
        if mode != "prehello":
            if not (reply := self.exchange(conn, self.hello(), counted=False)) or not reply.get("ok"):
                self.fail(f"the daemon refused a faithful copy of the library's hello on a new connection: {reply}")
            conn.greeted = True
        if hold:  # a region the daemon serves, kept for the connection's life (over the held store)
            if not (reply := self.exchange(conn, self.held_map(flow.choice([1, 2, 4])), counted=False)) \
                    or not reply.get("ok"):
                self.fail(f"the daemon refused a faithful copy of the library's map on a new connection: {reply}")
        return conn

    def close_connection(self, conn: FuzzConnection) -> None:
        self.conns.remove(conn)
        conn.close()

    def exchange(self, conn: FuzzConnection, item: Input, *, counted: bool = True) -> dict[str, Any] | bool | None:
        """Sends `item` on `conn`, and reads the answer unless the connection
        streams (its own hello and map it reads): False if the connection
        turned out closed before the input went, else the reply (None: the
        daemon hung up)."""
        others = [r for c in self.conns if c is not conn for r in c.regions]
        env = Env(region=conn.regions[-1] if conn.regions else 1, other_region=others[-1] if others else 424242)
        stats = self.stats
        with contextlib.ExitStack() as keep:
            fds = keep.enter_context(self.descriptors.attached(item, env))
            data = item.render(env)
            sent = Sent(item, conn.number, conn.mode, conn.greeted, data, list(item.fds))
            if not conn.send(data, fds):
                return False
            self.recent.append(sent)
            conn.history.append(sent)
            if counted:
                stats["inputs"] += 1
                stats[item.kind.split()[0]] += 1
                stats["bytes"] += len(data)
                stats["descriptors"] += len(fds)
                if conn.mode == "stream":
                    conn.stack.push(keep.pop_all())  # the daemon may still be reading them
                    return None
            asked = time.monotonic()
            try:
                reply = conn.receive()
            except Hang as exc:
                self.fail(str(exc), replay="hang", conn=conn)
            sent.seconds = time.monotonic() - asked
            sent.reply = summary(reply)
            stats["slowest reply ms"] = max(stats["slowest reply ms"], int(sent.seconds * 1000))
            if not conn.greeted and item.kind != "hello (the connection's start)":
                conn.open = False  # a connection that does not start with hello gets one answer
            if reply and reply.get("ok") and isinstance(reply.get("region"), int):
                conn.regions.append(reply["region"])
                conn.stack.push(keep.pop_all())  # the region's memory stays while the daemon serves it
                if item.kind in ("valid map", "valid map (the connection's own region)") and conn.live is None:
                    conn.live = (env.address, env.size)
            if not counted:
                return reply
            if reply is None:
                stats["hung up on"] += 1
            elif reply.get("ok"):
                stats["served"] += 1
                if len(data) > MAX_MESSAGE:
                    self.oddities.append(f"a message of {len(data)} bytes (over {MAX_MESSAGE}) was served:\n"
                                         f"{sent.describe()}")
                if "spans" in reply:  # an unmap was served: its region's uffd is read no more
                    conn.live = None
            else:
                kind = str((reply.get("error") or {}).get("type"))
                self.errors[kind] += 1
                if kind not in EXPECTED_ERRORS and len(self.oddities) < 50:
                    self.oddities.append(f"an error of unexpected type {kind}:\n{sent.describe()}")
            return reply

    # the run -------------------------------------------------------------

    def run(self, target: int) -> None:
        flow, stats = self.flow, self.stats
        pending: Input | None = None  # an input whose connection turned out closed: sent on another
        try:
            while stats["inputs"] < target:
                self.batch += 1
                self.batch_items = []
                stop = min(target, stats["inputs"] + BATCH)
                while stats["inputs"] < stop:
                    if not self.conns or (len(self.conns) < MAX_OPEN and flow.random() < 0.05):
                        conn = self.open_connection()
                    else:
                        conn = flow.choice(self.conns)
                    if conn.live is not None and flow.random() < 0.03:  # a write to a page the daemon serves
                        address, size = conn.live
                        page = address + flow.randrange(size // PAGE) * PAGE
                        stats["pages written"] += 1
                        if not touch(page):
                            self.fail(f"a write to {page:#x}, in a region the daemon serves on connection "
                                      f"{conn.number}, waited {REPLY_TIMEOUT:g} s", conn=conn)
                    if pending is None:
                        self.batch_items.append(self.generator.next())
                    item, pending = pending or self.batch_items[-1], None
                    try:
                        if self.exchange(conn, item) is False:
                            pending = item
                    except Hang as exc:  # a send the daemon does not take
                        self.fail(str(exc), replay="hang", conn=conn)
                    conn.budget -= 1
                    if not conn.open or conn.budget <= 0:
                        if conn.open and conn.greeted and conn.mode == "await" and flow.random() < 0.2:
                            # Dropped mid-request: a flush of its region, the answer never read.
                            region = conn.regions[-1] if conn.regions else 1
                            conn.send(json.dumps({"op": "flush", "region": region}).encode(), [])
                        self.close_connection(conn)
                for conn in list(self.conns):
                    self.close_connection(conn)
                now = self.check(self.baseline)
                self.files.reset(self.state, {Path(slot[5:]) for template in self.templates.values()
                                              for slot in template.slots if slot.startswith("file ")})
                print(f"batch {self.batch}: {stats['inputs']} inputs, {stats['connections']} connections, "
                      f"{now['open_fds']} fds, {time.monotonic() - self.started:.1f} s")
        except OSError as exc:  # connecting or sending failed: the daemon is gone, or the fuzz is wrong
            self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            for conn in list(self.conns):
                self.close_connection(conn)

    # replay --------------------------------------------------------------

    def replay_alone(self, what: str) -> str:
        """The batch's inputs again on a new daemon (started for this,
        stopped after), each alone on a new connection that holds a region
        and is closed after the input's reply: the input after which that
        daemon is dead, or (`what`) does not answer it ("hang"), holds more
        descriptors, stores or regions than before it ("leak", up to three
        such inputs), or spins ("spin")."""
        path = str(Path(self.daemon.path).with_name("replay.sock"))
        process = subprocess.Popen([sys.executable, "-m", "uffd_pager", "serve", "--socket", path],
                                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        found: list[str] = []
        header = "replayed alone on a new daemon, each on a new connection holding a region of its own"
        sent: Sent | None = None
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(path) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)

            def held() -> tuple[int, int, int]:
                now = self.status(path)
                return now["open_fds"], now["stores"], now["regions"]

            deadline = time.monotonic() + 90
            for item in self.batch_items:
                if len(found) == 3 or time.monotonic() > deadline:
                    break
                before = held()
                conn = FuzzConnection(0, path, "replayed alone", 1)
                hung = False
                try:
                    for each in (self.hello(), self.held_map(1), item):
                        env = Env(region=conn.regions[-1] if conn.regions else 1)
                        with contextlib.ExitStack() as keep:
                            fds = keep.enter_context(self.descriptors.attached(each, env))
                            data = each.render(env)
                            sent = Sent(each, 0, conn.mode, True, data, list(each.fds))
                            if not conn.send(data, fds):
                                break
                            try:
                                reply = conn.receive()
                            except Hang:
                                hung = True
                                break
                            sent.reply = summary(reply)
                            if reply and reply.get("ok") and isinstance(reply.get("region"), int):
                                conn.regions.append(reply["region"])
                                conn.stack.push(keep.pop_all())  # the region's memory, until the connection goes
                    hung_up = not conn.open
                finally:
                    conn.close()
                if hung_up:  # the daemon hung up: it may be on its way out
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=0.05)
                if process.poll() is not None:
                    code = describe_returncode(process.returncode)
                    return f"{header}, this input ends it ({code}):\n{sent.describe()}"
                if hung and what == "hang":
                    return f"{header}, this input is not answered within {REPLY_TIMEOUT:g} s:\n{sent.describe()}"
                if what == "spin":
                    pid = process.pid
                    spent = cpu_seconds(pid)
                    time.sleep(0.05)
                    if cpu_seconds(pid) - spent > 0.025:
                        spent = cpu_seconds(pid)
                        time.sleep(0.3)
                        if cpu_seconds(pid) - spent > 0.15:
                            return f"{header}, this input leaves it spinning:\n{sent.describe()}"
                if what == "leak":
                    settle = time.monotonic() + 0.5
                    while True:
                        after = held()
                        more = any(now > then for now, then in zip(after, before))
                        if not more or time.monotonic() > settle:
                            break
                        time.sleep(0.02)
                    if more:
                        found.append(f"{sent.describe()}\n    (descriptors, stores, regions) {before} -> {after}")
        except (OSError, AssertionError, TimeoutError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
            if process.poll() is not None and sent is not None:
                code = describe_returncode(process.returncode)
                return f"{header}, this input ends it ({code}):\n{sent.describe()}"
            return f"(the replay on a new daemon failed: {exc!r})"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not found:
            return f"{header}: no input of the batch makes it {what} on its own"
        return f"{header}, these inputs leave it holding more:\n" + "\n".join(found)


@pytest.fixture
def fuzz_daemon(start_daemon: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A daemon whose state directory (encrypted stores' anchors) is the test's own."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("UFFD_PAGER_STATE_DIR", str(state))
    return start_daemon("fuzz.sock")


@pytest.mark.timeout(400)
def test_fuzzed_inputs_leave_the_daemon_alive_idle_leak_free_and_serving(fuzz_daemon, tmp_path):
    print(f"\nfuzz seed {SEED} (UFFD_PAGER_FUZZ_SEED={SEED} to rerun), {INPUTS} inputs, a check every {BATCH}")
    with contextlib.ExitStack() as stack:
        fuzz = Fuzz(fuzz_daemon, tmp_path, SEED, stack)
        fuzz.run(INPUTS)
    print(f"{fuzz.stats['inputs']} inputs in {time.monotonic() - fuzz.started:.1f} s: {dict(fuzz.stats)}")
    print(f"refusals by error type: {dict(fuzz.errors)}")
    for oddity in fuzz.oddities:
        warnings.warn(f"fuzz seed {SEED}: {oddity}")
    assert fuzz.stats["inputs"] >= INPUTS
