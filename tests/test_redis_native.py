"""The C fault path of a Redis store on one server (native/remote.c,
uffd_pager/stores/redis_native.py), against real redis-server processes:

1. random faults, TCP and Unix socket, read-ahead off and adaptive: placed
   by C (the pager's "native" count), byte-exact, holes zero;
2. a client killed while its page is in flight on the C path (the server
   stopped): the reply, once it comes, is dropped; the pager serves on;
3. a reply later than the URL's timeout: the request is handed back to the
   fetch path, which waits for the server within the deadline: the page is
   right, never zeros.

Whatever may block in a fault or be killed runs in a scenario process
(tests/redis_scenarios.py, section 6); healthy faults run here under a
timeout.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

import uffd_pager
from redis_pages import PAGE, ZERO_PAGE, pattern
from redis_scenarios import wait_for_native
from test_redis import Remote, Scenario, populate


@pytest.mark.timeout(60)
@pytest.mark.parametrize("read_ahead", ["off", "adaptive"])
@pytest.mark.parametrize("server", ["redis_server", "redis_unix_server"])
def test_random_faults_on_one_server_are_placed_by_the_c_path(server, read_ahead, redis_name, request):
    store = Remote(request.getfixturevalue(server), redis_name)
    npages, holes = 256, (3, 100, 255)
    populate(store.url(), npages, holes)
    with uffd_pager.Pager() as pager, pager.map(store.url(), npages * PAGE, writeback_interval=0,
                                                read_ahead=read_ahead) as region:
        before = wait_for_native(pager)
        assert before["native_connections"] == 1, before
        view = region.view()
        order = list(range(npages))
        random.Random(7).shuffle(order)
        wrong = [p for p in order if bytes(view[p * PAGE:(p + 1) * PAGE]) != (
            ZERO_PAGE if p in holes else pattern("A", p))]
        del view
        status = pager.status()
        stats = region.stats()
    assert wrong == [], f"pages read wrong: {wrong[:10]}"
    after = status["fetches"]
    placed = after["native"] - before["native"]
    # Read-ahead off: every fault is C's. Adaptive: a random order opens a
    # window now and then (those faults go to the fetch path, in batches).
    assert placed == npages if read_ahead == "off" else placed >= npages // 2, (before, after)
    assert after["in_flight"] == 0 and after["native_handed_back"] == 0, after
    assert stats["fetched_pages"] >= placed and stats["fetch_failures"] == 0, stats
    assert status["internal_errors"] == 0, "the pager logged an internal error (see its stderr)"


@pytest.mark.timeout(90)
def test_a_reply_for_a_client_killed_while_its_page_was_in_flight_is_dropped(private_redis_server, redis_name):
    store = Remote(private_redis_server, redis_name)
    npages = 16
    populate(store.url(), npages)
    scenario = Scenario("native-client-dies", store.url(), npages)
    try:
        ready = scenario.expect("ready")
        assert ready["fetches"]["native_connections"] == 1, ready
        os.kill(private_redis_server.pid, signal.SIGSTOP)
        try:
            scenario.send("go")
            killed = scenario.expect("killed")
        finally:
            os.kill(private_redis_server.pid, signal.SIGCONT)
        assert killed["code"] == -9, killed
        assert killed["fetches"]["in_flight"] >= 1, f"the child's page was not in flight: {killed}"
        scenario.send("go")
        read = scenario.expect("read")
        assert read["wrong"] == [], read
        assert read["internal_errors"] == 0, scenario.stderr
        assert read["fetches"]["in_flight"] == 0, read
        assert read["fetches"]["native"] >= npages - 1, read  # the parent's pages, by C
        assert scenario.wait(30) == 0, scenario.context()
    finally:
        scenario.kill()


@pytest.mark.timeout(90)
def test_a_reply_later_than_the_timeout_is_fetched_again_and_never_read_as_zeros(private_redis_server, redis_name):
    store = Remote(private_redis_server, redis_name)
    npages, page, stopped = 16, 9, 2.5
    populate(store.url(), npages)
    scenario = Scenario("native-late-reply", store.url("timeout=0.5&deadline=30"), npages, page)
    try:
        scenario.expect("ready")
        os.kill(private_redis_server.pid, signal.SIGSTOP)
        try:
            scenario.send("go")
            time.sleep(stopped)
        finally:
            os.kill(private_redis_server.pid, signal.SIGCONT)
        read = scenario.expect("read")
        assert read["right"] and not read["zeros"], read
        assert read["seconds"] >= stopped - 0.5, read  # it waited for the server
        assert read["fetches"]["native_handed_back"] >= 1, f"the late request was not handed back: {read}"
        assert read["stats"]["fetch_failures"] == 0 and read["stats"]["poisoned"] == 0, read
        assert scenario.wait(30) == 0, scenario.context()
        assert "no reply within 0.5 s on the C fault path" in scenario.stderr, scenario.stderr[-3000:]
    finally:
        scenario.kill()
