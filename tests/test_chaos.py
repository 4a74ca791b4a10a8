"""A pager that dies, again and again (issue 12): four client processes
(file and Redis stores, plain and encrypted, the three fork policies, both
kinds of dirty tracking), each with threads writing and checking pages
against a model of its own, flushing and forking children that check their
view page by page, while the daemon is SIGKILLed at 20 random moments and
started again each time. At the end every process's every page matches its
model, in memory and in the store (see tests/chaos_children.py)."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ChildScript

CHILDREN_PY = Path(__file__).with_name("chaos_children.py")
KILLS = 20


@pytest.mark.timeout(420)
def test_every_page_survives_twenty_kills_of_the_pager(start_daemon, tmp_path, private_redis_server):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    key_file = tmp_path / "key"
    subprocess.run([sys.executable, "-m", "uffd_pager", "keygen", "--out", str(key_file)], check=True, timeout=30)
    configs = [  # url, fork policy, tracking, key file
        (f"file://{tmp_path / 'plain'}", "on-write", "async", ""),
        (f"file://{tmp_path / 'sealed'}", "at-fork", "sync", str(key_file)),
        (private_redis_server.url_for("chaos-plain"), "on-access", "sync", ""),
        (private_redis_server.url_for("chaos-sealed"), "on-write", "async", str(key_file)),
    ]
    for url, *_ in configs:
        if url.startswith("file://"):
            Path(url[len("file://"):]).write_bytes(b"")
    daemon = start_daemon("chaos.sock")
    clients = [ChildScript(CHILDREN_PY, "client", daemon.path, url, policy, tracking, key, rng.randrange(1 << 30))
               for url, policy, tracking, key in configs]
    try:
        for client in clients:
            client.expect("running", timeout=60)
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.1, 1.2))
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(timeout=10)
            daemon.stopped = True
            time.sleep(rng.uniform(0.0, 0.3))  # faults, flushes and forks wait meanwhile
            daemon = start_daemon("chaos.sock")
        for client in clients:
            if client.process.poll() is not None:
                said = []
                while (message := client.next(timeout=1, end_fails=False)) is not None:
                    said.append(message)
                raise AssertionError(f"a client died (seed {seed}): {said}{client.context()}")
            client.send("finish")
        problems, children = [], []
        for client, (url, policy, tracking, key) in zip(clients, configs):
            while (message := client.next(timeout=120)) is not None and message["what"] == "child":
                children.append(message)
            assert message is not None, f"{url}: no end of run{client.context()}"
            assert message["what"] == "done", f"{url}: {message}{client.context()}"
            problems += [f"{url} ({policy}, {tracking}{', encrypted' if key else ''}): {p}" for p in message["problems"]]
            assert message["flushes"] > 0 and message["writes"] > 0 and message["forks"] > 0, message
        for client in clients:  # children's reports that came after their parent's end
            while (message := client.next(timeout=1, end_fails=False)) is not None:
                if message["what"] == "child":
                    children.append(message)
        problems += [f"forked child {c['pid']}: {p}" for c in children for p in c.get("problems", [])]
        assert problems == [], f"seed {seed}: {problems[:10]}"
        checked = [c for c in children if c["outcome"] == "checked"]
        assert checked, f"no forked child checked its view: {children}"
        assert all(c["outcome"] in ("checked", "unclaimed") for c in children), children
    finally:
        for client in clients:
            client.kill(join_readers=True)
