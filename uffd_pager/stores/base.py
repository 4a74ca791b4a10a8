"""The interface every backing store implements."""
from __future__ import annotations

import abc
from typing import Any

from uffd_pager.uffd import Run


class Store(abc.ABC):
    """Pages of a region live in a store at byte offsets."""

    url: str
    # True when fill_fd holds the pages as they are, so the C paths may
    # pread them and copy_file_range them between portions; False when every
    # page must go through read_page/write_runs (an encrypted store).
    direct: bool = True
    key_id: str | None = None  # the id of the key an encrypted store is under

    @classmethod
    @abc.abstractmethod
    def open(cls, url: str) -> "Store":
        """Opens the store named by url, raising a clear error if it cannot."""

    @property
    @abc.abstractmethod
    def fill_fd(self) -> int:
        """A descriptor the C fill path may pread() pages from, or -1 when
        pages must come through Python (remote or transformed stores)."""

    @property
    @abc.abstractmethod
    def identity(self) -> tuple[object, ...]:
        """Equal for two stores opened on the same data (portions in one
        store must not overlap, whichever region placed them)."""

    @abc.abstractmethod
    def end(self) -> int:
        """The byte offset past the store's current data."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Makes a range read as zero (a portion slot being reused)."""

    @abc.abstractmethod
    def read_page(self, offset: int) -> bytes:
        """The page at byte offset: PAGE_SIZE bytes, zeros where the store
        has none. Raises PageAuthError for a page that fails authentication."""

    def sealing(self) -> tuple[Any, int, bytes] | None:
        """For an encrypted store: what the C fill path needs to open its
        pages itself (the AES-GCM context, the catalog's descriptor, the
        store's id); None for a store whose pages are stored as they are."""
        return None

    def holds(self, offset: int) -> bool:
        """False only where the store knows it has no data (the page reads as
        zero and copying it is needless)."""
        return True

    @abc.abstractmethod
    def write_runs(self, runs: list[Run], data: bytes | bytearray | memoryview) -> None:
        """Writes each run's bytes (back to back in data) at its store offset.
        Blocking: the pager calls it from a worker thread."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Makes every write so far durable (fsync semantics). Blocking."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the store's resources; the store is unusable afterwards."""
