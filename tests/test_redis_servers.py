"""The Redis test infrastructure itself (redis_servers.py, redis_fixtures.py):
real servers start, answer, die, come back empty or with their data, and
leave nothing behind."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from redis_servers import RedisCluster, RedisServer, RedisServerError, _info_fields, _pid_alive

TESTS = Path(__file__).resolve().parent


def test_tcp_server_sets_and_gets(redis_server: RedisServer, redis_name: str) -> None:
    assert redis_server.host == "127.0.0.1" and redis_server.unix_path is None
    assert redis_server.url_for(redis_name) == f"redis://127.0.0.1:{redis_server.port}/{redis_name}"
    c = redis_server.client()
    c.set(redis_name, b"\0" * 4096)
    assert c.get(redis_name) == b"\0" * 4096
    assert c.config_get("save") == {"save": ""} and c.config_get("appendonly") == {"appendonly": "no"}


def test_unix_server_sets_and_gets(redis_unix_server: RedisServer, redis_name: str) -> None:
    path = redis_unix_server.unix_path
    assert path is not None and Path(path).is_socket()
    assert redis_unix_server.url_for(redis_name) == f"redis+unix://{path}?name={redis_name}"
    assert redis_unix_server.host is None and redis_unix_server.port is None
    c = redis_unix_server.client()
    assert c.config_get("port") == {"port": "0"}  # no TCP at all
    c.set(redis_name, b"page")
    assert c.get(redis_name) == b"page"


def test_cluster_spreads_keys_over_every_master(redis_cluster: RedisCluster, redis_name: str) -> None:
    masters = redis_cluster.masters()
    assert masters == redis_cluster.addresses and len(masters) == 3
    assert redis_cluster.url_for(redis_name) == f"redis+cluster://{','.join(masters)}/{redis_name}"
    before = redis_cluster.keys_per_master()
    c = redis_cluster.client()
    for i in range(1000):
        c.set(f"{redis_name}:{i}", b"x")
    assert c.get(f"{redis_name}:999") == b"x"
    after = redis_cluster.keys_per_master()
    added = {a: after[a] - before[a] for a in masters}
    assert sum(added.values()) == 1000
    assert all(n > 200 for n in added.values()), added  # ~333 each over 16384 slots in thirds


def test_kill_then_restart_empty_comes_back_empty(private_redis_server: RedisServer) -> None:
    server = private_redis_server
    port, pid = server.port, server.pid
    server.client().set("k", b"v")
    server.kill()
    assert not server.alive
    with pytest.raises(OSError):
        server.command("PING")
    server.restart(empty=True)
    assert (server.port, server.alive) == (port, True) and server.pid != pid
    assert server.client().dbsize() == 0


def test_restart_keeps_data_with_appendonly(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(appendonly=True)
    c = server.client()
    c.set("k", b"v" * 4096)
    server.kill()  # no SHUTDOWN: only the AOF (appendfsync always) has the data
    server.restart(empty=False)
    assert server.client().get("k") == b"v" * 4096
    server.restart(empty=True)
    assert server.client().dbsize() == 0


def test_graceful_restart_keeps_data_without_appendonly(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(unix=True)
    path = server.unix_path
    c = server.client()
    c.set("k", b"v")
    server.restart(empty=False)  # SHUTDOWN SAVE, then start on the same socket
    assert server.unix_path == path and c.get("k") == b"v"  # the client reconnects
    c.set("k2", b"v2")
    server.kill()
    server.restart(empty=False)  # killed: back to the last snapshot (a rolled-back appliance)
    assert c.get("k") == b"v" and c.get("k2") is None


def test_stop_leaves_nothing(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    pid, root = server.pid, server.root
    server.stop()
    server.stop()  # idempotent
    assert not _pid_alive(pid) and not root.exists()
    with pytest.raises(RedisServerError):
        server.start()


def test_start_failure_names_the_cause() -> None:
    server = RedisServer(extra_config={"no-such-directive": "1"})
    with pytest.raises(RedisServerError, match="(?s)exited at start.*no-such-directive"):
        with server:
            pass
    assert not server.root.exists()


def test_servers_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        from redis_servers import RedisServer
        server = RedisServer().start()
        print(server.pid, server.root, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no stop()
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr
    pid, root = child.stdout.split()
    deadline = time.monotonic() + 10
    while _pid_alive(int(pid)):
        assert time.monotonic() < deadline, f"redis-server {pid} outlived its parent"
        time.sleep(0.02)
    shutil.rmtree(root, ignore_errors=True)  # a later run's sweep would remove it too


def test_cluster_node_killed_then_back_empty(private_redis_cluster: RedisCluster) -> None:
    cluster = private_redis_cluster
    c = cluster.client()
    for i in range(100):
        c.set(f"k{i}", b"v")
    assert sum(cluster.keys_per_master().values()) == 100
    cluster.kill_node(0)
    survivor = cluster.nodes[1]
    deadline = time.monotonic() + 15
    while _info_fields(survivor.command("CLUSTER", "INFO")).get("cluster_state") != "fail":
        assert time.monotonic() < deadline, "the cluster never noticed the killed node"
        time.sleep(0.05)
    cluster.restart_node(0, empty=True)
    counts = cluster.keys_per_master()
    assert counts[cluster.addresses[0]] == 0 and sum(counts.values()) > 0


@pytest.mark.parametrize("case", ["a/b c", "x"])
def test_redis_name_is_unique_and_url_safe(redis_name: str, case: str) -> None:
    assert redis_name.startswith("test_redis_name_is_unique_and_url_safe-")
    assert redis_name.replace("-", "").replace("_", "").replace(".", "").isalnum()
