"""Where each page of a region lives in its backing store.

A region of `size` bytes over a store at `offset` is its first portion:
page i lives at offset + i * PAGE_SIZE.
"""
from __future__ import annotations

from uffd_pager.uffd import PAGE_SIZE


def check_geometry(size: int, offset: int) -> None:
    """The one place region geometry is validated (the client before it creates anything, the pager again)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive number of bytes, not {size!r}")
    if size % PAGE_SIZE:
        raise ValueError(f"size {size} is not a multiple of the page size {PAGE_SIZE}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative number of bytes, not {offset!r}")
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of the page size {PAGE_SIZE}")
