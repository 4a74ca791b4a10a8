"""Every error of the package's own: one base, `PagerError`, with
subclasses that are also the builtin a caller would catch (a dead pager is
a ConnectionError, a late answer a TimeoutError), as pynacl does."""
from __future__ import annotations

import errno


class PagerError(Exception):
    """The base of every error that is the pager's, not the caller's."""


class ProtocolError(PagerError):
    """The peer sent something that is not this protocol."""


class PagerGone(ConnectionError, PagerError):
    """The pager process went away (killed, crashed, or stopped)."""


class PagerTimeout(TimeoutError, PagerError):
    """The pager did not answer a request in time."""


class DescriptorsDropped(OSError, PagerError):
    """A message arrived without the descriptors it carried."""


class StoreReadOnly(PermissionError, PagerError):
    """The store's descriptor was opened read-only: write-back needs one
    opened for writing (the client reopens the file and retries)."""


class LimitExceeded(OSError, PagerError):
    """A tenant limit of the pager (regions, bytes mapped) would be exceeded."""


class StoreUnavailable(ConnectionError, PagerError):
    """The store cannot be reached now (a server down, a timeout): the
    operation may succeed if retried later."""


class StoreLost(OSError, PagerError):
    """A remote server no longer holds the pseudo file this pager wrote (it
    came back empty, or another took its name): its pages must not read as
    zero. Not retried: it does not come back by waiting."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENODATA, message)
