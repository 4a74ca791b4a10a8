"""The compiled C layer (``native/``), loaded without any fallback.

If the extension was not built, importing this module fails loudly: a
package without its C layer must not look installed.
"""
from uffd_pager._native import ffi, lib

__all__ = ["ffi", "lib"]
