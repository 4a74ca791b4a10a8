"""Child processes for tests/test_encryption.py, as importable code, and the
helpers both the tests and the children use (page contents, the catalog as
an attacker reads and alters it).

Run one as ``python encryption_children.py NAME CFG_JSON`` (``key-from-file``
takes a path instead). These keep the stdout protocol the tests parse: one
JSON object a line, *without* the "what"/"pid" keys of tests/child.py (a
failure in a forked child is reported as ``{"child_error": TRACEBACK}``). A
child that raises prints its traceback on stderr and exits with status 1, as
a ``python -c`` script would; each ends through the interpreter's own exit
unless it says os._exit.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import sys
import traceback
from typing import Any

import uffd_pager
from uffd_pager import catalog as _catalog
from child import PlainRegistry

PAGE = uffd_pager.PAGE_SIZE

CHILDREN = PlainRegistry()
child = CHILDREN.register


# --- page contents, the same in the tests and in every child ----------------------------------


def page_data(kind: str, tag: str, page: int, salt: str = "") -> bytes:
    """A page of test data. kind "random": random-looking bytes; "counter":
    all zeros but a distinctive counter in each 16-byte chunk; "ascii": one
    16-byte ASCII line repeated, the same in every page of a tag (so any
    block-wise leak of the plaintext would show)."""
    if kind == "random":
        return hashlib.shake_256(f"{salt}:{tag}:{page}".encode()).digest(PAGE)
    if kind == "counter":
        base = (0xC0FFEE << 32) + (ord(tag[0]) << 24) + page * (PAGE // 16)
        return b"".join(struct.pack("<Q", base + i) + bytes(8) for i in range(PAGE // 16))
    if kind == "ascii":
        return ((tag[0] + "-ascii-pattern\n").encode() * (PAGE // 16))[:PAGE]
    raise ValueError(kind)


def flip_bit(data: bytes, at: int, bit: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]


# --- the catalog, read and altered the way a store's owner (or an attacker) could --------------
# A header, then one 80-byte record of two slots per page (uffd_pager.catalog).


def read_catalog_rows(path: str) -> dict[int, tuple[int, bytes, bytes]]:
    """{page: (version, nonce, tag)}: the newest slot of each page the catalog holds."""
    return {page: (version, bytes(nonce), bytes(tag))
            for page, (version, nonce, tag) in _catalog.read_records(path).items()}


def read_catalog_meta(path: str) -> dict[str, Any]:
    """{"key_id": hex, "store_id": hex, "generation": n}"""
    with open(path, "rb") as f:
        _magic, key_id, store_id, generation, _mac, _checksum = _catalog.HEADER.unpack(f.read(_catalog.HEADER.size))
    return {"key_id": key_id.hex(), "store_id": store_id.hex(), "generation": generation}


def write_catalog_row(path: str, page: int, version: int, nonce: bytes, tag: bytes) -> None:
    """Overwrites the page's newest slot (the one that opens it now)."""
    slots = _catalog.read_slots(path).get(page)
    newest = 1 if slots and slots[1][0] > slots[0][0] else 0
    with open(path, "r+b") as f:
        f.seek(_catalog.HEADER_BYTES + page * _catalog.RECORD_BYTES + newest * _catalog.SLOT.size)
        f.write(_catalog.SLOT.pack(version, nonce, tag))


# --- a client ------------------------------------------------------------------------------------


@child("client")
def client(cfg_json: str) -> None:
    """Maps (url, size, offset) with key_file; then, in this order:
      probe: for each page, makes the kernel read it (os.write into a pipe):
             the sha256 of what it read, or the errno name (EFAULT: the page
             is poisoned)
      read:  sha256 of each page
      prints one JSON line: {"hashes", "probes", "stats"}
      touch: reads the page's first byte (expected to die with SIGBUS);
             prints {"touched"}."""
    cfg = json.loads(cfg_json)
    pager = uffd_pager.connect(cfg["socket"]) if cfg.get("socket") else uffd_pager.Pager()
    region = pager.map(cfg["url"], cfg["size"], cfg.get("offset", 0), key_file=cfg["key_file"], writeback_interval=0)
    view = region.view()
    probes = {}
    r, w = os.pipe()
    for p in cfg.get("probe", []):
        try:
            n = os.write(w, view[p * PAGE:(p + 1) * PAGE])
            probes[p] = hashlib.sha256(os.read(r, n)).hexdigest()
        except OSError as exc:
            probes[p] = errno.errorcode.get(exc.errno, str(exc.errno))
    hashes = {p: hashlib.sha256(view[p * PAGE:(p + 1) * PAGE]).hexdigest() for p in cfg.get("read", [])}
    st = region.stats()
    print(json.dumps({"hashes": hashes, "probes": probes,
                      "stats": {k: st.get(k) for k in ("auth_failures", "poisoned", "errors", "encrypted")}}),
          flush=True)
    touch = cfg.get("touch")
    if touch is not None:
        value = view[touch * PAGE]
        print(json.dumps({"touched": value}), flush=True)
        os._exit(0)
    del view
    region.close()
    pager.close()


