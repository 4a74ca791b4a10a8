"""Page-out under a cap (uffd_pager/paging.py, native/agent.c, fill.c's
victims): a capped region reads every byte in order and at random while its
resident size (the kernel's Rss of its mapping) stays within the cap and a
read-ahead window; writes are written back before their pages go, a write
racing its own page's eviction is never lost, and a client in a memory
cgroup smaller than its region reads all of it without being OOM-killed.
Under either dirty tracking: "sync" holds a racing write in a WP fault,
"async" moves the page out before it decides (paging.py)."""
from __future__ import annotations

import array
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import uffd_pager
from pages import differing_pages
from uffd_pager.bench import _touch

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
N = 64 * MiB // PAGE
CAP = 8 * MiB
WINDOW = 1 * MiB  # read-ahead's largest window: how far past the cap a fault may fill before it waits
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TRACKINGS = pytest.mark.parametrize("tracking", ["sync", "async"])
CHILD = Path(__file__).with_name("page_out_children.py")


def url(path: Path) -> str:
    return f"file://{path}"


def _write_random(path: Path, size: int) -> "hashlib._Hash":
    """Fills path with size random bytes, 8 MiB at a time; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            chunk = os.urandom(8 * MiB)
            digest.update(chunk)
            f.write(chunk)
    return digest


def mapping_rss(address: int) -> int:
    """The kernel's Rss of the mapping that holds address (bytes)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def touch(region: uffd_pager.Region, pages: list[int], *, every: int = 512) -> int:
    """Reads a byte of each page in the order given; returns the largest Rss
    of the region's mapping seen, sampled every `every` pages."""
    peak = 0
    for first in range(0, len(pages), every):
        _touch(region.address, array.array("Q", (p * PAGE for p in pages[first:first + every])))
        peak = max(peak, mapping_rss(region.address))
    return peak


@pytest.mark.timeout(120)
@TRACKINGS
@pytest.mark.parametrize("order", ["in-order", "random"])
def test_a_capped_region_reads_every_byte_and_stays_within_its_cap(pager, random_file, order, tracking):
    path = random_file(N * PAGE)
    pages = list(range(N))
    if order == "random":
        random.Random(5).shuffle(pages)
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, max_resident=CAP, writeback_interval=0) as region:
        peak = touch(region, pages)
        stats = region.stats()
        expected = path.read_bytes()
        # Read back in slices: each slice faults in again what was dropped.
        wrong = [s for s in range(0, N, 256) if bytes(region.view()[s * PAGE:(s + 256) * PAGE]) !=
                 expected[s * PAGE:(s + 256) * PAGE]]
        assert wrong == [], f"slices of 256 pages differ from the file at pages {wrong[:10]}"
        assert mapping_rss(region.address) <= CAP + WINDOW + PAGE
    assert stats["max_resident"] == CAP and stats["evictions"] >= N - CAP // PAGE - WINDOW // PAGE, stats
    assert stats["resident_peak"] * PAGE <= CAP + WINDOW, stats
    assert peak <= CAP + WINDOW + PAGE, f"the region's Rss reached {peak / MiB:.1f} MiB under a {CAP // MiB} MiB cap"
    assert stats["errors"] == 0 and stats["last_error"] == "", stats
    assert stats["events"]["remove"] == 0, "page-out's own drops are not the program's MADV_DONTNEEDs"


@pytest.mark.timeout(120)
@TRACKINGS
def test_writes_under_the_cap_are_written_back_before_their_pages_go(pager, random_file, tracking):
    path = random_file(N * PAGE)
    model = bytearray(path.read_bytes())
    rng = random.Random(11)
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, max_resident=CAP, writeback_interval=0) as region:
        view = region.view()
        for _ in range(20000):  # ~ every page written once or so, far more than the cap holds
            p = rng.randrange(N)
            data = os.urandom(64)
            at = p * PAGE + rng.randrange(0, PAGE - 64)
            view[at:at + 64] = data
            model[at:at + 64] = data
        assert region.stats()["evictions"] > 0
        assert differing_pages(view, model) == [], "a page read back after its eviction lost a write"
        region.flush()
        del view
        assert mapping_rss(region.address) <= CAP + WINDOW + PAGE
    assert differing_pages(path.read_bytes(), model) == [], "the file misses writes"


