"""Adversarial tests of the fault path's Redis connection (redis_wire.py),
of RedisStore.read over it (redis.py), and of the fetcher that read-ahead
and prefetch feed (fetch.py), against real redis-server processes.

Comments "Was a bug (fixed)" name the product bug each such test caught."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import uvloop

from uffd_pager.fetch import MAX_BATCH, MAX_IN_FLIGHT, Fetcher
from uffd_pager.stores.redis import CHUNK_BYTES, RedisStore
from uffd_pager.stores.redis_wire import ReplyError, Wire
from uffd_pager.uffd import PAGE_SIZE


def wire_for(server, **kwargs) -> Wire:
    return Wire(host=server.host, port=server.port or 0, unix_path=server.unix_path, **kwargs)


def run(coro, limit: float = 30):
    return uvloop.run(asyncio.wait_for(coro, limit))


def clients_of(server) -> list[str]:
    """CLIENT LIST lines, the asking connection's own left out."""
    return [line for line in server.command("CLIENT", "LIST").decode().splitlines() if "cmd=client" not in line]


# --- redis_wire.Wire ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_server_closing_the_connection_fails_every_request_in_flight_at_once_then_reconnects(
        private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=20)
        try:
            assert await wire.request([(b"SET", b"a", b"1")]) == [b"OK"]
            # A BLPOP holds the connection; several requests queue behind it.
            blocked = [asyncio.ensure_future(wire.request([(b"BLPOP", b"nothing", 15)]))]
            blocked += [asyncio.ensure_future(wire.request([(b"GET", b"a"), (b"PING",)])) for _ in range(5)]
            await asyncio.sleep(0.2)
            start = time.monotonic()
            server.command("CLIENT", "KILL", "TYPE", "normal")
            results = await asyncio.gather(*blocked, return_exceptions=True)
            assert time.monotonic() - start < 2, "the in-flight requests waited for the timeout"
            assert all(isinstance(r, ConnectionError) for r in results), results
            assert await wire.request([(b"GET", b"a")]) == [b"1"]
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_cancelled_request_whose_reply_comes_late_does_not_shift_later_replies(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=5)
        try:
            assert await wire.request([(b"MSET", b"a", b"A", b"b", b"B", b"c", b"C")]) == [b"OK"]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                first = asyncio.ensure_future(wire.request([(b"GET", b"a"), (b"GET", b"a")]))
                second = asyncio.ensure_future(wire.request([(b"GET", b"b")]))
                await asyncio.sleep(0.1)
                first.cancel()
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await second == [b"B"]
            assert await wire.request([(b"GET", b"c")]) == [b"C"]
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_reply_arriving_after_the_timeout_is_never_given_to_a_later_request(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=0.3)
        try:
            assert await wire.request([(b"MSET", b"a", b"A", b"b", b"B")]) == [b"OK"]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    await wire.request([(b"GET", b"a")])
            finally:
                os.kill(server.pid, signal.SIGCONT)
            for _ in range(3):
                assert await wire.request([(b"GET", b"b")]) == [b"B"]
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(120)
def test_large_batches_and_many_large_requests_are_matched_under_write_backpressure(redis_server, redis_name):
    async def main() -> None:
        wire = wire_for(redis_server, timeout=30)
        try:
            values = {f"{redis_name}:{i}".encode(): os.urandom(96 * 1024 + i) for i in range(200)}
            answers = await asyncio.gather(*(wire.request([(b"SET", k, v), (b"STRLEN", k)])
                                             for k, v in values.items()))
            assert answers == [[b"OK", len(v)] for v in values.values()]
            keys = list(values)
            big = await wire.request([(b"GET", k) for k in keys] * 5)
            assert big == [values[k] for k in keys] * 5
            await wire.request([(b"DEL", *keys)])
        finally:
            wire.close()

    run(main(), 100)


