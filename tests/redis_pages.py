"""Plain helpers for the Redis-store tests (tests/test_redis.py) and their
child processes (tests/redis_scenarios.py): the pages the tests write, and
a look at a pseudo file straight through the server's keys, without any
pager (the layout of uffd_pager/stores/redis.py: the chunk at byte
c * 65536 of NAME is the hash ``up:NAME:c``, field ``i`` its page i; a page
that is no field reads as zero).

No pytest here: the child processes import it too.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

PAGE = 4096
CHUNK_PAGES = 16
CHUNK = CHUNK_PAGES * PAGE
ZERO_PAGE = bytes(PAGE)


def pattern(tag: str, page: int) -> bytes:
    """A page of bytes naming its tag and page (the same in every process)."""
    return hashlib.sha256(f"{tag}:{page}".encode()).digest() * (PAGE // 32)


def pages_with(base: bytes | bytearray, tag: str, pages: Iterable[int]) -> bytearray:
    """base with each of `pages` replaced by pattern(tag, page)."""
    out = bytearray(base)
    for p in pages:
        out[p * PAGE:(p + 1) * PAGE] = pattern(tag, p)
    return out


def all_pattern(tag: str, npages: int) -> bytes:
    return b"".join(pattern(tag, p) for p in range(npages))


# --- the pseudo file, read through the server's keys ---------------------------------------


def chunk_key(name: str, chunk: int) -> str:
    return f"up:{name}:{chunk}"


def raw_values(client: Any, name: str, offset: int, size: int) -> list[bytes | None]:
    """The values the server holds for the pages of [offset, offset + size)
    of pseudo file `name` (None: no field), one per page. `client` is a sync
    redis.Redis or redis.cluster.RedisCluster."""
    assert offset % PAGE == 0 and size % PAGE == 0
    wanted: dict[int, list[int]] = {}
    for page_offset in range(offset, offset + size, PAGE):
        wanted.setdefault(page_offset // CHUNK, []).append(page_offset)
    pipe = client.pipeline(transaction=False)
    for chunk, members in wanted.items():
        pipe.hmget(chunk_key(name, chunk), [str((o % CHUNK) // PAGE) for o in members])
    replies = pipe.execute()
    values: list[bytes | None] = []
    for reply in replies:
        values.extend(reply)
    return values


def pseudo_file_bytes(client: Any, name: str, offset: int, size: int) -> bytes:
    """What [offset, offset + size) of the pseudo file holds, as the layout
    says (no field: a zero page). A value of the wrong length is an error."""
    out = bytearray()
    for k, value in enumerate(raw_values(client, name, offset, size)):
        if value is None:
            out += ZERO_PAGE
        else:
            if len(value) != PAGE:
                raise ValueError(f"page {(offset // PAGE) + k} of {name!r} holds {len(value)} bytes")
            out += value
    return bytes(out)


def chunk_fields(client: Any, name: str, nchunks: int) -> dict[int, set[int]]:
    """{chunk: {page indexes with a field}} for the first nchunks chunks of
    `name` (chunks with no key left out)."""
    pipe = client.pipeline(transaction=False)
    for chunk in range(nchunks):
        pipe.hkeys(chunk_key(name, chunk))
    out = {}
    for chunk, fields in enumerate(pipe.execute()):
        if fields:
            out[chunk] = {int(f) for f in fields}
    return out


_CHUNK_KEY = re.compile(rb"up:(?P<name>.+):(?P<chunk>\d+)")


def chunk_keys_on(command: Any, name: str) -> list[int]:
    """The chunks of `name` that one server holds, by SCAN (command(*args)
    sends one command to that server; redis_servers.RedisServer.command)."""
    cursor = b"0"
    chunks = []
    while True:
        cursor, keys = command("SCAN", cursor, "MATCH", f"up:{name}:*", "COUNT", 1000)
        for key in keys:
            match = _CHUNK_KEY.fullmatch(key)
            if match and match["name"] == name.encode():
                chunks.append(int(match["chunk"]))
        if cursor == b"0":
            return chunks


def describe_page(data: bytes, expected: bytes) -> str:
    if data == expected:
        return "right"
    if data == ZERO_PAGE:
        return "zeros"
    return f"other bytes {data[:8].hex()}..."