@pytest.mark.timeout(180)
@TRACKINGS
@pytest.mark.parametrize("round_", range(3))
def test_a_write_racing_its_own_pages_eviction_is_never_lost(pager, sparse_file, round_, tracking):
    """Writers keep writing counters to a few hot pages while a reader sweeps
    the region over and over, so the hot pages are taken as victims again
    and again while being written: the last value written to each page is
    what it reads, and what the file holds after the flush."""
    path = sparse_file(N * PAGE)
    hot = random.Random(round_).sample(range(N), 64)
    last = {p: 0 for p in hot}
    stop = threading.Event()
    with pager.map(url(path), N * PAGE, dirty_tracking=tracking, max_resident=64 * PAGE * 4,
                   writeback_interval=0) as region:
        view = region.view()

        def writer(mine: list[int]) -> None:
            c = 0
            while not stop.is_set():
                c += 1
                for p in mine:
                    view[p * PAGE:p * PAGE + 8] = c.to_bytes(8, "little")
                    last[p] = c

        def sweeper() -> None:
            while not stop.is_set():
                _touch(region.address, array.array("Q", range(0, N * PAGE, PAGE * 7)))

        threads = [threading.Thread(target=writer, args=(hot[k::4],)) for k in range(4)]
        threads.append(threading.Thread(target=sweeper))
        for thread in threads:
            thread.start()
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a thread is stuck in a fault"
        evictions = region.stats()["evictions"]
        seen = {p: int.from_bytes(view[p * PAGE:p * PAGE + 8], "little") for p in hot}
        region.flush()
        del view
    assert evictions > 1000, f"only {evictions} pages were evicted: the race was hardly run"
    lost = {p: (seen[p], last[p]) for p in hot if seen[p] != last[p]}
    assert not lost, f"pages read back without their last write (page: (seen, written)): {dict(list(lost.items())[:5])}"
    with open(path, "rb") as f:
        stored = {p: int.from_bytes(os.pread(f.fileno(), 8, p * PAGE), "little") for p in hot}
    assert stored == last, "the file misses the last writes"


@pytest.mark.timeout(60)
def test_a_bad_max_resident_is_refused_clearly(pager, random_file):
    path = random_file(PAGE * 64)
    for bad in (1000, PAGE, -CAP, CAP + 1, 1.5 * CAP, True, "8M"):
        with pytest.raises(ValueError, match="max_resident must be"):
            pager.map(url(path), 64 * PAGE, dirty_tracking="sync", max_resident=bad)
    assert pager.status()["regions"] == 0


def _cgroup(limit: int) -> Path:
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        pytest.skip("no memory cgroup (v1) at /sys/fs/cgroup/memory")
    group = CGROUP_ROOT / f"uffd-pager-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


@pytest.mark.timeout(300)
def test_a_client_capped_at_300_mib_reads_a_1_gib_region_in_order_and_at_random(tmp_path):
    size = 1 << 30
    path = tmp_path / "big.bin"
    digest = _write_random(path, size)
    group = _cgroup(300 * MiB)
    try:
        child = Path(__file__).with_name("page_out_children.py")
        # The child joins the cgroup itself before it starts its pager (which
        # inherits it): the whole client, pager included, lives under the cap.
        result = subprocess.run([sys.executable, str(child), "read-capped", str(group), str(path), str(size),
                                 str(192 * MiB), "async"], capture_output=True, text=True, timeout=280)
        failcnt = int((group / "memory.failcnt").read_text())
        oom = (group / "memory.oom_control").read_text()
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert result.returncode == 0, (f"the capped client ended with {result.returncode} (-9: OOM-killed); "
                                    f"stdout {result.stdout[-2000:]!r} stderr {result.stderr[-2000:]!r}; {oom}")
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines.get("in-order") == digest.hexdigest(), result.stdout
    assert lines.get("random") == "exact", result.stdout
    print(f"capped client: {result.stdout.strip()}; cgroup failcnt {failcnt}")


