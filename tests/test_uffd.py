"""The typed userfaultfd wrapper (`uffd_pager.uffd`) on its own: the ioctls
the pager's hot path does not exercise. Each test resolves its pages before
touching them, so no access here waits for a handler; the watchdog in
conftest ends the run if one ever does."""
from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from uffd_pager.uffd import PAGE_SIZE, Feature, RegisterMode, Uffd, available_features, buffer_address

PAGE = PAGE_SIZE
# Child processes, one function each (run as `python uffd_children.py NAME`).
UFFD_CHILDREN_PY = Path(__file__).with_name("uffd_children.py")


def anonymous(pages: int) -> mmap.mmap:
    return mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def test_the_kernel_offers_every_feature_the_pager_relies_on():
    needed = (Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
              | Feature.THREAD_ID | Feature.PAGEFAULT_FLAG_WP | Feature.WP_ASYNC | Feature.POISON | Feature.MOVE)
    assert needed & ~available_features() == 0


@pytest.mark.timeout(30)
def test_move_puts_a_page_of_another_mapping_in_place():
    uffd = Uffd.create(Feature.MOVE)
    source, target = anonymous(1), anonymous(1)
    try:
        source[:] = b"moved!" * (PAGE // 6) + b"\0" * (PAGE % 6)
        expected = bytes(source)
        uffd.register(buffer_address(target), PAGE, RegisterMode.MISSING)
        assert uffd.move(buffer_address(target), buffer_address(source), PAGE) == PAGE
        assert bytes(target) == expected
        assert bytes(source) == bytes(PAGE), "the page left its old place: it reads as a fresh zero page there"
    finally:
        uffd.close()
        source.close()
        target.close()


@pytest.mark.timeout(30)
def test_copy_into_a_filled_page_fails_with_eexist():
    uffd = Uffd.create(Feature(0))
    memory = anonymous(1)
    try:
        address = buffer_address(memory)
        uffd.register(address, PAGE, RegisterMode.MISSING)
        assert uffd.copy(address, b"a" * PAGE) == PAGE
        with pytest.raises(FileExistsError):
            uffd.copy(address, b"b" * PAGE)
        assert bytes(memory) == b"a" * PAGE
    finally:
        uffd.close()
        memory.close()


@pytest.mark.timeout(30)
def test_continue_maps_the_page_cache_page_of_a_minor_fault_range():
    # Two mappings of one memfd: the page written through the plain one is in
    # the page cache, and CONTINUE maps it into the registered one.
    uffd = Uffd.create(Feature.MINOR_SHMEM)
    fd = os.memfd_create("uffd-pager-test")
    try:
        os.ftruncate(fd, PAGE)
        plain = mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED)
        minor = mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED)
        plain[:5] = b"shmem"
        uffd.register(buffer_address(minor), PAGE, RegisterMode.MINOR)
        assert uffd.continue_(buffer_address(minor), PAGE) == PAGE
        assert minor[:5] == b"shmem"
        plain.close()
        minor.close()
    finally:
        uffd.close()
        os.close(fd)


@pytest.mark.timeout(60)
def test_a_poisoned_page_raises_sigbus_on_access():
    # The "poisoned-page" function of tests/uffd_children.py.
    result = subprocess.run([sys.executable, str(UFFD_CHILDREN_PY), "poisoned-page"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == -signal.SIGBUS, result.stderr
    assert result.stdout.split() == ["0"]


def test_a_failed_ioctl_raises_oserror_with_its_errno_and_what_it_did():
    uffd = Uffd.create(Feature(0))
    try:
        with pytest.raises(OSError) as failure:
            uffd.register(4095, PAGE, RegisterMode.MISSING)  # not page aligned
        assert failure.value.errno == errno.EINVAL
        assert "UFFDIO_REGISTER" in str(failure.value)
    finally:
        uffd.close()