@pytest.mark.timeout(60)
def test_an_error_reply_at_connect_time_noauth_is_a_reply_error_in_its_place(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        server.command("CONFIG", "SET", "requirepass", "pw")
        wire = wire_for(server, timeout=2)
        try:
            replies = await wire.request([(b"PING",), (b"GET", b"x")])
            assert all(isinstance(r, ReplyError) and "NOAUTH" in str(r) for r in replies), replies
        finally:
            wire.close()
            server.client(password="pw").config_set("requirepass", "")

    run(main())


# Was a bug (fixed): Wire._connected leaves a finished _connecting future behind when its only waiter was cancelled
@pytest.mark.timeout(60)
def test_a_request_cancelled_while_connecting_does_not_poison_the_next_reconnect(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=2)
        try:
            first = asyncio.ensure_future(wire.request([(b"PING",)]))
            await asyncio.sleep(0)  # it has started the connection attempt
            first.cancel()
            await asyncio.sleep(0.3)  # the attempt completes without its waiter
            assert await wire.request([(b"PING",)]) == [b"PONG"]
            server.command("CLIENT", "KILL", "TYPE", "normal")  # the server drops the connection
            await asyncio.sleep(0.3)
            assert await wire.request([(b"PING",)]) == [b"PONG"]  # "the next request makes a new one"
        finally:
            wire.close()

    run(main())


# Was a bug (fixed): _Protocol.send queues the request before packing the commands
@pytest.mark.timeout(60)
def test_a_command_that_cannot_be_packed_does_not_shift_the_replies_of_later_requests(redis_server):
    async def main() -> None:
        wire = wire_for(redis_server, timeout=2)
        try:
            assert await wire.request([(b"PING",)]) == [b"PONG"]
            with pytest.raises(TypeError):
                await wire.request([(b"GET", None)])  # type: ignore[list-item]
            assert await asyncio.wait_for(wire.request([(b"ECHO", b"mine")]), 1) == [b"mine"]
        finally:
            wire.close()

    run(main())


# Was a bug (fixed): Wire.request([]) queues a request of count 0 that no reply completes (len(replies) == 0 is never reached after an append)
@pytest.mark.timeout(60)
def test_an_empty_request_returns_at_once_and_does_not_block_the_connection(redis_server):
    async def main() -> None:
        wire = wire_for(redis_server, timeout=2)
        try:
            assert await wire.request([(b"PING",)]) == [b"PONG"]
            empty = asyncio.ensure_future(wire.request([]))
            try:
                assert await asyncio.wait_for(wire.request([(b"ECHO", b"mine")]), 1) == [b"mine"]
                assert await asyncio.wait_for(empty, 1) == []
            finally:
                wire.close()
                await asyncio.gather(empty, return_exceptions=True)
        finally:
            wire.close()

    run(main())


# Was a bug (fixed): Wire.close() while _connect awaits the AUTH/SELECT replies cancels _connect but never closes the protocol it made
@pytest.mark.timeout(60)
def test_closing_a_wire_while_it_says_hello_leaves_no_connection_open(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, db=1, timeout=10)
        os.kill(server.pid, signal.SIGSTOP)  # the kernel accepts; SELECT waits for its reply
        try:
            task = asyncio.ensure_future(wire.request([(b"PING",)]))
            await asyncio.sleep(0.3)
            wire.close()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.sleep(0.5)  # SELECT's reply arrives: the abandoned connection is now idle
        left = clients_of(server)
        assert left == [], f"connections still open after Wire.close(): {left}"

    run(main())


# --- RedisStore.read in a cluster -----------------------------------------------------


def _slot_owner(cluster, slot: int):
    """(node index, node id) of the master of slot."""
    for entry in cluster.nodes[0].command("CLUSTER", "SLOTS"):
        start, end, master = entry[0], entry[1], entry[2]
        if start <= slot <= end:
            port = master[1]
            index = next(i for i, n in enumerate(cluster.nodes) if n.port == port)
            return index, master[2].decode()
    raise AssertionError(f"slot {slot} not covered")


# Was a bug (fixed): in a cluster RedisStore.read goes to get_node_from_key(key)'s node over Wire and falls back to redis-py only on MOVED/ASK
@pytest.mark.timeout(120)
def test_a_cluster_read_follows_a_slot_whose_old_master_is_gone(private_redis_cluster, redis_name, tmp_path):
    cluster = private_redis_cluster
    url = cluster.url_for(redis_name) + "?timeout=0.5&deadline=3"
    page = os.urandom(PAGE_SIZE)

    async def main() -> None:
        store = await RedisStore.open(url, str(tmp_path / "state"))
        try:
            await store.write([(0, PAGE_SIZE)], page)
            key = f"up:{redis_name}:0".encode()
            slot = cluster.nodes[0].command("CLUSTER", "KEYSLOT", key)
            old, old_id = _slot_owner(cluster, slot)
            new = (old + 1) % len(cluster.nodes)
            new_id = cluster.nodes[new].command("CLUSTER", "MYID").decode()
            source, target = cluster.nodes[old], cluster.nodes[new]
            # Reshard the slot to another master (what redis-cli --cluster reshard does) ...
            target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
            source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
            source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key)
            for node in cluster.nodes:
                node.command("CLUSTER", "SETSLOT", slot, "NODE", new_id)
            for node in cluster.nodes:
                node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
            # ... then the old master goes away.
            cluster.kill_node(old)
            assert target.command("HGET", key, "0") == page  # the page is there, on a live master
            deadline = time.monotonic() + 3
            last: BaseException | None = None
            while time.monotonic() < deadline:  # as the fetcher retries, until the store's deadline
                try:
                    assert await store.read([0]) == [page]
                    return
                except ConnectionError as exc:
                    last = exc
                    await asyncio.sleep(0.1)
            raise AssertionError(f"the page was never read from its new master: {last}")
        finally:
            store.close()
            await asyncio.sleep(0.1)

    run(main(), 60)


