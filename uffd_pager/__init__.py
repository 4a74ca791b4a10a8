"""uffd_pager: memory regions whose pages live in a backing store, filled on
first touch through userfaultfd by a pager in another process.

    import uffd_pager
    with uffd_pager.Pager() as pager, pager.map("file:///data.bin", 1 << 30) as region:
        data = region.view()
"""
from uffd_pager.client import Pager, connect
from uffd_pager.crypto import Key
from uffd_pager.errors import (DescriptorsDropped, LimitExceeded, PagerError, PagerTimeout, StoreLost, StoreReadOnly,
                               StoreUnavailable)
from uffd_pager.protocol import PagerGone, ProtocolError
from uffd_pager.region import Backing, Region
from uffd_pager.stores import forget_store
from uffd_pager.uffd import PAGE_SIZE

__all__ = ["Pager", "connect", "Region", "Backing", "Key", "PagerGone", "PagerTimeout", "ProtocolError", "PagerError",
           "DescriptorsDropped", "LimitExceeded", "StoreLost", "StoreReadOnly", "StoreUnavailable", "forget_store",
           "PAGE_SIZE"]
