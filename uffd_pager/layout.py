"""Where each page of a region lives in its backing store.

A region of `size` bytes over a store at `offset` is its first portion:
page i lives at offset + i * PAGE_SIZE.
"""
from __future__ import annotations

from uffd_pager.uffd import PAGE_SIZE, Tracking

# map(dirty_tracking=...) names -> the kernel mechanism behind them.
TRACKING_MODES = {"async": Tracking.ASYNC_WP, "sync": Tracking.SYNC_WP}
DEFAULT_WRITEBACK_INTERVAL = 5.0


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


def tracking_name(tracking: Tracking) -> str:
    return next((name for name, mode in TRACKING_MODES.items() if mode == tracking), "none")


def parse_tracking(name: object) -> Tracking:
    try:
        return TRACKING_MODES[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"dirty_tracking must be one of {', '.join(TRACKING_MODES)}, not {name!r}") from None


def parse_writeback_interval(seconds: object) -> float:
    """Seconds between timed write-backs; 0 or None turns the timer off."""
    if seconds is None:
        return 0.0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"writeback_interval must be a number of seconds >= 0 (0: off), not {seconds!r}")
    return float(seconds)