# --- a fork --------------------------------------------------------------------------------------


@child("fork")
def fork(cfg_json: str) -> None:
    """The parent writes A everywhere, flushes, forks; the child writes B to
    its pages (flushing first or last per "order"); the parent writes C to
    its pages and flushes. Prints one JSON line: the child's report and the
    parent's."""
    cfg = json.loads(cfg_json)
    n = cfg["size"] // PAGE

    def data(tag: str, p: int) -> bytes:
        return page_data(cfg["kind"], tag, p, cfg["salt"])

    def digests(view: memoryview) -> list[str]:
        return [hashlib.sha256(view[p * PAGE:(p + 1) * PAGE]).hexdigest() for p in range(n)]

    pager = uffd_pager.Pager()
    region = pager.map(cfg["url"], cfg["size"], fork_policy=cfg["policy"], children=cfg["children"],
                       keep_child_portions=cfg["keep"], writeback_interval=0, key_file=cfg["key_file"],
                       dirty_tracking=cfg["tracking"])
    view = region.view()
    for p in range(n):
        view[p * PAGE:(p + 1) * PAGE] = data("A", p)
    assert region.flush()["pages"] == n
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(c2p_r)
            os.close(p2c_w)
            v = region.view()
            at_fork = digests(v)
            for p in cfg["child_pages"]:
                v[p * PAGE:(p + 1) * PAGE] = data("B", p)
            if cfg["order"] == "child-first":
                region.flush()
            os.write(c2p_w, b'{"what": "written"}\n')
            assert os.read(p2c_r, 1) == b"g"
            if cfg["order"] != "child-first":
                region.flush()
            b = region.backing()
            st = region.stats()
            msg = {"what": "done", "url": b.url, "offset": b.offset, "at_fork": at_fork, "view": digests(v),
                   "fork": st["fork"], "auth_failures": st["auth_failures"], "poisoned": st["poisoned"]}
            del v
            region.close()
            os.write(c2p_w, (json.dumps(msg) + "\n").encode())
            code = 0
        except BaseException:
            os.write(c2p_w, (json.dumps({"error": traceback.format_exc()}) + "\n").encode())
        finally:
            os._exit(code)
    os.close(c2p_w)
    os.close(p2c_r)
    from_child = os.fdopen(c2p_r)

    def from_the_child() -> dict[str, Any]:
        msg = json.loads(from_child.readline() or '{"error": "the child closed the pipe"}')
        if "error" in msg:
            print(json.dumps({"child_error": msg["error"]}), flush=True)
            os.kill(pid, 9)
            sys.exit(3)
        return msg

    from_the_child()
    for p in cfg["parent_pages"]:
        view[p * PAGE:(p + 1) * PAGE] = data("C", p)
    assert region.flush()["pages"] == len(cfg["parent_pages"])
    os.write(p2c_w, b"g")
    reported = from_the_child()
    _, status = os.waitpid(pid, 0)
    b = region.backing()
    st = region.stats()
    parent = {"url": b.url, "offset": b.offset, "view": digests(view), "auth_failures": st["auth_failures"],
              "poisoned": st["poisoned"]}
    del view
    region.close()
    pager.close()
    print(json.dumps({"child": reported, "child_status": os.waitstatus_to_exitcode(status), "parent": parent}),
          flush=True)


# --- nonces --------------------------------------------------------------------------------------


