"""Bad input raises a clear exception before anything is registered, and
leaves no userfaultfd, mapping, region or pager descriptor behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import uffd_pager
from support import describe_returncode

PAGE = uffd_pager.PAGE_SIZE
MiB = 1 << 20
CAP_SYS_PTRACE = 19
DAC_CAPABILITIES = 1 << 1 | 1 << 2  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops capabilities of root: run as root")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size, offset", [
    pytest.param(0, 0, id="size-zero"),
    pytest.param(-PAGE, 0, id="size-negative"),
    pytest.param(PAGE + 1, 0, id="size-not-a-page-multiple"),
    pytest.param(100, 0, id="size-less-than-a-page"),
    pytest.param(PAGE, 100, id="offset-not-page-aligned"),
    pytest.param(PAGE, -PAGE, id="offset-negative"),
])
def test_bad_size_or_offset_raises_value_error(pager, random_file, leaves_nothing_behind, size, offset):
    path = random_file(4 * PAGE)
    with leaves_nothing_behind(pager), pytest.raises(ValueError, match="size|offset"):
        pager.map(f"file://{path}", size, offset=offset)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url, error, message", [
    pytest.param("file://{tmp}/missing.bin", FileNotFoundError, "missing.bin", id="missing-file"),
    pytest.param("file://{tmp}", IsADirectoryError, "directory", id="directory"),
    pytest.param("s3://bucket/data.bin", ValueError, "scheme", id="unknown-scheme"),
    pytest.param("file://relative/data.bin", ValueError, "relative", id="relative-path-as-host"),
    pytest.param("file:relative/data.bin", ValueError, "absolute", id="relative-path"),
])
def test_a_bad_store_raises_a_clear_error(pager, tmp_path, leaves_nothing_behind, url, error, message):
    with leaves_nothing_behind(pager), pytest.raises(error, match=message):
        pager.map(url.format(tmp=tmp_path), 16 * MiB)


@pytest.mark.timeout(30)
def test_the_pager_still_serves_after_a_failed_map(pager, tmp_path, random_file):
    with pytest.raises(FileNotFoundError):
        pager.map(f"file://{tmp_path}/missing.bin", PAGE)
    path = random_file(PAGE)
    with pager.map(f"file://{path}", PAGE) as region:
        assert bytes(region.view()) == path.read_bytes()


@pytest.mark.timeout(30)
def test_connect_without_a_socket_at_the_path_raises_file_not_found(socket_dir, leaves_nothing_behind):
    with leaves_nothing_behind(), pytest.raises(FileNotFoundError, match="uffd-pager serve"):
        uffd_pager.connect(str(socket_dir / "nobody-listens.sock"))


@pytest.mark.timeout(30)
def test_connect_to_a_socket_left_by_a_dead_daemon_raises_pager_gone(socket_dir, leaves_nothing_behind):
    path = str(socket_dir / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as dead:
        dead.bind(path)
    with leaves_nothing_behind(), pytest.raises(uffd_pager.PagerGone):
        uffd_pager.connect(path)
    assert issubclass(uffd_pager.PagerGone, ConnectionError)


def effective_capabilities(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)


@needs_root
@needs_setpriv
@pytest.mark.timeout(60)
def test_the_pager_reads_a_store_through_the_clients_descriptor_never_its_own_rights(start_daemon, tmp_path):
    # The file is root's with mode 000: only CAP_DAC_OVERRIDE reads it. The daemon
    # runs without that capability, the client (root) has it: the client opens the
    # file and passes the descriptor, so the daemon serves it without opening a path.
    path = tmp_path / "secret.bin"
    data = os.urandom(4 * PAGE)
    path.write_bytes(data)
    path.chmod(0)
    without_dac = ",".join(f"-{cap}" for cap in ("dac_override", "dac_read_search"))
    daemon = start_daemon(wrapper=["setpriv", f"--bounding-set={without_dac}", f"--inh-caps={without_dac}"])
    assert not effective_capabilities(daemon.process.pid) & DAC_CAPABILITIES, "the daemon can still read anything"
    with daemon.connect() as pager, pager.map(f"file://{path}", 4 * PAGE) as region:
        assert bytes(region.view()) == data


# The child process is the "without-ptrace" function of tests/errors_children.py: it runs
# without CAP_SYS_PTRACE, maps, writes, flushes and forks, and reports what each process saw.
ERRORS_CHILDREN_PY = Path(__file__).with_name("errors_children.py")


@needs_root
@needs_setpriv
@pytest.mark.timeout(60)
def test_without_cap_sys_ptrace_regions_work_and_a_forked_child_does_not_inherit_them(random_file):
    """No CAP_SYS_PTRACE: UFFDIO_API refuses EVENT_FORK, so regions do not
    follow fork(). They still map, fill, write back; the library says so in
    one line; a forked child does not have the memory at all (MADV_DONTFORK:
    a SIGSEGV, never zeros), and a request about it says why."""
    path = random_file(4 * PAGE)
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
         sys.executable, str(ERRORS_CHILDREN_PY), "without-ptrace", f"file://{path}"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    child, parent = (json.loads(line) for line in result.stdout.splitlines())
    assert not parent["caps"] & 1 << CAP_SYS_PTRACE, "the child still has CAP_SYS_PTRACE"
    assert (parent["flushed"], parent["read_back"], parent["regions"]) == (1, "hello", 0), parent
    assert path.read_bytes()[:5] == b"hello"
    assert parent["child_signal"] == signal.SIGSEGV, f"the forked child's access ended with {parent}"
    error_type, message = child["child_error"]
    assert error_type == "PagerGone" and "does not follow fork()" in message, child
    assert result.stderr.count("no CAP_SYS_PTRACE") == 1, result.stderr


@pytest.mark.timeout(60)
def test_on_a_kernel_without_wp_async_sync_tracking_is_chosen_and_said(random_file):
    """As on Linux < 6.7 (UFFD_FEATURE_WP_ASYNC hidden from the library in
    a subprocess): the default tracking is "sync", said in one line, and
    works; "async" asked for explicitly is refused naming "sync"."""
    path = random_file(4 * PAGE)
    result = subprocess.run([sys.executable, str(ERRORS_CHILDREN_PY), "older-kernel", f"file://{path}"],
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, UFFD_PAGER_HIDE_FEATURES="WP_ASYNC"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["tracking"], report["flushed"], report["regions"]) == ("sync", 1, 0), report
    assert path.read_bytes()[:5] == b"older"
    error_type, message = report["async"]
    assert error_type == "OSError" and 'dirty_tracking="sync"' in message and "WP_ASYNC" in message, report
    assert result.stderr.count("lacks UFFD_FEATURE_WP_ASYNC") == 1, result.stderr


@pytest.mark.timeout(60)
def test_on_a_kernel_without_uffdio_poison_a_page_that_cannot_be_filled_is_sigbus_for_its_thread(tmp_path):
    """As on Linux < 6.6 (UFFD_FEATURE_POISON hidden from the pager): a
    page whose ciphertext was altered is never handed out, and the thread
    that touched it, not another, gets SIGBUS at once (never a hang)."""
    store = tmp_path / "store"
    store.write_bytes(bytes(2 * PAGE))
    result = subprocess.run([sys.executable, str(ERRORS_CHILDREN_PY), "no-poison", f"file://{store}"],
                            capture_output=True, text=True, timeout=45, cwd="/",
                            env=dict(os.environ, UFFD_PAGER_HIDE_FEATURES="POISON"))
    assert result.returncode == -signal.SIGBUS, f"{describe_returncode(result.returncode)}\n{result.stderr[-3000:]}"
    assert json.loads(result.stdout) == {"page0": 0x5A}, result.stdout
    assert "Fatal Python error: Bus error" in result.stderr, result.stderr[-3000:]
    current = result.stderr.split("Current thread", 1)[1].split("\n\n", 1)[0]
    assert "touch_page" in current, f"the SIGBUS reached another thread than the faulting one:\n{result.stderr[-3000:]}"
    assert "SIGBUS to the faulting thread (this kernel has no UFFDIO_POISON)" in result.stderr, result.stderr[-3000:]


@pytest.mark.timeout(60)
def test_a_uffd_pager_directory_in_the_applications_working_directory_does_not_shadow_the_pager(tmp_path):
    """The private pager is `python -P -m uffd_pager`: a directory of that
    name where the application runs (a checkout, a namesake) is not it."""
    impostor = tmp_path / "cwd" / "uffd_pager"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("")
    (impostor / "__main__.py").write_text("raise SystemExit('the impostor ran')\n")
    store = tmp_path / "store"
    store.write_bytes(b"\x77" * PAGE)
    result = subprocess.run([sys.executable, str(ERRORS_CHILDREN_PY), "embedded-read", f"file://{store}"],
                            capture_output=True, text=True, timeout=45, cwd=impostor.parent)
    assert result.returncode == 0 and "impostor" not in result.stderr, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"first": 0x77}


def test_every_name_the_readme_gives_as_uffd_pager_dot_something_exists():
    """The README's `uffd_pager.LimitExceeded` and the like: a user catches
    what it says, so each must be importable from the package itself."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    named = set(re.findall(r"`uffd_pager\.([A-Z]\w*)", readme))
    assert {"LimitExceeded", "PagerTimeout", "StoreReadOnly"} <= named
    missing = sorted(name for name in named if not hasattr(uffd_pager, name))
    assert missing == [], f"the README names uffd_pager.{missing} which the package lacks"