@pytest.mark.timeout(120)
def test_a_cluster_read_after_a_slot_moved_between_live_masters_is_served(private_redis_cluster, redis_name,
                                                                          tmp_path):
    """The MOVED fallback itself works, and redis-py learns the new table
    (the second read goes straight to the new master)."""
    cluster = private_redis_cluster
    url = cluster.url_for(redis_name) + "?timeout=1&deadline=3"
    page = os.urandom(PAGE_SIZE)

    async def main() -> None:
        store = await RedisStore.open(url, str(tmp_path / "state"))
        try:
            await store.write([(0, PAGE_SIZE)], page)
            assert await store.read([0, PAGE_SIZE]) == [page, None]
            key = f"up:{redis_name}:0".encode()
            slot = cluster.nodes[0].command("CLUSTER", "KEYSLOT", key)
            old, old_id = _slot_owner(cluster, slot)
            new = (old + 1) % len(cluster.nodes)
            new_id = cluster.nodes[new].command("CLUSTER", "MYID").decode()
            source, target = cluster.nodes[old], cluster.nodes[new]
            target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
            source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
            source.command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key)
            for node in cluster.nodes:
                node.command("CLUSTER", "SETSLOT", slot, "NODE", new_id)
            assert await store.read([0, PAGE_SIZE]) == [page, None]
            assert store._client.get_node_from_key(key).port == target.port
            assert await store.read([0]) == [page]
        finally:
            store.close()
            await asyncio.sleep(0.1)

    run(main(), 60)


# --- the fetcher under read-ahead and prefetch ------------------------------------------


# Was a bug (fixed): Fetcher.close() cancels fetch tasks that have not started yet
@pytest.mark.timeout(60)
def test_closing_the_fetcher_right_after_a_batch_still_answers_every_waiter(redis_server, redis_name, tmp_path):
    async def main() -> None:
        store = await RedisStore.open(redis_server.url_for(redis_name), str(tmp_path / "state"))
        delivered: list[tuple[object, object]] = []
        fetcher = Fetcher(asyncio.get_running_loop(), lambda waiter, result: delivered.append((waiter, result)))
        try:
            with fetcher.batch():
                fetcher.want(store, 0, "fault")
                fetcher.want(store, PAGE_SIZE, "read-ahead")
            fetcher.close()  # the pager stops in the same turn of the loop
            await asyncio.sleep(0.5)
            assert sorted(w for w, _ in delivered) == ["fault", "read-ahead"], delivered
            assert all(isinstance(r, asyncio.CancelledError) for _, r in delivered)
        finally:
            store.close()
            await asyncio.sleep(0.1)

    run(main())


# Was a bug (fixed): the store's deadline starts only once a read holds one of the MAX_IN_FLIGHT slots
@pytest.mark.timeout(120)
def test_every_waiter_is_answered_within_the_deadline_when_the_store_is_dead(private_redis_server, redis_name,
                                                                              tmp_path):
    server = private_redis_server
    deadline = 1.0

    async def main() -> None:
        store = await RedisStore.open(server.url_for(redis_name) + f"?timeout=0.25&deadline={deadline}",
                                      str(tmp_path / "state"))
        loop = asyncio.get_running_loop()
        answered: dict[object, float] = {}
        fetcher = Fetcher(loop, lambda waiter, result: answered.setdefault(waiter, loop.time()))
        try:
            server.kill()
            start = loop.time()
            batches = 6 * MAX_IN_FLIGHT + 1  # a prefetch of ~100 MiB
            with fetcher.batch():
                for i in range(batches * MAX_BATCH):
                    fetcher.want(store, i * PAGE_SIZE, ("prefetch", i))
            fetcher.want(store, (batches * MAX_BATCH + 7) * PAGE_SIZE, "fault")  # a fault, just after
            while "fault" not in answered and loop.time() - start < 30:
                await asyncio.sleep(0.05)
            waited = answered.get("fault", loop.time()) - start
            assert waited < deadline + 1.5, f"the fault's page was failed after {waited:.1f} s, " \
                                            f"not within the deadline of {deadline} s"
        finally:
            fetcher.close()
            store.close()
            await asyncio.sleep(0.1)

    run(main(), 60)


@pytest.mark.timeout(60)
def test_single_server_reads_see_a_noauth_server_as_an_error_not_as_pages(private_redis_server, redis_name, tmp_path):
    """An error reply never reads as a page: -NOAUTH on a new connection is
    an error that no retry outlives (OSError, not StoreUnavailable: the
    page fails at once, never zeros)."""
    server = private_redis_server

    async def main() -> None:
        store = await RedisStore.open(server.url_for(redis_name) + "?timeout=1", str(tmp_path / "state"))
        try:
            await store.write([(CHUNK_BYTES, PAGE_SIZE)], os.urandom(PAGE_SIZE))
            server.command("CONFIG", "SET", "requirepass", "pw")
            try:
                with pytest.raises(OSError, match="NOAUTH") as raised:
                    await store.read([0, CHUNK_BYTES])
                assert not isinstance(raised.value, ConnectionError), raised.value
            finally:
                server.client(password="pw").config_set("requirepass", "")
        finally:
            store.close()
            await asyncio.sleep(0.1)

    run(main())