@child("nonce")
def nonce(cfg_json: str) -> None:
    """`restarts` times: a new Pager, map the store with the key, check every
    page reads as last written, then `flushes` times: rewrite some pages
    (page 0 always, with unchanged bytes on odd restarts), flush, print the
    catalog rows."""
    cfg = json.loads(cfg_json)
    n = cfg["size"] // PAGE
    model: dict[int, bytes] = {}

    def rows() -> dict[int, list[Any]]:
        return {p: [v, nonce.hex(), tag.hex()] for p, (v, nonce, tag) in read_catalog_rows(cfg["catalog"]).items()}

    for r in range(cfg["restarts"]):
        with uffd_pager.Pager() as pager:
            region = pager.map(cfg["url"], cfg["size"], key_file=cfg["key_file"], writeback_interval=0)
            view = region.view()
            wrong = [p for p in range(n) if bytes(view[p * PAGE:(p + 1) * PAGE]) != model.get(p, bytes(PAGE))]
            print(json.dumps({"restart": r, "wrong_at_start": wrong}), flush=True)
            for f in range(cfg["flushes"]):
                pages = sorted({(r * 5 + f * 3 + k * 7) % n for k in range(3)} | {0})
                for p in pages:
                    if p == 0 and r % 2 and 0 in model:
                        data = model[0]
                    else:
                        data = page_data("random", f"{r}.{f}", p, cfg["salt"])
                    view[p * PAGE:(p + 1) * PAGE] = data
                    model[p] = data
                flushed = region.flush()["pages"]
                print(json.dumps({"restart": r, "flush": f, "written": pages, "flushed": flushed, "rows": rows()}),
                      flush=True)
            del view
            region.close()


@child("two-pagers")
def two_pagers(cfg_json: str) -> None:
    """Two private pagers with the same store open: the first writes pages,
    the second maps the store, the first rewrites pages 0 and 1; then the
    second's region reads every page. Pages are read only through the kernel
    (os.write into a pipe): a page that fails authentication shows as
    "EFAULT", it never kills the child."""
    cfg = json.loads(cfg_json)
    n = cfg["size"] // PAGE
    first, second = uffd_pager.Pager(), uffd_pager.Pager()
    one = first.map(cfg["url"], cfg["size"], key_file=cfg["key_file"], writeback_interval=0)
    view = one.view()
    for p in range(n):
        view[p * PAGE:(p + 1) * PAGE] = page_data("random", "old", p, cfg["salt"])
    one.flush()
    two = second.map(cfg["url"], cfg["size"], key_file=cfg["key_file"], writeback_interval=0)
    for p in (0, 1):
        view[p * PAGE:(p + 1) * PAGE] = page_data("random", "new", p, cfg["salt"])
    one.flush()
    other = two.view()
    r, w = os.pipe()
    seen = []
    for p in range(n):
        try:
            os.write(w, other[p * PAGE:(p + 1) * PAGE])
            seen.append(hashlib.sha256(os.read(r, PAGE)).hexdigest())
        except OSError as exc:
            seen.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    stats = two.stats()
    print(json.dumps({"seen": seen, "auth_failures": stats["auth_failures"]}), flush=True)
    del view, other
    two.close()
    one.close()
    second.close()
    first.close()


# --- the key file ---------------------------------------------------------------------------------


@child("key-from-file")
def key_from_file(path: str) -> None:
    """Key.from_file(path); an OSError is printed."""
    from uffd_pager import Key
    try:
        Key.from_file(path)
    except OSError as exc:
        print(exc)


# --- the fill path's reads, driven directly (native/aead.c) ---------------------------------------

AEAD_PAGE, AEAD_HEADER, AEAD_ENTRY, HOLE = 4096, 4096, 8, 1 << 63


