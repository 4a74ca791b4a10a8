"""Seeing what a pager does: `uffd-pager status` (tables, and --json for
scripts), the Prometheus endpoint of `serve --metrics`, the log lines of
requests, and `Pager(log_level=...)`. Every daemon is a real `uffd-pager
serve` and every tenant a client process (tests/observe_children.py)
faulting on a real region."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

import uffd_pager
from conftest import Daemon
from uffd_pager.layout import READ_AHEAD_MAX
from support import ChildScript

CHILDREN_PY = Path(__file__).with_name("observe_children.py")
PAGE = uffd_pager.PAGE_SIZE
PAGES = 16
SIZE = PAGES * PAGE


class Tenant(ChildScript):
    def __init__(self, name: str, *args: object) -> None:
        super().__init__(CHILDREN_PY, name, *args)

    def do(self, line: str, what: str) -> dict:
        self.send(line)
        return self.expect(what)


@pytest.fixture
def tenants() -> Callable[..., Tenant]:
    started: list[Tenant] = []

    def start(name: str, *args: object) -> Tenant:
        tenant = Tenant(name, *args)
        started.append(tenant)
        tenant.expect("mapped")
        return tenant

    yield start
    for tenant in started:
        tenant.kill(join_readers=True)


def status(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "uffd_pager", "status", "--socket", daemon.path, *args],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result


def logged(path: Path, pattern: str, timeout: float = 10) -> re.Match[str]:
    """The first match of pattern in the log file, waited for (a daemon logs
    as it goes)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, path.read_text() if path.exists() else "", re.MULTILINE)
        if found or time.monotonic() > deadline:
            assert found, f"no line matching {pattern!r} in the log:\n{path.read_text()[-3000:]}"
            return found
        time.sleep(0.05)


# --- status ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_table_shows_tenants_and_regions(daemon: Daemon, random_file, tenants) -> None:
    url = f"file://{random_file(SIZE)}"
    tenant = tenants("tenant", daemon.path, url, SIZE)
    tenant.do(f"read 0 {PAGES}", "read")
    text = status(daemon).stdout
    assert "{" not in text, "the table printed the protocol's JSON"
    pid = tenant.process.pid
    region_line = next((line for line in text.splitlines() if url in line), None)
    assert region_line is not None, text
    # id, pid, uid, store, size, resident, dirty, faults, errors, tracking, forked from
    assert region_line.split() == ["1", str(pid), "0", url, "64", "KiB", "64", "KiB", "0", "B", str(PAGES), "0",
                                   "async", "-"], text
    header = next(line for line in text.splitlines() if line.startswith("region"))
    assert header.split()[:9] == ["region", "pid", "uid", "store", "size", "resident", "dirty", "faults", "errors"]
    # The columns line up: each region cell ends where its header's does (right-aligned numbers).
    assert header.index("faults") + len("faults") == region_line.index(f" {PAGES} ") + len(f" {PAGES}")
    tenant_line = next(line for line in text.splitlines() if line.split()[:1] == ["0"] and str(pid) in line)
    assert tenant_line.split()[:5] == ["0", "1", "64", "KiB", "2"], text


@pytest.mark.timeout(60)
def test_status_json_has_the_right_numbers(daemon: Daemon, random_file, tenants) -> None:
    url = f"file://{random_file(SIZE)}"
    tenant = tenants("tenant", daemon.path, url, SIZE)
    tenant.do("read 0 10", "read")
    tenant.do("write 0 3", "written")  # resident pages, async tracking: no fault, dirty
    before = json.loads(status(daemon, "--json").stdout)
    assert "ok" not in before, "the protocol's envelope is not the pager's state"
    assert (before["regions"], before["internal_errors"]) == (1, 0)
    [mine] = before["tenants"]
    # Connected: the tenant, and `status` itself as it asks.
    assert mine | {"pids": []} == {"uid": 0, "regions": 1, "mapped": SIZE, "connections": 2, "pids": []}
    assert tenant.process.pid in mine["pids"] and len(mine["pids"]) == 2
    [region] = before["region_list"]
    assert region | {"id": 0} == {
        "id": 0, "pid": tenant.process.pid, "uid": 0, "parent": None, "store": url, "kind": "file",
        "encrypted": False, "size": SIZE, "tracking": "async", "resident_pages": 10, "dirty_pages": 3,
        "faults": 10, "evictions": 0, "bytes_written": 0, "errors": 0}
    assert tenant.do("flush", "flushed")["pages"] == 3
    [after] = json.loads(status(daemon, "--json").stdout)["region_list"]
    assert (after["dirty_pages"], after["bytes_written"], after["faults"]) == (0, 3 * PAGE, 10)
    tenant.do("close", "closed")
    empty = json.loads(status(daemon, "--json").stdout)
    assert (empty["regions"], empty["tenants"], empty["region_list"]) == (0, [], [])
    assert "no regions" in status(daemon).stdout


