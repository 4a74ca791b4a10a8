"""Pytest fixtures for real Redis servers (see redis_servers.py). Loaded as a
plugin from tests/conftest.py: `pytest_plugins = ["redis_fixtures"]`.

Session-scoped servers start only when a test first asks for them, and are
shared: a test that kills, restarts or fills a server takes a private one
(`private_redis_server`, `make_redis_server(...)`, `private_redis_cluster`).
Keys of shared servers are kept apart by `redis_name`, unique per test.
"""
from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Iterator

import pytest

from redis_servers import RedisCluster, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A shared redis-server on a free 127.0.0.1 TCP port, no persistence."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_unix_server() -> Iterator[RedisServer]:
    """A shared redis-server on a Unix socket only (`port 0`)."""
    with RedisServer(unix=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A shared 3-master Redis Cluster (no replicas)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    """A TCP redis-server of this test's own: kill it, restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """make_redis_server(unix=False, appendonly=False, extra_config=None) ->
    a started private RedisServer; all stopped at teardown."""
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)  # before start(): a failed start is cleaned up too
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def private_redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster of this test's own (kill_node, restart_node)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_name(request: pytest.FixtureRequest) -> str:
    """A pseudo-file name no other test uses: the test's name, made URL-safe, and a random tail."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:48]
    return f"{stem}-{uuid.uuid4().hex[:8]}"
