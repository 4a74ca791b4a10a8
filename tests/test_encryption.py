"""Encryption at rest: `map(..., key_file=...)` / `map(..., key=Key)`.

Pages are AES-256-GCM encrypted by the pager; the store holds only
ciphertext, at each page's usual place; nonce, tag and version live in the
catalog beside the store (`<store>.uffd-catalog`: a header and one 80-byte
record of two slots per page; the helpers read and alter it as an attacker
could), and each page's committed version in the store's anchor in the
pager's state directory (each test has its own: the `state_dir` fixture).
The attacker of these tests can read, write, snapshot and restore the store
and its catalog, never the key or the state directory. A page that does not
authenticate (a flipped bit, two pages swapped, an old ciphertext put back,
a page rolled back with its record) is never handed out: it is poisoned, so
the access dies with SIGBUS.

Every access to an encrypted region whose pages came from a store someone
else wrote runs in a subprocess (the "client", "fork" and "nonce" children
of tests/encryption_children.py), waited for with a timeout: with a library
bug, a page that fails authentication would otherwise kill the test run with
SIGBUS. In this process an encrypted region is only ever written on pages
never written before (they read as zero: nothing to authenticate).

To see the pager's counters of a page that is expected to fail, the client
first makes the *kernel* read the page (os.write from it into a pipe): the
fault is served the same way, but on a poisoned page a kernel access fails
with EFAULT instead of killing the process, so the client can still ask
stats(); then it touches the page itself and must die with SIGBUS.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import uffd_pager
from uffd_pager import Key

from encryption_children import flip_bit, page_data, read_catalog_meta, read_catalog_rows, write_catalog_row

PAGE = uffd_pager.PAGE_SIZE
POLICIES = ("on-write", "at-fork", "on-access")
CATALOG_SUFFIX = ".uffd-catalog"
ZERO_PAGE_HASH = hashlib.sha256(bytes(PAGE)).hexdigest()

_CONSOLE_SCRIPT = Path(sys.executable).with_name("uffd-pager")
KEYGEN = [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "uffd_pager"]


# The page contents (page_data), the same in this process and in every child, and
# the catalog read and altered the way a store's owner (or an attacker) could: a
# header, then one 80-byte record of two slots per page (uffd_pager.catalog).
# Both live in tests/encryption_children.py, beside the children that use them.


def url(path: Path | str) -> str:
    return f"file://{path}"


def digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def view_of(kind: str, n: int, salt: str, overlays: dict[str, list[int]]) -> list[bytes]:
    """Pages of tag "A", with the pages listed under each other tag replaced."""
    pages = [page_data(kind, "A", p, salt) for p in range(n)]
    for tag, which in overlays.items():
        for p in which:
            pages[p] = page_data(kind, tag, p, salt)
    return pages


# --- keys, stores and catalogs ----------------------------------------------------------------


def write_key(path: Path, key: Key) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.to_text().encode())
    finally:
        os.close(fd)
    return path


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own pager state directory (where the stores' anchors
    live), for this process and every pager it starts: they inherit the
    environment."""
    path = tmp_path / "state"
    monkeypatch.setenv("UFFD_PAGER_STATE_DIR", str(path))
    return path


@pytest.fixture
def key() -> Key:
    return Key.generate()


@pytest.fixture
def key_file(tmp_path: Path, key: Key) -> Path:
    """The key, in a file of mode 0600 outside the data directory (tmp_path)."""
    return write_key(tmp_path / "keys" / "main.key", key)


def new_store(tmp_path: Path, name: str = "store.bin") -> Path:
    path = tmp_path / name
    path.touch()
    return path


def catalog_path(store: Path) -> Path:
    return Path(str(store) + CATALOG_SUFFIX)


def catalog_rows(store: Path) -> dict[int, tuple[int, bytes, bytes]]:
    return read_catalog_rows(str(catalog_path(store)))


def catalog_meta(store: Path) -> dict[str, Any]:
    return read_catalog_meta(str(catalog_path(store)))


def set_catalog_row(store: Path, page: int, version: int, nonce: bytes, tag: bytes) -> None:
    write_catalog_row(str(catalog_path(store)), page, version, nonce, tag)


def raw_page(store: Path, page: int) -> bytes:
    with open(store, "rb") as f:
        f.seek(page * PAGE)
        return f.read(PAGE)


def put_raw_page(store: Path, page: int, data: bytes) -> None:
    assert len(data) == PAGE
    with open(store, "r+b") as f:
        f.seek(page * PAGE)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_encrypted(pager: uffd_pager.Pager, store: Path, size: int, pages: dict[int, bytes], *,
                    key: Key | None = None, key_file: Path | None = None) -> dict[int, bytes]:
    """Maps the store encrypted, writes pages that were never written before
    (they read as zero: safe in this process), flushes and closes."""
    region = pager.map(url(store), size, key=key, key_file=key_file, writeback_interval=0)
    try:
        view = region.view()
        for p, data in pages.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        del view
        assert region.flush()["pages"] == len(pages)
    finally:
        region.close()
    return pages


# --- a client in a subprocess ------------------------------------------------------------------

# The child processes, one function each (run as
# `python encryption_children.py NAME CFG_JSON`); "client" maps a store
# with key_file, probes, reads and touches pages, and reports.
CHILDREN_PY = Path(__file__).with_name("encryption_children.py")


