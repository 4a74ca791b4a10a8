"""Every error of the package's own: one base, `PagerError`, with
subclasses that are also the builtin a caller would catch (a dead pager is
a ConnectionError, a late answer a TimeoutError), as pynacl does."""
from __future__ import annotations


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
