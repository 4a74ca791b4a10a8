"""The fault path's own Redis connection (uffd_pager/stores/redis_wire.py),
against real redis-server processes: replies matched to the requests that
asked for them however many are in flight, error replies in their place,
and every failure (a stopped server, a killed one, a refused password) an
exception within the timeout, never a hang; a new connection once the
server is back."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import uvloop

from uffd_pager.stores.redis_wire import ReplyError, Wire


def wire_for(server, **kwargs) -> Wire:
    return Wire(host=server.host, port=server.port or 0, unix_path=server.unix_path, **kwargs)


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_many_requests_in_flight_each_get_their_own_replies(redis_server, redis_unix_server, redis_name, unix):
    server = redis_unix_server if unix else redis_server
    values = {f"{redis_name}:{i}".encode(): os.urandom(1 + i * 37 % 9000) for i in range(300)}

    async def main() -> None:
        wire = wire_for(server)
        try:
            assert await wire.request([(b"SET", k, v) for k, v in values.items()]) == [b"OK"] * len(values)
            # 300 requests at once, over one connection: each its own value.
            keys = list(values)
            answers = await asyncio.gather(*(wire.request([(b"GET", k), (b"STRLEN", k)]) for k in keys))
            for key, (value, length) in zip(keys, answers):
                assert value == values[key] and length == len(values[key])
            # A batch mixing an error reply: the error is in its place, the rest are replies.
            mixed = await wire.request([(b"GET", keys[0]), (b"HGET", keys[1], b"f"), (b"GET", keys[2])])
            assert mixed[0] == values[keys[0]] and mixed[2] == values[keys[2]]
            assert isinstance(mixed[1], ReplyError) and "WRONGTYPE" in str(mixed[1])
            # A cancelled waiter does not shift the replies of those after it.
            task = asyncio.ensure_future(wire.request([(b"GET", keys[3])]))
            await asyncio.sleep(0)
            task.cancel()
            assert await wire.request([(b"GET", keys[4])]) == [values[keys[4]]]
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_stopped_server_times_out_and_the_next_request_reconnects(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=0.5)
        try:
            assert await wire.request([(b"PING",)]) == [b"PONG"]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(TimeoutError):
                    await wire.request([(b"PING",)])
                assert time.monotonic() - start < 2.0, "the request outlived its timeout"
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await wire.request([(b"PING",)]) == [b"PONG"]
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_killed_server_fails_requests_in_flight_and_a_restarted_one_serves(private_redis_server):
    server = private_redis_server

    async def main() -> None:
        wire = wire_for(server, timeout=2)
        try:
            assert await wire.request([(b"SET", b"k", b"v")]) == [b"OK"]
            os.kill(server.pid, signal.SIGSTOP)
            in_flight = asyncio.ensure_future(wire.request([(b"GET", b"k")]))
            await asyncio.sleep(0.1)
            server.kill()
            with pytest.raises(ConnectionError):
                await in_flight
            with pytest.raises(OSError):  # refused: nobody listens
                await wire.request([(b"PING",)])
            server.start()
            assert await wire.request([(b"GET", b"k")]) == [None]  # a new connection, an empty server
        finally:
            wire.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_user_and_password_are_sent_and_a_wrong_password_is_refused_clearly(private_redis_server):
    server = private_redis_server
    server.command("ACL", "SETUSER", "pager", "on", ">s3cret", "~*", "+@all")

    async def main() -> None:
        good = wire_for(server, username="pager", password="s3cret", db=3)
        bad = wire_for(server, username="pager", password="wrong")
        try:
            assert await good.request([(b"SET", b"k", b"in-db-3")]) == [b"OK"]
            info = (await good.request([(b"CLIENT", b"INFO")]))[0]
            assert b" db=3 " in info and b" user=pager " in info, info
            with pytest.raises(ConnectionError, match="refused the connection"):
                await bad.request([(b"PING",)])
        finally:
            good.close()
            bad.close()

    run(main())
