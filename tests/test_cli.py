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
import sysconfig
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
    for run in range(10):
        result = subprocess.run([str(BUILD_DEPS)], env={"PATH": path}, capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stderr) == (0, ""), f"run {run}: {result.stderr}"
    # ldconfig once died of SIGPIPE in about 4% of runs (its output piped into
    # `grep -q`, which quits at the first match): an ldconfig that names
    # libcrypto first and writes on after a pause dies of it every time then.
    _fake_command(fake, "ldconfig", f'echo "\tlibcrypto.so.3 (libc6,x86-64) => /x"; sleep 0.2; '
                                    f'i=0; while [ $i -lt 2000 ]; do echo "\tlibz.so.$i => /y"; i=$((i+1)); done')
    result = subprocess.run([str(BUILD_DEPS)], env={"PATH": path}, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert not (tmp_path / "apt-get.log").exists()


def _python_as_debian_ships_it(directory: Path) -> None:
    """A python3 command in `directory` as a fresh Debian has it: this
    interpreter over its standard library without ensurepip (Debian moves it
    to python3-venv) and without the headers (python3-dev)."""
    home = directory / "python-home"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (home / "lib" / version).mkdir(parents=True)
    (home / "include" / version).mkdir(parents=True)
    stdlib = Path(sysconfig.get_path("stdlib"))
    for entry in stdlib.iterdir():
        if entry.name != "ensurepip":
            (home / "lib" / version / entry.name).symlink_to(entry)
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    _fake_command(directory, "python3", f'PYTHONHOME="{home}" exec "{interpreter}" "$@"')


@pytest.mark.timeout(120)
@pytest.mark.parametrize("python, wanted", [
    ("debian", "python3-venv python3-dev"),
    ("absent", "python3 python3-venv python3-dev"),
])
def test_build_deps_installs_what_python_lacks_to_build(tmp_path: Path, python: str, wanted: str) -> None:
    ldconfig = shutil.which("ldconfig", path=f"{os.environ['PATH']}:/usr/sbin:/sbin") or "ldconfig"
    if "libcrypto.so.3 " not in subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout:
        pytest.skip("this machine lacks libcrypto.so.3: the script rightly wants libssl3 too")
    # root, gcc present, an apt-get that logs; on PATH nothing else but bash (and python3 if not absent)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bash").symlink_to(shutil.which("bash"))
    _fake_command(fake, "gcc", "exit 0")
    _fake_command(fake, "id", 'if [ "$1" = -u ]; then echo 0; else exit 1; fi')
    _fake_command(fake, "apt-get", f'echo "$*" >> "{tmp_path}/apt-get.log"')
    if python == "debian":
        _python_as_debian_ships_it(fake)
        assert subprocess.run([fake / "python3", "-c", "import json"], timeout=30).returncode == 0
    result = subprocess.run([str(BUILD_DEPS)], env={"PATH": str(fake)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt-get.log").read_text().splitlines() == [
        "update -qq", f"install -y -qq --no-upgrade {wanted}"]


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
