"""The interface every backing store implements."""
from __future__ import annotations

import abc


class Store(abc.ABC):
    """Pages of a region live in a store at byte offsets."""

    url: str

    @classmethod
    @abc.abstractmethod
    def open(cls, url: str) -> "Store":
        """Opens the store named by url, raising a clear error if it cannot."""

    @property
    @abc.abstractmethod
    def fill_fd(self) -> int:
        """A descriptor the C fill path may pread() pages from, or -1 when
        pages must come through Python (remote or transformed stores)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the store's resources; the store is unusable afterwards."""