def run_script(name: str, cfg: dict[str, Any], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the child `name` of tests/encryption_children.py with cfg."""
    return subprocess.run([sys.executable, str(CHILDREN_PY), name, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def lines_of(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"status {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def client(store_url: str, size: int, key_file: Path, *, read: list[int] | range = (), probe: list[int] = (),
           touch: int | None = None, offset: int = 0, sock: str | None = None,
           timeout: float = 60) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Runs the "client" child; returns its report and the finished process."""
    cfg = {"url": store_url, "size": size, "offset": offset, "key_file": str(key_file), "read": list(read),
           "probe": list(probe), "touch": touch, "socket": sock}
    result = run_script("client", cfg, timeout=timeout)
    reports = lines_of(result)
    assert reports and "hashes" in reports[0], f"the client did not report:\n{describe(result)}"
    return reports[0], result


def assert_pages(report: dict[str, Any], expected: dict[int, bytes]) -> None:
    wrong = [p for p, data in expected.items() if report["hashes"].get(str(p)) != digest(data)]
    assert not wrong, f"pages {wrong} do not read as written"


def assert_sigbus(store_url: str, size: int, key_file: Path, bad: int, good: dict[int, bytes], *,
                  sock: str | None = None) -> dict[str, Any]:
    """The bad page is never handed out (the kernel's read of it fails, the
    pager counts an authentication failure and a poisoned page), every good
    page reads as written, and the client's own access dies with SIGBUS."""
    report, result = client(store_url, size, key_file, probe=[bad], read=sorted(good), touch=bad, sock=sock)
    assert report["probes"][str(bad)] == "EFAULT", \
        f"page {bad} was not poisoned: the kernel's read of it gave {report['probes'][str(bad)]}"
    assert_pages(report, good)
    stats = report["stats"]
    assert stats["encrypted"] is True
    assert stats["auth_failures"] >= 1, f"no authentication failure counted: {stats}"
    assert stats["poisoned"] >= 1, f"no poisoned page counted: {stats}"
    assert result.returncode == -signal.SIGBUS, \
        f"touching page {bad} did not die with SIGBUS:\n{describe(result)}"
    return report


# --- 1. keygen -------------------------------------------------------------------------------------


def _keygen_out(path: Path) -> None:
    subprocess.run([*KEYGEN, "keygen", "--out", str(path)], check=True, timeout=30, umask=0o022,
                   stdin=subprocess.DEVNULL)


def _keygen_redirect(path: Path) -> None:
    command = " ".join(f"'{word}'" for word in KEYGEN)
    subprocess.run(["sh", "-c", f'umask 022; {command} keygen > "$1"', "sh", str(path)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL)


def _keygen_redirect_existing(path: Path) -> None:
    path.write_text("not a key yet\n")
    path.chmod(0o644)
    _keygen_redirect(path)


@pytest.mark.timeout(60)
def test_keygen_writes_distinct_private_keys(tmp_path: Path, pager: uffd_pager.Pager) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    texts, key_ids = [], []
    for i, make in enumerate([_keygen_out, _keygen_out, _keygen_redirect, _keygen_redirect,
                              _keygen_redirect_existing]):
        path = keys_dir / f"{i}-{make.__name__.strip('_')}.key"
        make(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600, f"{make.__name__}: the key file has mode {mode:o}, not 600"
        text = path.read_text()
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), \
            f"{make.__name__}: not one line of text: {text!r}"
        key = Key.from_file(path)
        assert len(key.secret_bytes()) == 32, "not a 256-bit key"
        texts.append(text)
        key_ids.append(key.key_id)
    assert len(set(texts)) == len(texts) and len(set(key_ids)) == len(key_ids), "keygen wrote the same key twice"

    # A key file from keygen turns encryption on; its key is the one the catalog names.
    store = new_store(tmp_path)
    keyfile = keys_dir / "0-keygen_out.key"
    data = page_data("random", "A", 0, "keygen")
    write_encrypted(pager, store, 2 * PAGE, {0: data}, key_file=keyfile)
    assert catalog_meta(store)["key_id"] == Key.from_file(keyfile).key_id
    assert data[:64] not in store.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_a_key_file_readable_by_others_is_refused(tmp_path: Path, pager: uffd_pager.Pager, key_file: Path,
                                                  mode: int, this_process) -> None:
    key_file.chmod(mode)
    with pytest.raises(PermissionError):
        Key.from_file(key_file)
    store = new_store(tmp_path)
    before = this_process.uffd_fds()
    with pytest.raises(PermissionError, match="chmod"):
        pager.map(url(store), 4 * PAGE, key_file=key_file)
    assert this_process.uffd_fds() == before, "a userfaultfd was left behind"
    assert pager.status()["regions"] == 0
    assert not catalog_path(store).exists(), "the refused key made a catalog"


# --- pages never written under the key ----------------------------------------------------


@pytest.mark.timeout(60)
def test_pages_never_written_under_the_key_read_as_zero(random_file, pager: uffd_pager.Pager, key: Key,
                                                        key_file: Path) -> None:
    n = 8
    store = random_file(n * PAGE)  # plaintext that was never encrypted under the key
    report, result = client(url(store), (n + 2) * PAGE, key_file, read=range(n + 2))
    assert result.returncode == 0, describe(result)
    assert report["hashes"] == {str(p): ZERO_PAGE_HASH for p in range(n + 2)}
    assert report["stats"]["auth_failures"] == 0 and report["stats"]["poisoned"] == 0

    data = page_data("random", "A", 3, "zero")
    write_encrypted(pager, store, (n + 2) * PAGE, {3: data}, key=key)
    report, result = client(url(store), (n + 2) * PAGE, key_file, read=range(n + 2))
    assert result.returncode == 0, describe(result)
    assert_pages(report, {p: (data if p == 3 else bytes(PAGE)) for p in range(n + 2)})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("by", ["close", "timer"])
def test_write_back_by_close_and_by_the_timer_is_encrypted(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                          key_file: Path, by: str) -> None:
    store = new_store(tmp_path)
    n = 6
    pages = {p: page_data("ascii" if p % 2 else "random", "W", p, by) for p in range(n)}
    region = pager.map(url(store), n * PAGE, key=key, writeback_interval=0.2 if by == "timer" else 0)
    try:
        view = region.view()
        for p, data in pages.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        del view
        if by == "timer":
            deadline = time.monotonic() + 15
            while region.stats()["pages_written"] < n:
                assert time.monotonic() < deadline, f"the timer wrote nothing back: {region.stats()}"
                time.sleep(0.05)
            assert sorted(catalog_rows(store)) == list(range(n)), "the timed write-back left no catalog records"
    finally:
        region.close()
    assert sorted(catalog_rows(store)) == list(range(n))
    raw = store.read_bytes()
    assert len(raw) == n * PAGE
    assert not plaintext_found(store, plaintext_chunks(list(pages.values()))), "plaintext in the store"
    report, result = client(url(store), n * PAGE, key_file, read=range(n))
    assert result.returncode == 0, describe(result)
    assert_pages(report, pages)


@pytest.mark.timeout(60)
def test_pages_are_bound_to_their_absolute_place_in_the_store(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                             key_file: Path) -> None:
    """A region at offset 3 pages: its pages are store pages 3 and 4 (in the
    catalog and in the file), and read the same through a region at offset 0."""
    store = new_store(tmp_path)
    pages = {0: page_data("random", "O", 0, "offset"), 1: page_data("random", "O", 1, "offset")}
    region = pager.map(url(store), 2 * PAGE, offset=3 * PAGE, key=key, writeback_interval=0)
    try:
        view = region.view()
        for p, data in pages.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        del view
        assert region.flush()["pages"] == 2
    finally:
        region.close()
    assert sorted(catalog_rows(store)) == [3, 4]
    assert store.stat().st_size == 5 * PAGE
    report, result = client(url(store), 6 * PAGE, key_file, read=range(6))
    assert result.returncode == 0, describe(result)
    assert_pages(report, {0: bytes(PAGE), 1: bytes(PAGE), 2: bytes(PAGE), 3: pages[0], 4: pages[1], 5: bytes(PAGE)})
    report, result = client(url(store), 2 * PAGE, key_file, offset=3 * PAGE, read=range(2))
    assert result.returncode == 0, describe(result)
    assert_pages(report, pages)


# --- 2. only ciphertext in the backing files ----------------------------------------------------

# The "fork" child: the parent writes A everywhere, flushes, forks; the child
# writes B to its pages (flushing first or last per "order"); the parent writes
# C to its pages and flushes. Prints one JSON line: the child's report and the
# parent's.

N_FORK = 16
CHILD_PAGES = [1, 2, 5, 6, 9, 15]
PARENT_PAGES = [2, 3, 6, 7, 10, 14]  # 2 and 6 are written by both


def run_fork_scenario(tmp_path: Path, key_file: Path, *, kind: str = "random", policy: str = "on-write",
                      order: str = "child-first", children: Path | None = None, keep: bool = True,
                      tracking: str = "async", salt: str = "") -> dict[str, Any]:
    store = tmp_path / "store.bin"
    if not store.exists():
        store.touch()
    if children is not None and not children.exists():
        children.touch()
    cfg = {"url": url(store), "size": N_FORK * PAGE, "policy": policy, "order": order, "kind": kind,
           "salt": salt or os.urandom(8).hex(), "children": url(children) if children is not None else None,
           "keep": keep, "key_file": str(key_file), "child_pages": CHILD_PAGES, "parent_pages": PARENT_PAGES,
           "tracking": tracking}
    result = run_script("fork", cfg, timeout=60)
    reports = lines_of(result)
    assert result.returncode == 0 and reports, f"the fork scenario failed:\n{describe(result)}"
    out = reports[-1]
    assert "child_error" not in out, f"the forked child failed:\n{out.get('child_error')}"
    assert out["child_status"] == 0, f"the forked child exited with {out['child_status']}"
    out["cfg"] = cfg
    out["store"] = store
    return out


def plaintext_chunks(pages: list[bytes]) -> set[bytes]:
    """Every 16-byte-aligned chunk of the plaintext pages (all-zero chunks
    excepted: a hole in a sparse file is zeros too)."""
    return {page[i:i + 16] for page in pages for i in range(0, PAGE, 16) if any(page[i:i + 16])}


def plaintext_found(path: Path, chunks: set[bytes]) -> list[int]:
    """Offsets (any alignment) where a 16-byte run of the plaintext appears in the file."""
    data = path.read_bytes()
    return [i for i in range(len(data) - 15) if data[i:i + 16] in chunks][:10]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second_file", [False, True], ids=["children-in-store", "children-in-second-file"])
@pytest.mark.parametrize("kind", ["random", "counter", "ascii"])
def test_backing_files_hold_no_plaintext(tmp_path: Path, key_file: Path, kind: str, second_file: bool) -> None:
    children = tmp_path / "second.bin" if second_file else None
    out = run_fork_scenario(tmp_path, key_file, kind=kind, children=children)
    salt = out["cfg"]["salt"]
    a = [page_data(kind, "A", p, salt) for p in range(N_FORK)]
    b = [page_data(kind, "B", p, salt) for p in CHILD_PAGES]
    c = [page_data(kind, "C", p, salt) for p in PARENT_PAGES]
    # The scenario did what it should (else the scan below proves nothing).
    assert out["parent"]["view"] == [digest(p) for p in view_of(kind, N_FORK, salt, {"C": PARENT_PAGES})]
    assert out["child"]["view"] == [digest(p) for p in view_of(kind, N_FORK, salt, {"B": CHILD_PAGES})]
    assert out["child"]["fork"]["pages_still_inherited"] == 0

    chunks = plaintext_chunks(a + b + c)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    names = {p.name for p in files}
    assert {"store.bin", "store.bin" + CATALOG_SUFFIX} <= names, names
    if second_file:
        assert {"second.bin", "second.bin" + CATALOG_SUFFIX} <= names, names
    for path in files:
        hits = plaintext_found(path, chunks)
        assert not hits, f"plaintext of the region appears in {path.name} at offsets {hits}"

    # Ciphertext at each page's usual place and nothing else: the files are
    # exactly as long as the portions in them.
    child_offset = out["child"]["offset"]
    size = N_FORK * PAGE
    store = out["store"]
    if second_file:
        assert out["child"]["url"] == url(children)
        assert store.stat().st_size == size
        assert children.stat().st_size == child_offset + size
    else:
        assert store.stat().st_size == child_offset + size
    # Identical plaintext pages (every "ascii" page of a tag) still give distinct ciphertexts.
    raw = [raw_page(store, p) for p in range(N_FORK)]
    assert len(set(raw)) == N_FORK, "two pages have the same ciphertext"


# --- 3-5. a store that flips bits, swaps pages or replays old ones -----------------------------

N_TAMPER = 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["ciphertext-first-byte", "ciphertext-middle", "ciphertext-last-byte",
                                    "catalog-tag", "catalog-nonce", "catalog-version"])
def test_a_flipped_bit_kills_only_the_access_to_that_page(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                         key_file: Path, target: str) -> None:
    store = new_store(tmp_path)
    size = N_TAMPER * PAGE
    pages = write_encrypted(pager, store, size, {p: page_data("random", "A", p, target) for p in range(N_TAMPER)},
                            key=key)
    bad = 5
    if target.startswith("ciphertext"):
        at = {"ciphertext-first-byte": 0, "ciphertext-middle": 2049, "ciphertext-last-byte": PAGE - 1}[target]
        put_raw_page(store, bad, flip_bit(raw_page(store, bad), at, bit=3))
    else:
        version, nonce, tag = catalog_rows(store)[bad]
        if target == "catalog-tag":
            tag = flip_bit(tag, 7)
        elif target == "catalog-nonce":
            nonce = flip_bit(nonce, len(nonce) - 1)
        else:
            version += 1
        set_catalog_row(store, bad, version, nonce, tag)
    good = {p: d for p, d in pages.items() if p != bad}
    assert_sigbus(url(store), size, key_file, bad, good)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_catalog_rows", [False, True], ids=["ciphertexts", "ciphertexts-and-catalog-rows"])
def test_two_swapped_pages_both_kill_the_access(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                key_file: Path, with_catalog_rows: bool) -> None:
    """With the catalog rows swapped too, each ciphertext still matches its
    nonce and tag: only its binding to its page position catches the swap."""
    store = new_store(tmp_path)
    size = N_TAMPER * PAGE
    pages = write_encrypted(pager, store, size, {p: page_data("random", "A", p, "swap") for p in range(N_TAMPER)},
                            key=key)
    i, j = 2, 9
    raw_i, raw_j = raw_page(store, i), raw_page(store, j)
    put_raw_page(store, i, raw_j)
    put_raw_page(store, j, raw_i)
    if with_catalog_rows:
        rows = catalog_rows(store)
        set_catalog_row(store, i, *rows[j])
        set_catalog_row(store, j, *rows[i])
    good = {p: d for p, d in pages.items() if p not in (i, j)}
    for bad in (i, j):
        assert_sigbus(url(store), size, key_file, bad, good)


@pytest.mark.timeout(60)
def test_a_page_moved_between_stores_under_one_key_kills_the_access(tmp_path: Path, pager: uffd_pager.Pager,
                                                                     key: Key, key_file: Path) -> None:
    """Ciphertext and catalog row copied from the same page of another store
    under the same key: only the binding to the store's id catches it."""
    size = 4 * PAGE
    first, second = new_store(tmp_path, "first.bin"), new_store(tmp_path, "second.bin")
    write_encrypted(pager, first, size, {p: page_data("random", "F", p, "move") for p in range(4)}, key=key)
    pages = write_encrypted(pager, second, size, {p: page_data("random", "S", p, "move") for p in range(4)}, key=key)
    assert catalog_meta(first)["store_id"] != catalog_meta(second)["store_id"]
    bad = 1
    put_raw_page(second, bad, raw_page(first, bad))
    set_catalog_row(second, bad, *catalog_rows(first)[bad])
    assert_sigbus(url(second), size, key_file, bad, {p: d for p, d in pages.items() if p != bad})


@pytest.mark.timeout(60)
def test_an_old_ciphertext_put_back_kills_the_access(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                     key_file: Path) -> None:
    store = new_store(tmp_path)
    size = N_TAMPER * PAGE
    first = {p: page_data("random", "A", p, "replay") for p in range(N_TAMPER)}
    region = pager.map(url(store), size, key=key, writeback_interval=0)
    try:
        view = region.view()
        for p, data in first.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        assert region.flush()["pages"] == N_TAMPER
        bad = 4
        old = raw_page(store, bad)
        old_version = catalog_rows(store)[bad][0]
        second = {bad: page_data("random", "B", bad, "replay"), 7: page_data("random", "B", 7, "replay")}
        for p, data in second.items():
            view[p * PAGE:(p + 1) * PAGE] = data
        del view
        assert region.flush()["pages"] == len(second)
    finally:
        region.close()
    assert catalog_rows(store)[bad][0] > old_version, "a rewritten page kept its version"
    assert raw_page(store, bad) != old
    put_raw_page(store, bad, old)
    now = {**first, **second}
    assert_sigbus(url(store), size, key_file, bad, {p: d for p, d in now.items() if p != bad})


# --- 6. the wrong key --------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["key", "key_file"])
def test_the_wrong_key_is_refused_at_map(tmp_path: Path, pager: uffd_pager.Pager, key: Key, key_file: Path,
                                         how: str, this_process) -> None:
    store = new_store(tmp_path)
    size = 6 * PAGE
    pages = write_encrypted(pager, store, size, {p: page_data("random", "A", p, "wrong") for p in range(6)}, key=key)
    catalog_before = catalog_path(store).read_bytes()
    wrong = Key.generate()
    wrong_file = write_key(tmp_path / "keys" / "wrong.key", wrong)
    fds, regions = this_process.uffd_fds(), pager.status()["regions"]
    with pytest.raises(PermissionError) as info:
        if how == "key":
            pager.map(url(store), size, key=wrong, writeback_interval=0)
        else:
            pager.map(url(store), size, key_file=wrong_file, writeback_interval=0)
    assert "wrong key" in str(info.value), f"not a clear message: {info.value}"
    assert wrong.secret_bytes().hex() not in str(info.value) and key.secret_bytes().hex() not in str(info.value)
    assert this_process.uffd_fds() == fds, "a userfaultfd was left in this process"
    assert pager.status()["regions"] == regions, "a region was registered in the pager"
    # Nothing changed: the store is still under the right key and reads as written.
    assert catalog_path(store).read_bytes() == catalog_before
    assert catalog_meta(store)["key_id"] == key.key_id
    report, result = client(url(store), size, key_file, read=range(6))
    assert result.returncode == 0, describe(result)
    assert_pages(report, pages)


# --- 7. nonces never repeat ------------------------------------------------------------------------

# The "nonce" child: `restarts` times a new Pager, map the store with the key,
# check every page reads as last written, then `flushes` times: rewrite some
# pages (page 0 always, with unchanged bytes on odd restarts), flush, print the
# catalog rows.


@pytest.mark.timeout(90)
def test_no_nonce_repeats_across_pager_restarts(tmp_path: Path, key_file: Path) -> None:
    store = new_store(tmp_path)
    restarts, flushes, n = 20, 3, 10
    cfg = {"url": url(store), "size": n * PAGE, "key_file": str(key_file), "catalog": str(catalog_path(store)),
           "restarts": restarts, "flushes": flushes, "salt": os.urandom(8).hex()}
    result = run_script("nonce", cfg, timeout=80)
    assert result.returncode == 0, describe(result)
    reports = lines_of(result)
    assert len(reports) == restarts * (flushes + 1), describe(result)

    last: dict[int, tuple[int, str, str]] = {}
    nonces: list[str] = []  # the nonce of every (page, version) the catalog ever held
    for report in reports:
        if "wrong_at_start" in report:
            assert report["wrong_at_start"] == [], \
                f"restart {report['restart']}: pages {report['wrong_at_start']} do not read as last written"
            continue
        where = f"restart {report['restart']} flush {report['flush']}"
        written = report["written"]
        assert report["flushed"] == len(written), f"{where}: flushed {report['flushed']} pages, wrote {written}"
        rows = {int(p): tuple(row) for p, row in report["rows"].items()}
        for p in written:
            version, nonce, _tag = rows[p]
            previous = last.get(p)
            assert version >= 1 and (previous is None or version > previous[0]), \
                f"{where}: rewritten page {p} has version {version}, before {previous and previous[0]}"
            assert previous is None or nonce != previous[1], f"{where}: page {p} was rewritten under its old nonce"
            nonces.append(nonce)
        for p, row in last.items():
            if p not in written:
                assert rows[p] == row, f"{where}: page {p} was not rewritten but its catalog row changed"
        assert set(rows) == set(last) | set(written)
        last.update({p: rows[p] for p in written})
    repeated = {nonce for nonce in nonces if nonces.count(nonce) > 1}
    assert not repeated, f"nonces used more than once: {sorted(repeated)[:5]}"
    assert len(nonces) >= restarts * flushes


@pytest.mark.timeout(60)
def test_two_pagers_on_one_encrypted_store_never_share_a_nonce(tmp_path: Path, key: Key) -> None:
    """Two processes may each map the same file with their own private
    pager. Under one key they must not both use a nonce; refusing the second
    map is fine too."""
    store = new_store(tmp_path)
    size = 8 * PAGE
    with uffd_pager.Pager() as first, uffd_pager.Pager() as second:
        one = first.map(url(store), size, key=key, writeback_interval=0)
        try:
            try:
                two = second.map(url(store), size, key=key, writeback_interval=0)
            except OSError:
                return  # refused while the other pager has it: no nonce can be shared
            try:
                nonces = []
                for region, pages, tag in ((one, range(0, 4), "one"), (two, range(4, 8), "two")):
                    view = region.view()
                    for p in pages:
                        view[p * PAGE:(p + 1) * PAGE] = page_data("random", tag, p, "two-pagers")
                    del view
                    assert region.flush()["pages"] == 4
                    rows = catalog_rows(store)
                    nonces += [rows[p][1] for p in pages]
            finally:
                two.close()
        finally:
            one.close()
    repeated = sorted({n.hex() for n in nonces if nonces.count(n) > 1})
    assert not repeated, f"two pagers of one store encrypted pages under the same nonces: {repeated}"


# The "two-pagers" child: two private pagers with the same store open: the
# first writes pages, the second maps the store, the first rewrites pages 0 and
# 1; then the second's region reads every page. Pages are read only through the
# kernel (os.write into a pipe): a page that fails authentication shows as
# "EFAULT", it never kills the child.


@pytest.mark.timeout(60)
def test_a_second_pager_of_the_store_reads_the_first_pagers_rewrites(tmp_path: Path, key_file: Path) -> None:
    """Not a tampered store: pages rewritten through another pager that has
    the store open authenticate, and read as rewritten."""
    store = new_store(tmp_path)
    n = 4
    cfg = {"url": url(store), "size": n * PAGE, "key_file": str(key_file), "salt": os.urandom(8).hex()}
    result = run_script("two-pagers", cfg, timeout=60)
    reports = lines_of(result)
    assert result.returncode == 0 and reports, describe(result)
    expected = [digest(page_data("random", "new" if p < 2 else "old", p, cfg["salt"])) for p in range(n)]
    assert reports[0]["seen"] == expected, \
        f"the second pager's region does not read the pages as last written: {reports[0]['seen']}"
    assert reports[0]["auth_failures"] == 0


# --- 8. the key is written nowhere --------------------------------------------------------------


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the daemon exited with status {process.returncode}"
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(str(path))
                    return
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
        assert time.monotonic() < deadline, f"the daemon is not listening on {path} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def logging_daemon(socket_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """A `--log-level DEBUG serve` daemon whose stdout and stderr go to a log
    file (outside the data directory); yields (socket path, log path, process)."""
    sock = socket_dir / "pager.sock"
    log_path = tmp_path / "keys" / "daemon.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uffd_pager", "--log-level", "DEBUG", "serve", "--socket", str(sock)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")
    try:
        _wait_for_socket(sock, process)
        yield str(sock), log_path, process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def key_forms(key: Key) -> list[bytes]:
    hexed = key.secret_bytes().hex()
    return [bytes.fromhex(hexed), hexed.lower().encode(), hexed.upper().encode()]


@pytest.mark.timeout(60)
def test_the_key_appears_in_no_file_and_no_log(tmp_path: Path, socket_dir: Path, key: Key, key_file: Path,
                                               state_dir: Path, logging_daemon: tuple[str, Path, Any]) -> None:
    sock, log_path, daemon = logging_daemon
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = new_store(data_dir)
    size = 8 * PAGE
    pages = {p: page_data("random", "A", p, "leak") for p in range(8)}
    wrong = Key.generate()
    pager = uffd_pager.connect(sock)
    try:
        write_encrypted(pager, store, size, pages, key=key)
        with pytest.raises(PermissionError):
            pager.map(url(store), size, key=wrong)
        # An authentication failure, in a client of the same daemon.
        bad = 6
        put_raw_page(store, bad, flip_bit(raw_page(store, bad), 100))
        assert_sigbus(url(store), size, key_file, bad, {p: d for p, d in pages.items() if p != bad}, sock=sock)
        # Another region written and closed after the failure.
        other = new_store(data_dir, "other.bin")
        write_encrypted(pager, other, size, {0: page_data("random", "O", 0, "leak")}, key=key)
    finally:
        pager.close()
    # Stop the daemon so that everything it logs is in the file.
    daemon.terminate()
    assert daemon.wait(timeout=10) == 0, "the daemon did not stop cleanly on SIGTERM"

    log = log_path.read_bytes()
    assert b"authentication" in log, f"the authentication failure was not logged:\n{log.decode(errors='replace')}"
    for form in key_forms(key) + key_forms(wrong):
        assert form not in log, "a key appears in the daemon's log"
    files = [p for p in data_dir.rglob("*") if p.is_file()] + [p for p in socket_dir.iterdir() if p.is_file()]
    files += [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith(CATALOG_SUFFIX) for p in files)
    assert any(p.name.endswith(".anchor") for p in files)
    for path in files:
        content = path.read_bytes()
        for form in key_forms(key) + key_forms(wrong):
            assert form not in content, f"the key appears in {path}"


# --- 9-10. encrypted regions and fork --------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", ["async", "sync"])
@pytest.mark.parametrize("order", ["child-first", "parent-first"])
@pytest.mark.parametrize("policy", POLICIES)
def test_encrypted_fork_portions_reproduce_each_view(tmp_path: Path, key_file: Path, policy: str,
                                                     order: str, tracking: str) -> None:
    out = run_fork_scenario(tmp_path, key_file, policy=policy, order=order, tracking=tracking)
    salt = out["cfg"]["salt"]
    size = N_FORK * PAGE
    a = view_of("random", N_FORK, salt, {})
    child_view = view_of("random", N_FORK, salt, {"B": CHILD_PAGES})
    parent_view = view_of("random", N_FORK, salt, {"C": PARENT_PAGES})
    child, parent = out["child"], out["parent"]
    assert child["at_fork"] == [digest(p) for p in a], "the child does not see the data as of the fork"
    assert child["view"] == [digest(p) for p in child_view], "the child's view is not A with its own writes"
    assert parent["view"] == [digest(p) for p in parent_view], "the parent's view is not A with its own writes"
    assert child["fork"]["policy"] == policy and child["fork"]["pages_still_inherited"] == 0
    assert child["auth_failures"] == parent["auth_failures"] == 0
    assert (parent["url"], parent["offset"]) == (url(out["store"]), 0)
    assert child["url"] == url(out["store"]) and child["offset"] >= size and child["offset"] % PAGE == 0

    for (where, offset), view in (((parent["url"], parent["offset"]), parent_view),
                                  ((child["url"], child["offset"]), child_view)):
        report, result = client(where, size, key_file, offset=offset, read=range(N_FORK))
        assert result.returncode == 0, describe(result)
        assert_pages(report, dict(enumerate(view)))
        assert report["stats"]["auth_failures"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", POLICIES)
def test_encrypted_children_portions_in_a_second_file(tmp_path: Path, key_file: Path, policy: str) -> None:
    second = tmp_path / "second.bin"
    out = run_fork_scenario(tmp_path, key_file, policy=policy, children=second)
    salt = out["cfg"]["salt"]
    size = N_FORK * PAGE
    child_view = view_of("random", N_FORK, salt, {"B": CHILD_PAGES})
    parent_view = view_of("random", N_FORK, salt, {"C": PARENT_PAGES})
    child, parent = out["child"], out["parent"]
    assert child["view"] == [digest(p) for p in child_view]
    assert parent["view"] == [digest(p) for p in parent_view]
    assert child["url"] == url(second), f"the child's portion is in {child['url']}, not the second file"
    assert (parent["url"], parent["offset"]) == (url(out["store"]), 0)

    # The child's portion is all in the second file, encrypted, with its own catalog.
    first_pages = sorted(catalog_rows(out["store"]))
    assert first_pages == list(range(N_FORK)), f"the first store's catalog holds pages {first_pages}"
    child_first = child["offset"] // PAGE
    assert sorted(catalog_rows(second)) == list(range(child_first, child_first + N_FORK))
    raw = second.read_bytes()[child["offset"]:child["offset"] + size]
    assert len(raw) == size
    assert not any(page in raw for page in child_view), "plaintext in the second file"

    report, result = client(child["url"], size, key_file, offset=child["offset"], read=range(N_FORK))
    assert result.returncode == 0, describe(result)
    assert_pages(report, dict(enumerate(child_view)))
    report, result = client(parent["url"], size, key_file, read=range(N_FORK))
    assert result.returncode == 0, describe(result)
    assert_pages(report, dict(enumerate(parent_view)))


# --- 11. no nonce repeats under one key, whatever is done to the files ----------------------------


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """What an attacker who can copy the files keeps."""
    return {path: path.read_bytes() for path in paths}


def restore(saved: dict[Path, bytes]) -> None:
    for path, data in saved.items():
        path.write_bytes(data)


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


@pytest.mark.timeout(60)
def test_two_stores_under_one_key_share_no_nonce_and_no_keystream(tmp_path: Path, pager: uffd_pager.Pager,
                                                                  key: Key) -> None:
    """Under GCM, one nonce used twice under one key gives the XOR of the
    two plaintexts away (and lets the attacker forge tags)."""
    n = 16
    first, second = new_store(tmp_path, "first.bin"), new_store(tmp_path, "second.bin")
    a = write_encrypted(pager, first, n * PAGE, {p: page_data("random", "A", p, "two") for p in range(n)}, key=key)
    b = write_encrypted(pager, second, n * PAGE, {p: page_data("random", "B", p, "two") for p in range(n)}, key=key)
    nonces_a = {row[1] for row in catalog_rows(first).values()}
    nonces_b = {row[1] for row in catalog_rows(second).values()}
    shared = nonces_a & nonces_b
    assert not shared, f"{len(shared)} of {n} nonces are used by both stores under one key"
    leaks = [p for p in range(n) if xor(raw_page(first, p), raw_page(second, p)) == xor(a[p], b[p])]
    assert not leaks, f"pages {leaks}: ciphertext A XOR B is plaintext A XOR B (one keystream)"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("attack", ["store-and-catalog-restored", "catalog-counter-set-back"])
def test_nonces_never_repeat_after_the_files_are_rolled_back(tmp_path: Path, key: Key, key_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    """The pager's own state directory refuses a rolled-back store (see
    below); even a pager with a fresh state directory, which must trust the
    files as it finds them, uses no nonce twice."""
    store = new_store(tmp_path)
    n = 8
    nonces: list[bytes] = []

    def flush_round(tag: str) -> None:
        with uffd_pager.Pager() as pager:
            write_encrypted(pager, store, n * PAGE, {p: page_data("random", tag, p, attack) for p in range(n)},
                            key=key)
        nonces.extend(row[1] for row in catalog_rows(store).values())

    flush_round("one")
    saved = snapshot(store, catalog_path(store))
    flush_round("two")
    if attack == "store-and-catalog-restored":
        restore(saved)
    else:
        counter = (8 + 16 + 16, 8)  # where a nonce counter (or version) would sit in the header
        header = bytearray(catalog_path(store).read_bytes()[:4096])
        header[counter[0]:sum(counter)] = (1).to_bytes(8, "little")
        with open(catalog_path(store), "r+b") as f:
            f.write(header)
    monkeypatch.setenv("UFFD_PAGER_STATE_DIR", str(tmp_path / "fresh-state"))
    try:
        flush_round("three")
    except OSError as exc:  # a damaged header is refused: no nonce used at all
        assert attack == "catalog-counter-set-back" and "damaged" in str(exc), exc
    repeated = {nonce.hex() for nonce in nonces if nonces.count(nonce) > 1}
    assert not repeated, f"{len(repeated)} nonces were used twice under one key: {sorted(repeated)[:3]}"


# --- 12. rollback: the anchor in the state directory -----------------------------------------------


def forge_catalog_generation(store: Path, generation: int) -> None:
    """Rewrites the version in the catalog's header as an attacker could:
    with its checksum, but without the key (so without its MAC)."""
    from uffd_pager import catalog
    path = catalog_path(store)
    header = path.read_bytes()[:catalog.HEADER.size]
    magic, key_id, store_id, _generation, mac, _checksum = catalog.HEADER.unpack(header)
    fields = catalog.HEADER.pack(magic, key_id, store_id, generation, mac, bytes(16))[:-16]
    with open(path, "r+b") as f:
        f.write(fields + catalog._checksum(fields))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("header", ["as-restored", "given-the-latest-version"])
def test_a_store_restored_with_its_catalog_is_refused_at_map(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                             this_process, header: str) -> None:
    store = new_store(tmp_path)
    n = 6
    write_encrypted(pager, store, n * PAGE, {p: page_data("random", "old", p, "restore") for p in range(n)}, key=key)
    saved = snapshot(store, catalog_path(store))
    write_encrypted(pager, store, n * PAGE, {p: page_data("random", "new", p, "restore") for p in range(n)}, key=key)
    latest = catalog_meta(store)["generation"]
    restore(saved)
    if header == "given-the-latest-version":
        forge_catalog_generation(store, latest)
        saved = snapshot(store, catalog_path(store))
    fds, regions = this_process.uffd_fds(), pager.status()["regions"]
    with pytest.raises(OSError) as info:
        pager.map(url(store), n * PAGE, key=key, writeback_interval=0)
    message = str(info.value)
    if header == "as-restored":
        assert isinstance(info.value, PermissionError) and "rolled back" in message, f"not a clear message: {message}"
    else:
        assert "altered" in message, f"not a clear message: {message}"
    assert str(store) in message
    assert this_process.uffd_fds() == fds and pager.status()["regions"] == regions
    assert snapshot(store, catalog_path(store)) == saved, "the refused map changed the files"


@pytest.mark.timeout(60)
def test_one_page_rolled_back_with_its_record_kills_the_access(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                               key_file: Path) -> None:
    """An old ciphertext put back together with its old catalog record
    authenticates on its own: only the anchor knows it is not the latest."""
    from uffd_pager.catalog import HEADER_BYTES
    from uffd_pager.crypto import RECORD_BYTES
    store = new_store(tmp_path)
    n = 8
    bad = 3
    first = write_encrypted(pager, store, n * PAGE, {p: page_data("random", "old", p, "page") for p in range(n)},
                            key=key)
    at = HEADER_BYTES + bad * RECORD_BYTES
    old_record = catalog_path(store).read_bytes()[at:at + RECORD_BYTES]
    old_page = raw_page(store, bad)
    second = write_encrypted(pager, store, n * PAGE, {bad: page_data("random", "new", bad, "page"),
                                                      5: page_data("random", "new", 5, "page")}, key=key)
    put_raw_page(store, bad, old_page)
    with open(catalog_path(store), "r+b") as f:
        f.seek(at)
        f.write(old_record)
    now = {**first, **second}
    report = assert_sigbus(url(store), n * PAGE, key_file, bad, {p: d for p, d in now.items() if p != bad})
    assert report["probes"][str(bad)] == "EFAULT"


# --- 13. a missing catalog, a missing record, a store mapped without its key ---------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["deleted", "emptied", "header-and-4-records"])
def test_a_missing_or_truncated_catalog_is_refused_at_map(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                          key_file: Path, how: str) -> None:
    from uffd_pager.catalog import HEADER_BYTES
    from uffd_pager.crypto import RECORD_BYTES
    store = new_store(tmp_path)
    n = 12
    write_encrypted(pager, store, n * PAGE, {p: page_data("random", "A", p, how) for p in range(n)}, key=key)
    catalog = catalog_path(store)
    if how == "deleted":
        catalog.unlink()
    else:
        os.truncate(catalog, 0 if how == "emptied" else HEADER_BYTES + 4 * RECORD_BYTES)
    with pytest.raises(OSError) as info:
        pager.map(url(store), n * PAGE, key=key, writeback_interval=0)
    message = str(info.value)
    assert str(store) in message and ("missing" in message or "truncated" in message or "empty" in message), \
        f"not a clear message: {message}"
    assert not isinstance(info.value, PermissionError) or "rolled back" not in message
    # In another pager process too, and no page is ever read as zeros.
    result = run_script("client", {"url": url(store), "size": n * PAGE, "key_file": str(key_file),
                                        "probe": list(range(n))})
    assert result.returncode != 0 and not lines_of(result), f"a client mapped the store:\n{describe(result)}"


@pytest.mark.timeout(60)
def test_a_missing_record_of_a_written_page_kills_the_access(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                             key_file: Path) -> None:
    from uffd_pager.catalog import HEADER_BYTES
    from uffd_pager.crypto import RECORD_BYTES
    store = new_store(tmp_path)
    n = 8
    bad = 6
    pages = write_encrypted(pager, store, n * PAGE, {p: page_data("random", "A", p, "record") for p in range(n)},
                            key=key)
    with open(catalog_path(store), "r+b") as f:
        f.seek(HEADER_BYTES + bad * RECORD_BYTES)
        f.write(bytes(RECORD_BYTES))
    assert bad not in catalog_rows(store)
    assert_sigbus(url(store), n * PAGE, key_file, bad, {p: d for p, d in pages.items() if p != bad})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("catalog", ["kept", "deleted"])
def test_an_encrypted_store_is_refused_without_its_key(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                       this_process, catalog: str) -> None:
    """Mapped without the key, its pages would read as ciphertext, and a
    flush would overwrite them with plaintext."""
    store = new_store(tmp_path)
    n = 4
    write_encrypted(pager, store, n * PAGE, {p: page_data("random", "A", p, "nokey") for p in range(n)}, key=key)
    if catalog == "deleted":
        catalog_path(store).unlink()
    before = store.read_bytes()
    fds = this_process.uffd_fds()
    with pytest.raises(PermissionError) as info:
        pager.map(url(store), n * PAGE, writeback_interval=0)
    assert "encrypted" in str(info.value) and str(store) in str(info.value), f"not a clear message: {info.value}"
    assert this_process.uffd_fds() == fds and pager.status()["regions"] == 0
    assert store.read_bytes() == before


# --- 14. a flush that fails or dies half-way --------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_flush_that_runs_out_of_space_leaves_every_page_old_or_new(small_tmpfs: Path, pager: uffd_pager.Pager,
                                                                     key: Key, key_file: Path) -> None:
    """The store and its catalog on a 1 MiB tmpfs: 32 pages written, then a
    flush that rewrites them and adds 16 new ones, with room for 2."""
    store = new_store(small_tmpfs)
    old_n, new_n = 32, 48
    old = write_encrypted(pager, store, new_n * PAGE, {p: page_data("random", "old", p, "full") for p in range(old_n)},
                          key=key)
    new = {p: page_data("random", "new", p, "full") for p in range(new_n)}
    filler = small_tmpfs / "filler"
    try:
        region = pager.map(url(store), new_n * PAGE, key=key, writeback_interval=0)
        try:
            view = region.view()
            for p, data in new.items():
                view[p * PAGE:(p + 1) * PAGE] = data
            del view
            free = os.statvfs(small_tmpfs)
            filler.write_bytes(b"\xff" * (free.f_bavail * free.f_frsize - 2 * PAGE))
            with pytest.raises(OSError) as failed:
                region.flush()
            assert failed.value.errno == errno.ENOSPC, failed.value

            # As a pager would read the store after a crash now: every page is
            # its old or its new version (pages never written before: zeros or new).
            report, result = client(url(store), new_n * PAGE, key_file, probe=list(range(new_n)))
            assert result.returncode == 0, describe(result)
            neither = {p: got for p, got in ((int(p), got) for p, got in report["probes"].items())
                       if got not in (digest(new[p]), digest(old.get(p, bytes(PAGE))))}
            assert not neither, f"{len(neither)} of {new_n} pages read as neither their old nor their new version: " \
                                f"{sorted(neither)[:10]}"
            assert report["stats"]["auth_failures"] == 0

            filler.unlink()
            assert region.flush()["pages"] == new_n
        finally:
            filler.unlink(missing_ok=True)
            region.close()
    finally:
        filler.unlink(missing_ok=True)
    report, result = client(url(store), new_n * PAGE, key_file, read=range(new_n))
    assert result.returncode == 0, describe(result)
    assert_pages(report, new)


def es_read(es: Any, offset: int) -> bytes:
    """One page through the store interface, as a copy between portions reads it."""
    from uffd_pager.crypto import PageAuthError
    from uffd_pager.stores.base import BadPage
    value = asyncio.run(es.read([offset]))[0]
    if isinstance(value, BadPage):
        raise PageAuthError(str(value))
    return value if value is not None else bytes(PAGE)


def es_write(es: Any, runs: list[Any], data: bytes) -> None:
    asyncio.run(es.write([(run.store_offset, run.length) for run in runs], data))


class Crash(BaseException):
    """The pager dying in the middle of a write (SIGKILL stops a pwrite at a page boundary)."""


def crashing_after(store: Any, pages: int) -> None:
    """Makes the store's file writes stop (and the 'pager' die) after `pages` pages."""
    inner = store._inner

    def write_runs(runs: list[Any], data: bytes | bytearray | memoryview) -> None:
        done = 0
        for run in runs:
            for k in range(run.length // PAGE):
                if done == pages:
                    raise Crash()
                os.pwrite(inner.local_fd, memoryview(data)[done * PAGE:(done + 1) * PAGE], run.store_offset + k * PAGE)
                done += 1

    inner.write_runs = write_runs


@pytest.mark.timeout(90)
def test_an_interrupted_flush_leaves_every_page_old_or_new(tmp_path: Path, state_dir: Path, key: Key,
                                                           key_file: Path) -> None:
    """Drives the store as the pager does: a write that dies after some
    pages, then a pager that opens the store afresh and reads it (in Python
    and through the C fill path of a real pager), writes it again and dies
    again (a page left in doubt by the first crash), and finally a flush
    that completes."""
    from uffd_pager.stores import FileStore
    from uffd_pager.stores.encrypted import EncryptedStore
    from uffd_pager.uffd import Run
    store = new_store(tmp_path)
    n = 16
    runs = [Run(0, 0, 6 * PAGE), Run(0, 8 * PAGE, 8 * PAGE)]  # pages 0-5 and 8-15; 6 and 7 never written
    written = [p for run in runs for p in range(run.store_offset // PAGE, (run.store_offset + run.length) // PAGE)]

    def versions(tag: str) -> dict[int, bytes]:
        return {p: page_data("random", tag, p, "crash") for p in written}

    def open_store() -> EncryptedStore:
        return EncryptedStore(FileStore.open(url(store)), key, state_dir)

    def write(data: dict[int, bytes], crash_after: int | None = None) -> None:
        es = open_store()
        if crash_after is not None:
            crashing_after(es, crash_after)
        try:
            es_write(es, runs, b"".join(data[p] for p in written))
            asyncio.run(es.sync())
        except Crash:
            pass
        finally:
            es.close()

    def read_all() -> dict[int, bytes]:
        es = open_store()
        try:
            return {p: es_read(es, p * PAGE) for p in range(n)}
        finally:
            es.close()

    def expect(got: dict[int, bytes], allowed: dict[int, list[bytes]], where: str) -> None:
        wrong = [p for p in range(n) if got[p] not in allowed.get(p, [bytes(PAGE)])]
        assert not wrong, f"{where}: pages {wrong} read as neither version"

    a, b, c, d = versions("a"), versions("b"), versions("c"), versions("d")
    write(a)
    expect(read_all(), {p: [a[p]] for p in written}, "after the first flush")
    write(b, crash_after=5)  # dies in the first run: pages 0-4 hold b
    expect(read_all(), {p: [b[p]] if p in written[:5] else [a[p]] for p in written}, "after a crash")
    report, result = client(url(store), n * PAGE, key_file, probe=list(range(n)))
    assert result.returncode == 0, describe(result)
    wrong = [p for p in range(n) if report["probes"][str(p)] not in (digest(a.get(p, bytes(PAGE))),
                                                                      digest(b.get(p, bytes(PAGE))))]
    assert not wrong, f"through the fill path, pages {wrong} read as neither version after a crash"
    assert report["stats"]["auth_failures"] == 0
    write(c, crash_after=10)  # pages 0-4 were b, not a: the slot kept must be b's
    expect(read_all(), {p: [c[p]] if p in written[:10] else [a[p]] for p in written}, "after a second crash")
    write(d)
    expect(read_all(), {p: [d[p]] for p in written}, "after a flush that completed")


# --- 15. key files and catalog headers ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO put where the key file should be would block a reader forever."""
    path = tmp_path / "keys" / "odd.key"
    path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path.mkdir(mode=0o700)
    else:
        os.symlink("/dev/null", path)
    result = subprocess.run([sys.executable, str(CHILDREN_PY), "key-from-file", str(path)], capture_output=True,
                            text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, describe(result)
    assert "not a regular file" in result.stdout and str(path) in result.stdout, result.stdout


@pytest.mark.timeout(60)
def test_a_fifo_key_file_makes_map_fail_not_hang(tmp_path: Path, pager: uffd_pager.Pager, this_process) -> None:
    path = tmp_path / "keys" / "fifo.key"
    path.parent.mkdir()
    os.mkfifo(path, 0o600)
    store = new_store(tmp_path)
    fds = this_process.uffd_fds()
    started = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        pager.map(url(store), 4 * PAGE, key_file=path)
    assert time.monotonic() - started < 10
    assert this_process.uffd_fds() == fds and not catalog_path(store).exists()


@pytest.mark.timeout(60)
def test_a_symbolic_link_to_a_private_key_file_is_followed(tmp_path: Path, key: Key, key_file: Path) -> None:
    """Key files are often links (a Kubernetes secret volume, /etc/alternatives)."""
    link = tmp_path / "keys" / "link.key"
    link.symlink_to(key_file)
    assert Key.from_file(link).key_id == key.key_id


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["key-id", "store-id"])
def test_a_damaged_catalog_header_is_not_called_a_wrong_key(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                            field: str) -> None:
    store = new_store(tmp_path)
    write_encrypted(pager, store, 2 * PAGE, {0: page_data("random", "A", 0, "header")}, key=key)
    at = 8 if field == "key-id" else 8 + 16
    with open(catalog_path(store), "r+b") as f:
        f.seek(at + 3)
        byte = f.read(1)
        f.seek(at + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(OSError) as info:
        pager.map(url(store), 2 * PAGE, key=key, writeback_interval=0)
    assert "wrong key" not in str(info.value), f"a damaged header is reported as a wrong key: {info.value}"
    assert "damaged" in str(info.value) and str(store) in str(info.value), f"not a clear message: {info.value}"
    # A wrong key is still called so.
    with pytest.raises(PermissionError, match="wrong key"):
        pager.map(url(store), 2 * PAGE, key=Key.generate(), writeback_interval=0)


# --- 16. the state directory ----------------------------------------------------------------------------


def test_the_default_state_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from uffd_pager import catalog
    monkeypatch.setenv("UFFD_PAGER_STATE_DIR", str(tmp_path / "env"))
    assert catalog.default_state_dir() == str(tmp_path / "env")
    assert stat.S_IMODE(os.stat(tmp_path / "env").st_mode) == 0o700
    monkeypatch.delenv("UFFD_PAGER_STATE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert catalog._default_state_path() == str(tmp_path / "xdg" / "uffd-pager")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert catalog._default_state_path() == str(tmp_path / "home" / ".local" / "state" / "uffd-pager")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert catalog._default_state_path() == "/var/lib/uffd-pager"


@pytest.mark.timeout(60)
def test_a_state_directory_others_may_write_is_refused(tmp_path: Path, pager: uffd_pager.Pager, key: Key,
                                                       state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700, exist_ok=True)  # Pager() made it already (its takeover state)
    state_dir.chmod(0o777)
    store = new_store(tmp_path)
    with pytest.raises(PermissionError, match="state directory"):
        pager.map(url(store), 2 * PAGE, key=key)
    assert not catalog_path(store).exists() or catalog_path(store).stat().st_size == 0, "a catalog was written"
    region = pager.map(url(store), 2 * PAGE, writeback_interval=0)  # nothing made it an encrypted store
    region.close()


# --- 17. the store's own operations: discarded slots, a catalog descriptor from the client --------------


def encrypted_store(store: Path, key: Key, state_dir: Path, **kwargs: Any) -> Any:
    from uffd_pager.stores import FileStore
    from uffd_pager.stores.encrypted import EncryptedStore
    return EncryptedStore(FileStore.open(url(store)), key, state_dir, **kwargs)


def write_pages(es: Any, pages: dict[int, bytes]) -> None:
    from uffd_pager.uffd import Run
    es_write(es, [Run(0, p * PAGE, PAGE) for p in sorted(pages)], b"".join(pages[p] for p in sorted(pages)))
    asyncio.run(es.sync())


@pytest.mark.timeout(60)
def test_a_discarded_range_reads_as_zero_even_with_its_old_pages_put_back(tmp_path: Path, key: Key,
                                                                         state_dir: Path) -> None:
    """A child's portion slot being reused: its old pages must not come back."""
    from uffd_pager.catalog import HEADER_BYTES
    from uffd_pager.crypto import RECORD_BYTES
    store = new_store(tmp_path)
    old = {p: page_data("random", "old", p, "discard") for p in range(4, 8)}
    es = encrypted_store(store, key, state_dir)
    try:
        write_pages(es, old)
        saved_pages = {p: raw_page(store, p) for p in old}
        at = HEADER_BYTES + 4 * RECORD_BYTES
        saved_records = catalog_path(store).read_bytes()[at:at + 4 * RECORD_BYTES]
        asyncio.run(es.discard(4 * PAGE, 4 * PAGE))
        assert [es_read(es, p * PAGE) for p in old] == [bytes(PAGE)] * 4
        assert not any(es.holds(p * PAGE) for p in old)
        for p, data in saved_pages.items():
            put_raw_page(store, p, data)
        with open(catalog_path(store), "r+b") as f:
            f.seek(at)
            f.write(saved_records)
        assert [es_read(es, p * PAGE) for p in old] == [bytes(PAGE)] * 4, "a discarded page came back"
        new = {5: page_data("random", "new", 5, "discard")}
        write_pages(es, new)
        assert es_read(es, 5 * PAGE) == new[5] and es.holds(5 * PAGE)
    finally:
        es.close()


@pytest.mark.timeout(60)
def test_a_catalog_descriptor_from_the_client_is_used_instead_of_its_path(tmp_path: Path, key: Key,
                                                                           state_dir: Path) -> None:
    """A daemon must not create files with its own rights: the client opens
    (and creates) the catalog and passes the descriptor."""
    store = new_store(tmp_path)
    elsewhere = tmp_path / "opened-by-the-client"
    fd = os.open(elsewhere, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    es = encrypted_store(store, key, state_dir, catalog_fd=fd)
    try:
        write_pages(es, {0: page_data("random", "A", 0, "fd")})
        assert es_read(es, 0) == page_data("random", "A", 0, "fd")
    finally:
        es.close()
    assert not catalog_path(store).exists(), "the catalog's path was opened"
    assert 0 in read_catalog_rows(str(elsewhere))
    with pytest.raises(OSError):
        os.fstat(fd)  # the store owned the descriptor and closed it
    fd = os.open(elsewhere, os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(PermissionError, match="wrong key"):
        encrypted_store(store, Key.generate(), state_dir, catalog_fd=fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on failure too


# --- 18. the fill path's reads: anchor, record and ciphertext from mappings, opened in place ---------
#
# native/aead.c reads each page's anchor entry, catalog record and ciphertext
# from read-only mappings of their files (never past the size fstat last gave:
# pread past it, and a mapping made anew when the file has grown past its
# span), copies the ciphertext into the page it fills and opens it there in
# place. The catalog and the store are the attacker's to cut short under those
# mappings: a load past a file's end is SIGBUS, which must fail the page, not
# kill the pager. Most of these drive up_aead_read_page / up_aead_open_page
# directly, in a subprocess (the "growing-anchor", "in-place" and "cut-short"
# children of tests/encryption_children.py).


@pytest.mark.timeout(60)
def test_an_anchor_that_grows_while_mapped_still_reads_right(tmp_path: Path) -> None:
    result = run_script("growing-anchor", {"dir": str(tmp_path)})
    assert result.returncode == 0, f"the reader died:\n{describe(result)}"
    report = lines_of(result)[0]
    assert report["steps"] == {
        "first": ["v1"] * 8,
        "changed": ["EBADMSG", "zero", "v1"],
        "mid": ["v1", "zero"],
        "mid committed": ["EBADMSG"],
        "mid written": ["v2", "zero"],
        "far": ["v3"],
        "far committed": ["v3", "v3"],
        "far newer": ["EBADMSG", "v2", "v1", "EBADMSG"],
    }, describe(result)
    assert report["size"] > 3 << 20, "the anchor did not grow past the first mapping's span"
    assert report["maps"] == {"first": 1, "last": 1}, \
        "the anchor's entries were not read from one mapping of it (or an old mapping was left behind)"


@pytest.mark.timeout(60)
def test_a_page_opened_in_place_tries_each_slot_and_leaves_nothing_behind(tmp_path: Path) -> None:
    result = run_script("in-place", {"dir": str(tmp_path)})
    assert result.returncode == 0, describe(result)
    assert lines_of(result)[0]["steps"] == {
        "older in store": ["v1", "v1"],
        "newer in store": ["v2", "v2"],
        "flipped": ["EBADMSG", "EBADMSG"],
        "no record": ["EBADMSG", "EBADMSG", "EBADMSG"],
        "no record, uncommitted": ["zero", "EBADMSG", "zero"],
    }, describe(result)


@pytest.mark.timeout(60)
def test_a_catalog_or_store_cut_short_under_its_mappings_fails_those_pages_only(tmp_path: Path) -> None:
    result = run_script("cut-short", {"dir": str(tmp_path)})
    assert result.returncode == 0, f"the reader died:\n{describe(result)}"
    report = lines_of(result)[0]
    assert report["mapped"] == {"catalog": 1, "store": 1}, "the catalog and the store were not read from mappings"
    assert report["steps"] == {
        "before": ["v1"] * 6,
        "store cut": ["EBADMSG", "EBADMSG", "v1", "v1"],
        "catalog cut": ["EBADMSG", "EBADMSG", "v1", "zero"],
        "rewritten": ["v2", "v2"],
    }, describe(result)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cut", ["catalog", "store"])
def test_files_cut_short_while_mapped_poison_those_pages_and_the_pager_serves_on(tmp_path: Path,
                                                                                 pager: uffd_pager.Pager, key: Key,
                                                                                 cut: str) -> None:
    from uffd_pager.catalog import HEADER_BYTES
    from uffd_pager.crypto import RECORD_BYTES
    n, kept = 256, 8
    store = new_store(tmp_path)
    pages = write_encrypted(pager, store, n * PAGE, {p: page_data("random", "C", p, cut) for p in range(n)}, key=key)
    region = pager.map(url(store), n * PAGE, key=key, read_ahead="off", writeback_interval=0)
    view = region.view()
    assert all(view[p * PAGE:(p + 1) * PAGE] == pages[p] for p in range(kept))  # the pager maps both files now
    os.truncate(catalog_path(store) if cut == "catalog" else store,
                HEADER_BYTES + kept * RECORD_BYTES if cut == "catalog" else kept * PAGE)
    r, w = os.pipe()
    try:
        probes = {}
        for p in (n - 1, n // 2, kept):  # records and ciphertexts past the new end, in pages of it or past it
            try:
                os.write(w, view[p * PAGE:(p + 1) * PAGE])
                probes[p] = "read"
            except OSError as exc:
                probes[p] = errno.errorcode[exc.errno]
    finally:
        os.close(r)
        os.close(w)
    assert probes == {n - 1: "EFAULT", n // 2: "EFAULT", kept: "EFAULT"}, "a page cut off was not poisoned"
    assert region.stats()["auth_failures"] >= 3
    del view
    region.close()
    assert pager.alive()
    other = new_store(tmp_path, "other.bin")
    written = write_encrypted(pager, other, 4 * PAGE, {p: page_data("random", "O", p) for p in range(4)}, key=key)
    with pager.map(url(other), 4 * PAGE, key=key, writeback_interval=0) as again:
        assert [again.view()[p * PAGE:(p + 1) * PAGE] == written[p] for p in range(4)] == [True] * 4