@pytest.mark.timeout(120)
@TRACKINGS
def test_a_parent_and_its_forked_child_each_read_their_own_data_under_the_cap(sparse_file, tracking):
    import json

    npages = 4096
    path = sparse_file(npages * PAGE)
    child = Path(__file__).with_name("page_out_children.py")
    result = subprocess.run([sys.executable, str(child), "fork-capped", str(path), str(npages), str(2 * MiB),
                             tracking], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    reports = {r["who"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(reports) == {"parent", "child"}, result.stdout
    for who, report in reports.items():
        assert report["wrong"] == 0, f"the {who} read {report['wrong']} pages that are not its own view: {report}"
        assert report["max_resident"] == 2 * MiB and report["evictions"] > npages, f"{who}: {report}"
        if tracking == "sync":
            # Under "async" a page still shared with the other process cannot
            # be moved out (UFFDIO_MOVE: EBUSY): it stays until one of them
            # writes it, and the cap is passed meanwhile.
            assert report["resident_peak"] * PAGE <= 2 * MiB + WINDOW, f"{who}: {report}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracking", ["sync"])  # with "async" such a cap is soft: see the README's "Page-out"
@pytest.mark.parametrize("whose", ["pager", "tenant"])
def test_a_pagers_cap_holds_over_all_its_regions_together(random_file, start_daemon, whose, tracking):
    """Pager(max_resident=), and a daemon's --tenant-max-resident over one
    tenant's regions: two regions without caps of their own, read in
    turns, keep their resident pages together near the cap (a soft cap: a
    drop under way lets faults pass it for a while), every byte exact."""
    paths = [random_file(4 * N * PAGE // 8) for _ in range(2)]  # 32 MiB each
    size = 4 * N * PAGE // 8
    if whose == "pager":
        capped = uffd_pager.Pager(max_resident=CAP)
    else:
        capped = start_daemon("tenant-cap.sock", args=["--tenant-max-resident", str(CAP)]).connect()
    with capped as pager:
        regions = [pager.map(url(p), size, dirty_tracking=tracking, writeback_interval=0) for p in paths]
        peak = 0
        pages = size // PAGE
        step = 128
        for first in range(0, pages, step):
            for region in regions:
                _touch(region.address, array.array("Q", (p * PAGE for p in range(first, min(first + step, pages)))))
            peak = max(peak, sum(mapping_rss(r.address) for r in regions))
        for region, path in zip(regions, paths):
            data = path.read_bytes()
            wrong = [s for s in range(0, pages, 256)
                     if bytes(region.view()[s * PAGE:(s + 256) * PAGE]) != data[s * PAGE:(s + 256) * PAGE]]
            assert wrong == [], f"slices differ at pages {wrong[:10]}"
        stats = [r.stats() for r in regions]
        assert all(s["evictions"] > 0 and s["max_resident"] == 0 and s["tracking"] == tracking for s in stats), stats
        # Soft: while a drop is under way both regions go on faulting, a
        # slice and a read-ahead window or two each.
        slack = 2 * step * PAGE + 4 * WINDOW
        assert peak <= CAP + slack, f"the regions together reached {peak / MiB:.1f} MiB under a {CAP // MiB} MiB cap"
        for region in regions:
            region.close()
        assert pager.status()["internal_errors"] == 0


@pytest.mark.timeout(120)
def test_a_capped_region_tracks_writes_async_unless_told_otherwise(pager, random_file):
    """Page-out keeps a racing write under either tracking, so a region's
    cap no longer changes the default; "sync" is kept where asked; the cap
    holds and no byte is lost. Under a pager's cap the default is "sync"
    (the only page-out fast enough to hold a cap over many regions)."""
    path = random_file(N * PAGE)
    data = path.read_bytes()
    for asked, tracking in ((None, "async"), ("sync", "sync"), ("async", "async")):
        with pager.map(url(path), N * PAGE, dirty_tracking=asked, max_resident=CAP, writeback_interval=0) as region:
            assert region.stats()["tracking"] == tracking
            _touch(region.address, array.array("Q", range(0, N * PAGE, PAGE)))
            assert bytes(region.view()) == data
            stats = region.stats()
            assert stats["evictions"] > 0 and stats["resident_peak"] * PAGE <= CAP + WINDOW, stats
    with uffd_pager.Pager(max_resident=CAP) as capped:
        with capped.map(url(path), 64 * PAGE) as region:
            assert region.stats()["tracking"] == "sync"


@pytest.mark.timeout(300)
@TRACKINGS
def test_a_256_mib_region_under_a_32_mib_cap_reads_exactly_in_order_and_at_random(tmp_path, tracking):
    """In a child process (a fault that never ends fails the test, never
    hangs it): every byte read in order and at random is the file's, and
    the process's Rss (smaps_rollup) never grows past the cap and a
    read-ahead window."""
    size, cap = 256 * MiB, 32 * MiB
    path = tmp_path / "big.bin"
    digest = _write_random(path, size)
    result = subprocess.run([sys.executable, str(CHILD), "read-capped", "-", str(path), str(size), str(cap), tracking],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines.get("in-order") == digest.hexdigest(), result.stdout
    assert lines.get("random") == "exact", result.stdout
    growth = int(lines["rss_growth"])
    # The view's slices (1 MiB of bytes objects) come and go beside the region.
    assert growth <= cap + WINDOW + 2 * MiB, f"Rss grew by {growth / MiB:.1f} MiB under a {cap // MiB} MiB cap"
    print(f"{tracking}: {result.stdout.strip()}")


@pytest.mark.timeout(60)
def test_a_bad_pager_cap_is_refused_before_any_pager_starts(tmp_path):
    for bad in (1000, -PAGE, 1.5, True):
        with pytest.raises(ValueError, match="max_resident must be"):
            uffd_pager.Pager(max_resident=bad)
    result = subprocess.run([sys.executable, "-m", "uffd_pager", "serve", "--socket", str(tmp_path / "s"),
                             "--max-resident", "1000"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "multiple of 4096" in result.stderr, (result.returncode, result.stderr)


@pytest.mark.timeout(120)
def test_regions_capped_one_after_another_on_one_connection_each_keep_their_cap(pager, random_file):
    """A region closed while its eviction waits on the agent (whose drop
    waits for a REMOVE event nobody reads any more) must not leave the
    agent stuck for the next region: each of three regions in turn keeps
    its cap, and page-out never gives up on one."""
    path = random_file(N * PAGE)
    for _ in range(3):
        with pager.map(url(path), N * PAGE, dirty_tracking="sync", max_resident=CAP, writeback_interval=0) as region:
            _touch(region.address, array.array("Q", range(0, N * PAGE, PAGE)))
            stats = region.stats()
        assert stats["last_error"] == "" and stats["evictions"] > 0, stats
        assert stats["resident_peak"] * PAGE <= CAP + WINDOW, stats
