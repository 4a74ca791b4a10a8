"""The command line as a user runs it: `uffd-pager ...` in a subprocess, and
native/build-deps.sh, which ./run.sh and ./test.sh run first. `uffd-pager bench`
has its own: test_bench_cli.py."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import assert_usage_error, run_cli
from uffd_pager.__main__ import build_parser

BUILD_DEPS = Path(__file__).resolve().parents[1] / "native" / "build-deps.sh"


# --- native/build-deps.sh ------------------------------------------------------------------


def _fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system_path", ["inherited", "/usr/bin:/bin"], ids=["inherited-PATH", "PATH-without-sbin"])
def test_build_deps_installs_nothing_that_is_present(tmp_path: Path, system_path: str) -> None:
    ldconfig = shutil.which("ldconfig", path=f"{os.environ['PATH']}:/usr/sbin:/sbin") or "ldconfig"
    libraries = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    if "libcrypto.so.3 " not in libraries:
        pytest.skip("this machine lacks libcrypto.so.3: the script rightly wants libssl3")
    # gcc "exists"; a user who is not root; an apt-get that tells on the script.
    fake = tmp_path / "bin"
    fake.mkdir()
    _fake_command(fake, "gcc", "exit 0")
    _fake_command(fake, "id", 'if [ "$1" = -u ]; then echo 1000; else exec /usr/bin/id "$@"; fi')
    _fake_command(fake, "apt-get", f'echo "apt-get $*" >> "{tmp_path}/apt-get.log"; exit 1')
    path = f"{fake}:{os.environ['PATH'] if system_path == 'inherited' else system_path}"
    # ldconfig died of SIGPIPE in about 4% of runs: 300 runs all pass by chance about once in 10^5.
    for run in range(300):
        result = subprocess.run([str(BUILD_DEPS)], env={"PATH": path}, capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stderr) == (0, ""), f"run {run}: {result.stderr}"
    assert not (tmp_path / "apt-get.log").exists()


# --- keygen ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_keygen_refuses_to_append_a_second_key(tmp_path: Path) -> None:
    key_file = tmp_path / "existing.key"
    assert run_cli("keygen", "--out", str(key_file)).returncode == 0
    key_file.chmod(0o640)
    before = key_file.read_bytes()
    with open(key_file, "ab") as stdout:  # uffd-pager keygen >> existing.key
        result = run_cli("keygen", stdout=stdout)
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    assert key_file.read_bytes() == before
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640, "the refused file's mode was changed"


@pytest.mark.timeout(60)
def test_keygen_appends_to_an_empty_file(tmp_path: Path) -> None:
    key_file = tmp_path / "new.key"
    key_file.touch(mode=0o644)
    with open(key_file, "ab") as stdout:
        assert run_cli("keygen", stdout=stdout).returncode == 0
    assert key_file.read_text().count("\n") == 1
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# --- --log-level ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, level", [
    (["keygen"], "WARNING"),
    (["--log-level", "debug", "keygen"], "DEBUG"),
    (["keygen", "--log-level", "Info"], "INFO"),
    (["--log-level", "DEBUG", "keygen", "--log-level", "error"], "ERROR"),
])
def test_log_level_before_or_after_the_command(argv: list[str], level: str) -> None:
    assert build_parser().parse_args(argv).log_level == level


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["before", "after"])
def test_serve_logs_at_the_level_given(tmp_path: Path, where: str) -> None:
    socket_path = tmp_path / "pager.sock"
    level, serve = ["--log-level", "info"], ["serve", "--socket", str(socket_path)]
    argv = level + serve if where == "before" else serve + level
    daemon = subprocess.Popen([sys.executable, "-m", "uffd_pager", *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)  # it may not have its handler yet: only the log matters here
        _, stderr = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
        daemon.wait()
    assert daemon.returncode in (0, -signal.SIGTERM), stderr
    assert f"INFO listening on {socket_path}" in stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["--log-level", "FOO", "keygen"], ["keygen", "--log-level", "FOO"]],
                         ids=["before", "after"])
def test_unknown_log_level_is_a_usage_error(argv: list[str]) -> None:
    assert_usage_error(run_cli(*argv), "--log-level", "'FOO'", "DEBUG")


# --- help --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["", "serve", "bench", "keygen", "status"])
def test_help_reads_as_plain_text(command: str) -> None:
    result = run_cli(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "`" not in result.stdout, result.stdout
    description = result.stdout.split("\n\n")[1]
    assert description[0].isupper() and description.rstrip().endswith("."), result.stdout