@pytest.mark.timeout(120)
def test_status_lists_more_regions_than_one_message_holds(daemon: Daemon, random_file, tenants) -> None:
    url = f"file://{random_file(PAGE)}"
    count = 400  # a region's line is some 300 bytes of JSON: more than one 64 KiB reply holds
    tenant = tenants("many", daemon.path, url, count)
    with daemon.connect() as pager:
        first = pager._conn.request("status")  # the raw reply: one message's worth
        assert first["more_regions"] and 0 < len(first["region_list"]) < count
        listed = pager.status()
    assert "more_regions" not in listed
    assert [line["id"] for line in listed["region_list"]] == sorted({line["id"] for line in listed["region_list"]})
    assert len(listed["region_list"]) == count and {line["pid"] for line in listed["region_list"]} == {tenant.process.pid}
    table = status(daemon).stdout
    assert sum(url in line for line in table.splitlines()) == count
    tenant.do("close", "closed")


# --- /metrics -------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The samples of the exposition text: {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


FILE = '{encrypted="false",store="file"}'


@pytest.mark.timeout(90)
def test_metrics_count_faults_as_they_come(start_daemon, random_file, tenants, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = start_daemon(args=["--metrics", "127.0.0.1:0", "--log-level", "INFO"], stderr=log)
    url = "http://" + logged(log, r"metrics on http://(\S+)/metrics").group(1) + "/metrics"
    idle = scrape(url)
    assert idle["uffd_pager_restarts_total"] == 0 and idle["uffd_pager_connections"] == 0
    assert idle["uffd_pager_internal_errors_total"] == 0

    tenant = tenants("tenant", daemon.path, f"file://{random_file(SIZE)}", SIZE)
    tenant.do("read 0 4", "read")
    first = scrape(url)
    assert first[f"uffd_pager_faults_total{FILE}"] == 4
    assert first[f"uffd_pager_resident_pages{FILE}"] == 4
    tenant.do("read 4 12", "read")
    tenant.do("write 0 2", "written")
    second = scrape(url)
    assert second[f"uffd_pager_faults_total{FILE}"] == 12, "the fault counter did not grow with the faults"
    assert second[f"uffd_pager_dirty_pages{FILE}"] == 2
    # Every fault served was timed, into a bucket by its latency.
    count = second['uffd_pager_fault_latency_seconds_count{encrypted="false",store="file"}']
    inf = second['uffd_pager_fault_latency_seconds_bucket{encrypted="false",le="+Inf",store="file"}']
    assert count == inf == 12
    assert 0 < second['uffd_pager_fault_latency_seconds_sum{encrypted="false",store="file"}'] < 12 * 1.0
    buckets = sorted((float(le[1]), v) for key, v in second.items()
                     if (le := re.search(r'le="([0-9.e+-]+)"', key)) and "fault_latency" in key)
    assert len(buckets) == 23 and buckets[0][0] == 1e-6
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets are not cumulative"

    tenant.do("flush", "flushed")
    tenant.do("close", "closed")
    gone = scrape(url)
    # The region is gone, its counts are not: counters never go down.
    assert gone[f"uffd_pager_faults_total{FILE}"] == 12
    assert gone[f"uffd_pager_writeback_bytes_total{FILE}"] == 2 * PAGE
    assert gone[f"uffd_pager_regions{FILE}"] == 0 and gone[f"uffd_pager_resident_pages{FILE}"] == 0
    assert gone['uffd_pager_errors_total{encrypted="false",kind="fault",store="file"}'] == 0
    assert "process_open_fds" in gone  # the pager process's own figures
    with pytest.raises(urllib.error.HTTPError) as wrong_path:
        urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=10)
    assert wrong_path.value.code == 404