class Aead:
    """An anchor, a store and a catalog in `d`, and an up_aead of a random
    subkey over them, to drive up_aead_read_page / up_aead_open_page."""

    def __init__(self, d: str) -> None:
        from uffd_pager.native import ffi, lib
        from uffd_pager.crypto import RECORD_BYTES
        self.ffi, self.lib, self.RECORD_BYTES = ffi, lib, RECORD_BYTES
        self.subkey, self.store_id = os.urandom(32), os.urandom(16)
        self.anchor_path = os.path.join(d, "anchor")
        self.anchor_fd = os.open(self.anchor_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self.anchor_fd, bytes(AEAD_HEADER), 0)
        self.store_path, self.catalog_path = os.path.join(d, "store"), os.path.join(d, "catalog")
        self.store_fd = os.open(self.store_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.catalog_fd = os.open(self.catalog_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self.catalog_fd, bytes(AEAD_HEADER), 0)
        self.aead = ffi.gc(lib.up_aead_new(self.subkey, self.anchor_fd, self.catalog_fd, self.store_fd),
                           lib.up_aead_free)

    @staticmethod
    def plain(page: int, version: int) -> bytes:
        return page_data("random", "aead", page, str(version))

    def seal(self, page: int, version: int, slot: int = 0, record: bytes | None = None) -> tuple[bytes, bytes]:
        """(ciphertext, record) of page at version, in slot `slot` of record (a new one: None)."""
        ffi, lib = self.ffi, self.lib
        record = bytearray(record or self.RECORD_BYTES)
        sealed = bytearray(AEAD_PAGE)
        assert lib.up_aead_seal_pages(self.aead, self.store_id, ffi.new("uint64_t[]", [page]), version,
                                      self.plain(page, version), ffi.from_buffer(sealed), ffi.from_buffer(record),
                                      bytes([slot]), 1) == 0
        return bytes(sealed), bytes(record)

    def put(self, page: int, at: int, sealed: bytes, record: bytes) -> None:
        """The page's ciphertext at store page `at`, its record in the catalog."""
        os.pwrite(self.store_fd, sealed, at * AEAD_PAGE)
        os.pwrite(self.catalog_fd, record, AEAD_HEADER + page * self.RECORD_BYTES)

    def commit(self, page: int, version: int) -> None:
        os.pwrite(self.anchor_fd, version.to_bytes(8, "little"), AEAD_HEADER + page * AEAD_ENTRY)

    def result(self, n: int, out: bytearray, expected: dict[int, bytes]) -> str:
        if n < 0:
            err = errno.errorcode.get(self.ffi.errno, str(self.ffi.errno))
            return err if out == bytes(AEAD_PAGE) else err + " (bytes left in out)"
        if n == 0:
            return "zero" if out == bytes(AEAD_PAGE) else "zero (bytes left in out)"
        for version, data in expected.items():
            if out == data:
                return f"v{version}"
        return "wrong"

    def read(self, page: int, at: int, expected: dict[int, bytes]) -> str:
        """What up_aead_read_page gives for page (ciphertext at store page at),
        out filled with junk first: "v<version>", "zero" or an errno name."""
        out = bytearray(b"\xa5" * AEAD_PAGE)
        n = self.lib.up_aead_read_page(self.aead, self.store_id, page, at * AEAD_PAGE, self.ffi.from_buffer(out))
        return self.result(n, out, expected)

    def open_given(self, page: int, sealed: bytes | None, expected: dict[int, bytes]) -> str:
        out = bytearray(b"\xa5" * AEAD_PAGE)
        n = self.lib.up_aead_open_page(self.aead, sealed if sealed is not None else self.ffi.NULL, self.store_id,
                                       page, self.ffi.from_buffer(out))
        return self.result(n, out, expected)

    def anchor_mappings(self) -> int:
        return self.mappings(self.anchor_path)

    @staticmethod
    def mappings(path: str) -> int:
        with open("/proc/self/maps") as f:
            return sum(line.rstrip().endswith(path) for line in f)


@child("growing-anchor")
def growing_anchor(cfg_json: str) -> None:
    cfg = json.loads(cfg_json)
    a = Aead(cfg["dir"])
    read, put, seal, commit, plain = a.read, a.put, a.seal, a.commit, a.plain
    steps, maps = {}, {}
    for p in range(8):
        put(p, p, *seal(p, 1))
        commit(p, 1)
    v = {p: {1: plain(p, 1)} for p in range(8)}
    steps["first"] = [read(p, p, v[p]) for p in range(8)]
    maps["first"] = a.anchor_mappings()
    # Entries changed inside the mapping are seen: a newer commit refuses the
    # old version, a discard makes the page read as zero.
    commit(3, 2)
    commit(5, HOLE | 10)
    steps["changed"] = [read(3, 3, v[3]), read(5, 5, v[5]), read(4, 4, v[4])]
    # Past the anchor's end: an uncommitted write opens, a page never written
    # reads as zero; once committed further on (the file grows past what fstat
    # said, inside the mapping's span), the anchor's entry rules again.
    mid = 1000
    put(mid, 8, *seal(mid, 1))
    vm = {1: plain(mid, 1), 2: plain(mid, 2)}
    steps["mid"] = [read(mid, 8, vm), read(mid + 1, 9, vm)]
    commit(mid, 2)
    steps["mid committed"] = [read(mid, 8, vm)]
    put(mid, 8, *seal(mid, 2))
    steps["mid written"] = [read(mid, 8, vm), read(mid + 1, 9, vm)]
    # Far past the mapping's span: the anchor is mapped anew.
    far = 400_000
    put(far, 10, *seal(far, 3))
    vf = {3: plain(far, 3)}
    steps["far"] = [read(far, 10, vf)]
    commit(far, 3)
    steps["far committed"] = [read(far, 10, vf), read(far, 10, vf)]
    commit(far, 4)
    steps["far newer"] = [read(far, 10, vf), read(mid, 8, vm), read(2, 2, v[2]), read(3, 3, v[3])]
    maps["last"] = a.anchor_mappings()
    print(json.dumps({"steps": steps, "maps": maps, "size": os.fstat(a.anchor_fd).st_size}), flush=True)


@child("in-place")
def in_place(cfg_json: str) -> None:
    cfg = json.loads(cfg_json)
    a = Aead(cfg["dir"])
    read, open_given, put, seal, commit, plain = a.read, a.open_given, a.put, a.seal, a.commit, a.plain
    steps = {}
    # Both slots may open the page (a write not yet committed): slot 1 holds
    # the newer version, tried first; the store holds the older one, so the
    # first attempt, in place, fails and the ciphertext is read again.
    c1, record = seal(0, 1, 0)
    c2, record = seal(0, 2, 1, record)
    v = {1: plain(0, 1), 2: plain(0, 2)}
    put(0, 0, c1, record)
    commit(0, 1)
    steps["older in store"] = [read(0, 0, v), open_given(0, c1, v)]
    put(0, 0, c2, record)
    steps["newer in store"] = [read(0, 0, v), open_given(0, c2, v)]
    # Nothing of a ciphertext that opens with no slot is left in out.
    put(0, 0, flip_bit(c2, 100), record)
    steps["flipped"] = [read(0, 0, v), open_given(0, flip_bit(c1, 4095, 7), v)]
    # The same page with an empty record: committed, so an error, never zeros;
    # uncommitted, zeros from a file store, and still an error for a value a
    # remote store holds.
    os.pwrite(a.catalog_fd, bytes(a.RECORD_BYTES), AEAD_HEADER)
    steps["no record"] = [read(0, 0, v), open_given(0, c1, v), open_given(0, None, v)]
    commit(0, 0)
    steps["no record, uncommitted"] = [read(0, 0, v), open_given(0, c1, v), open_given(0, None, v)]
    print(json.dumps({"steps": steps}), flush=True)


@child("cut-short")
def cut_short(cfg_json: str) -> None:
    """Records and ciphertexts read from mappings, then the store and the
    catalog cut short under them: a load past a file's end is SIGBUS, which
    must fail the page (EBADMSG), never kill this process."""
    cfg = json.loads(cfg_json)
    a = Aead(cfg["dir"])
    read, put, seal, commit, plain = a.read, a.put, a.seal, a.commit, a.plain
    steps = {}
    # Page p's record is at 4096 + p * 80: pages 0-3 in the catalog's second
    # page, 300 and 400 four and five pages past it.
    pages = [0, 1, 2, 3, 300, 400]
    for p in pages:
        put(p, p, *seal(p, 1))
        commit(p, 1)
    v = {p: {1: plain(p, 1), 2: plain(p, 2)} for p in pages}
    steps["before"] = [read(p, p, v[p]) for p in pages]
    mapped = {"catalog": a.mappings(a.catalog_path), "store": a.mappings(a.store_path)}
    os.truncate(a.store_path, 4 * AEAD_PAGE)
    steps["store cut"] = [read(400, 400, v[400]), read(300, 300, v[300]), read(3, 3, v[3]), read(0, 0, v[0])]
    os.truncate(a.catalog_path, AEAD_HEADER + 2 * a.RECORD_BYTES)
    commit(2, 0)  # page 2's record is cut off too: uncommitted, it reads as zero
    steps["catalog cut"] = [read(400, 400, v[400]), read(3, 3, v[3]), read(1, 1, v[1]), read(2, 2, v[2])]
    # Written again, the files read right (by pread from now on).
    for p in (3, 400):
        put(p, p, *seal(p, 2))
        commit(p, 2)
    steps["rewritten"] = [read(3, 3, v[3]), read(400, 400, v[400])]
    print(json.dumps({"steps": steps, "mapped": mapped}), flush=True)


if __name__ == "__main__":
    CHILDREN.main()
