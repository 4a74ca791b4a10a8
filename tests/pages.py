"""Comparing memory page by page: shared by the tests and their child
processes (plain Python, importable from either)."""
from __future__ import annotations

PAGE = 4096


def differing_pages(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview,
                    limit: int = 20) -> list[int]:
    """Indices of the pages where a and b differ (the first `limit` of them)."""
    a, b = bytes(a), bytes(b)
    assert len(a) == len(b), f"lengths differ: {len(a)} != {len(b)}"
    out = []
    for p in range(len(a) // PAGE):
        if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]:
            out.append(p)
            if len(out) >= limit:
                break
    return out