@pytest.mark.timeout(90)
def test_metrics_count_evictions_of_a_capped_region(start_daemon, random_file, tenants, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = start_daemon(args=["--metrics", "127.0.0.1:0", "--log-level", "INFO"], stderr=log)
    url = "http://" + logged(log, r"metrics on http://(\S+)/metrics").group(1) + "/metrics"
    cap, pages = 64, 1024  # the smallest cap (256 KiB) under a region 16 times its size
    tenant = tenants("tenant", daemon.path, f"file://{random_file(pages * PAGE)}", pages * PAGE, cap * PAGE)
    tenant.do(f"read 0 {pages}", "read")
    # Page-out keeps the region near its cap (a read-ahead window over it at most): the rest was dropped.
    least = pages - cap - READ_AHEAD_MAX // PAGE
    deadline = time.monotonic() + 20
    while (samples := scrape(url))[f"uffd_pager_evictions_total{FILE}"] < least:
        assert time.monotonic() < deadline, f"evictions: {samples[f'uffd_pager_evictions_total{FILE}']}"
        time.sleep(0.1)
    [line] = json.loads(status(daemon, "--json").stdout)["region_list"]
    assert samples[f"uffd_pager_evictions_total{FILE}"] <= line["evictions"]
    assert line["resident_pages"] + line["evictions"] == pages
    assert samples[f"uffd_pager_faults_total{FILE}"] == pages


@pytest.mark.timeout(90)
def test_metrics_time_remote_faults_under_their_store_kind(start_daemon, random_file, tenants, tmp_path: Path,
                                                           redis_server, redis_name: str) -> None:
    """A Redis store's faults go through the fetch path, not C's: timed all the same, apart from files'."""
    log = tmp_path / "daemon.log"
    daemon = start_daemon(args=["--metrics", "127.0.0.1:0", "--log-level", "INFO"], stderr=log)
    url = "http://" + logged(log, r"metrics on http://(\S+)/metrics").group(1) + "/metrics"
    remote = tenants("tenant", daemon.path, redis_server.url_for(redis_name), SIZE)
    local = tenants("tenant", daemon.path, f"file://{random_file(SIZE)}", SIZE)
    remote.do("read 0 6", "read")
    local.do("read 0 2", "read")
    samples = scrape(url)
    redis = '{encrypted="false",store="redis"}'
    assert samples[f"uffd_pager_faults_total{redis}"] == 6 and samples[f"uffd_pager_faults_total{FILE}"] == 2
    assert samples[f"uffd_pager_fault_latency_seconds_count{redis}"] == 6
    assert samples[f"uffd_pager_fault_latency_seconds_count{FILE}"] == 2
    assert samples[f"uffd_pager_fault_latency_seconds_sum{redis}"] > 0
    assert samples[f"uffd_pager_regions{redis}"] == 1


@pytest.mark.parametrize("address", ["9100", "localhost", "host:port", "127.0.0.1:70000", ":9100"])
def test_metrics_address_is_checked(address: str, socket_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "uffd_pager", "serve", "--socket", str(socket_dir / "s"),
                             "--metrics", address], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def test_metrics_port_in_use_is_a_clear_error(socket_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "uffd_pager", "serve", "--socket", str(socket_dir / "s"),
                                 "--metrics", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{port}" in result.stderr and "in use" in result.stderr, result.stderr
    assert not (socket_dir / "s").exists(), "the control socket was left behind"


# --- log lines ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_requests_are_logged_with_the_tenants_pid(start_daemon, random_file, tenants, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = start_daemon(args=["--log-level", "DEBUG"], stderr=log)
    tenant = tenants("tenant", daemon.path, f"file://{random_file(SIZE)}", SIZE)
    pid = tenant.process.pid
    tenant.do("read 0 2", "read")
    tenant.do("write 0 1", "written")
    tenant.do("flush", "flushed")
    tenant.do("bad", "refused")
    tenant.do("close", "closed")
    logged(log, rf"INFO connect: pid {pid}, uid 0$")
    logged(log, rf"INFO map: pid {pid}: region 1, file://\S+, {SIZE} bytes at offset 0, async tracking$")
    logged(log, rf"DEBUG flush: pid {pid}: region 1: 1 pages, {PAGE} bytes written$")
    logged(log, rf"INFO error: pid {pid}: prefetch: ValueError: ")
    logged(log, rf"INFO unmap: pid {pid}: region 1$")
    logged(log, rf"INFO close: pid {pid}: connection closed")


@pytest.mark.timeout(60)
def test_the_default_level_logs_no_request(start_daemon, random_file, tenants, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = start_daemon(stderr=log)
    tenants("tenant", daemon.path, f"file://{random_file(SIZE)}", SIZE).do("close", "closed")
    assert "map:" not in log.read_text() and "connect:" not in log.read_text()


@pytest.mark.timeout(60)
def test_embedded_pager_logs_at_the_level_asked(random_file, tenants) -> None:
    tenant = tenants("embedded", "debug", f"file://{random_file(SIZE)}", SIZE)
    tenant.do("write 0 1", "written")
    tenant.do("flush", "flushed")
    tenant.do("close", "closed")
    assert tenant.process.wait(timeout=30) == 0
    tenant.kill(join_readers=True)
    stderr = tenant.stderr()
    pid = tenant.process.pid
    pager = tenant.seen[0]["pager"]
    for line in (f"uffd-pager[{pager}] INFO map: pid {pid}: region 1",
                 f"uffd-pager[{pager}] DEBUG flush: pid {pid}: region 1: 1 pages",
                 f"uffd-pager[{pager}] INFO close: pid {pid}"):
        assert line in stderr, f"{line!r} not in the embedded pager's log:\n{stderr}"


def test_pager_refuses_an_unknown_log_level() -> None:
    with pytest.raises(ValueError, match="DEBUG, INFO, WARNING, ERROR"):
        uffd_pager.Pager(log_level="LOUD")


def test_log_level_choices_are_in_the_help() -> None:
    for argv in (["--help"], ["serve", "--help"], ["status", "--help"]):
        text = subprocess.run([sys.executable, "-m", "uffd_pager", *argv], capture_output=True, text=True,
                              timeout=30).stdout
        assert "--log-level" in text and all(level in text for level in ("DEBUG", "INFO", "WARNING", "ERROR")), text
