"""The package as a user gets it: a wheel and an sdist built from a clean
clone of this checkout's HEAD, installed in a fresh venv, and a few of the
tests run from the unpacked sdist with that venv (then again with the wheel
installed over it). Needs a git checkout; uses the network, or pip's cache,
for the fresh venv's packages."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"

# From the unpacked sdist: a private pager's fill, a daemon configured by a
# file, and the systemd units as installed (package data).
SUBSET = [
    "test_fill.py::test_holes_and_pages_past_eof_read_as_zero",
    "test_config.py::test_config_file_sets_the_socket_and_the_limits",
    "test_systemd.py::test_shipped_units_are_valid_and_activate_the_daemon",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / ".git").exists(), reason="builds from a git clone of this checkout"),
]


def run(*command: str | Path, cwd: Path | None = None, timeout: float = 240) -> str:
    """Runs `command`, failing the test with its output unless it succeeds; its output."""
    env = {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-5000:]}"
    return result.stdout


@dataclass
class Built:
    clone: Path
    wheel: Path
    sdist: Path
    log: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A wheel and an sdist of HEAD, built without build isolation (this
    venv's setuptools and cffi: offline, and the same each time)."""
    top = tmp_path_factory.mktemp("packaging")
    clone = top / "clone"
    run("git", "clone", "--quiet", "--no-hardlinks", ROOT, clone)
    run("git", "-C", clone, "checkout", "--quiet", "--detach", run("git", "-C", ROOT, "rev-parse", "HEAD").strip())
    dist = top / "dist"
    log = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, clone)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    return Built(clone, wheels[0], sdists[0], log)


def test_wheel_is_tagged_abi3_and_carries_units_and_license(built: Built) -> None:
    # the extension is built on the limited API (_native.abi3.so): one wheel for 3.11 and later
    assert built.wheel.name == f"uffd_pager-{VERSION}-cp311-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        info = f"uffd_pager-{VERSION}.dist-info"
        assert wheel.read(f"{info}/WHEEL").decode().count("Tag: cp311-abi3-") == 1
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert "uffd_pager/_native.abi3.so" in names
    assert {"uffd_pager/systemd/uffd-pager.service", "uffd_pager/systemd/uffd-pager.socket",
            f"{info}/licenses/LICENSE"} <= names
    assert "\nLicense-Expression: MIT\n" in metadata and "\nLicense: " not in metadata
    assert "SetuptoolsDeprecationWarning" not in built.log and "project.license" not in built.log, built.log


def test_sdist_ships_the_tests_and_the_native_sources(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    tracked = run("git", "-C", built.clone, "ls-files", "tests", "native").split()
    missing = [path for path in tracked if path not in names]
    assert not missing, f"tracked files not in the sdist: {missing}"
    assert {"tests/conftest.py", "tests/support.py", "LICENSE", "constraints.txt", "test.sh",
            "uffd_pager/systemd/uffd-pager.service"} <= names


@pytest.mark.timeout(600)
def test_sdist_and_wheel_install_in_a_fresh_venv_and_pass_tests_from_the_sdist(built: Built,
                                                                               tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    constraints = built.clone / "constraints.txt"
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    run(python, "-m", "pip", "install", "-q", "-c", constraints, "--upgrade", "pip")
    # as a user would: build isolation, [build-system]'s pinned setuptools and cffi
    run(python, "-m", "pip", "install", "-q", "-c", constraints, f"{built.sdist}[test]")
    with tarfile.open(built.sdist) as sdist:
        sdist.extractall(tmp_path, filter="data")
    tests = tmp_path / f"uffd_pager-{VERSION}" / "tests"
    assert (tests / "conftest.py").exists()

    def run_subset(label: str) -> None:
        # From tests/, not the sdist's top: there `python -m` would import the unbuilt uffd_pager/ first.
        output = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", tmp_path / label,
                     *SUBSET, cwd=tests)
        assert f"{len(SUBSET)} passed" in output, output

    assert run(venv / "bin" / "uffd-pager", "--version").strip() == f"uffd-pager {VERSION}"
    run_subset("from-sdist")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", built.wheel)
    run_subset("from-wheel")
