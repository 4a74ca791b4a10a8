"""How long a dead daemon's clients wait: 32 client processes with 8
regions each, the daemon killed with SIGKILL, then every client touches a
missing page of each region from a thread per region (the first thread in
its fault holds the GIL, so the others wait for it), then a new daemon is
started on the same socket. Measured from the new daemon's start until
every thread has its page (the takeover of every region), beside the time a daemon with nothing
to take over takes to start until its socket accepts (the floor), in the
same run.

    .venv/bin/python benchmarks/takeover.py [--clients N] [--regions N] [--rounds N]

Also prints the cost durable state adds to map(): the median map() time
against a daemon that keeps it and one that does not (the embedded pager's
kind), taking turns.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import uffd_pager

PAGE = uffd_pager.PAGE_SIZE
PAGES = 16  # per region


def _start(path: str, state_dir: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "uffd_pager", "serve", "--socket", path, "--state-dir", state_dir],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _accepting(path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            try:
                sock.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.001)
    raise TimeoutError(f"nothing accepts on {path}")


def client(path: str, store: str, regions: str) -> None:
    """A client process: maps `regions` regions of store, reads page 0 of
    each, says "ready", then on a line on stdin touches page 1 of each in
    a thread per region and says "served" when every thread has its page."""
    pager = uffd_pager.connect(path, timeout=120)
    mapped = [pager.map(f"file://{store}", PAGES * PAGE, read_ahead="off", writeback_interval=0)
              for _ in range(int(regions))]
    views = [region.view() for region in mapped]
    for view in views:
        view[0]
    print("ready", flush=True)
    sys.stdin.readline()
    # Said first: the first thread in its fault holds the GIL until it is served.
    print("touching", flush=True)
    threads = [threading.Thread(target=view.__getitem__, args=(PAGE,)) for view in views]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("served", flush=True)
    sys.stdin.readline()
    os._exit(0)


def takeover_round(workdir: str, clients: int, regions: int) -> tuple[float, float]:
    """(seconds from a new daemon's start until every client's waiting
    threads have their pages, seconds a daemon with nothing to take over
    needs until it accepts)."""
    path, state = os.path.join(workdir, "pager.sock"), os.path.join(workdir, "state")
    store = os.path.join(workdir, "store")
    with open(store, "wb") as f:
        f.write(os.urandom(PAGES * PAGE))
    daemon = _start(path, state)
    _accepting(path, time.monotonic() + 30)
    procs = [subprocess.Popen([sys.executable, __file__, "client", path, store, str(regions)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "touching"
        time.sleep(0.5)  # every thread is in its fault by now
        started = time.monotonic()
        daemon = _start(path, state)
        for proc in procs:
            assert proc.stdout.readline().strip() == "served"
        took_over = time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    fresh_path = os.path.join(workdir, "fresh.sock")
    started = time.monotonic()
    fresh = _start(fresh_path, os.path.join(workdir, "fresh-state"))
    _accepting(fresh_path, time.monotonic() + 30)
    floor = time.monotonic() - started
    fresh.send_signal(signal.SIGTERM)
    fresh.wait()
    return took_over, floor


def map_cost(workdir: str, rounds: int) -> tuple[float, float]:
    """Median map()+close() seconds with durable state and without (a
    daemon listening on an abstract socket keeps none), taking turns."""
    store = os.path.join(workdir, "store")
    durable_path = os.path.join(workdir, "durable.sock")
    durable = _start(durable_path, os.path.join(workdir, "durable-state"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    plain_address = f"\0uffd-pager-bench-{os.getpid()}"
    listener.bind(plain_address)
    listener.listen(16)
    plain = subprocess.Popen([sys.executable, "-m", "uffd_pager", "serve", "--listen-fd", str(listener.fileno())],
                             pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener.close()
    try:
        _accepting(durable_path, time.monotonic() + 30)
        times: dict[str, list[float]] = {"durable": [], "none": []}
        pagers = {"durable": uffd_pager.connect(durable_path), "none": uffd_pager.client.Pager._attach(plain_address, 60)}
        for _ in range(rounds):
            for name, pager in pagers.items():
                started = time.perf_counter()
                pager.map(f"file://{store}", PAGES * PAGE, writeback_interval=0).close()
                times[name].append(time.perf_counter() - started)
        for pager in pagers.values():
            pager.close()
        return statistics.median(times["durable"]), statistics.median(times["none"])
    finally:
        for process in (durable, plain):
            process.send_signal(signal.SIGTERM)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for n in range(args.rounds):
            took_over, floor = takeover_round(workdir, args.clients, args.regions)
            print(f"round {n + 1}: {args.clients} clients x {args.regions} regions served again "
                  f"{took_over * 1000:.0f} ms after the new daemon started; a daemon with nothing to take over "
                  f"accepts after {floor * 1000:.0f} ms (floor)", flush=True)
            for leftover in ("pager.sock",):
                if os.path.exists(os.path.join(workdir, leftover)):
                    os.unlink(os.path.join(workdir, leftover))
        durable, none = map_cost(workdir, 200)
        print(f"map()+close(): {durable * 1e6:.0f} us with durable state, {none * 1e6:.0f} us without "
              f"(floor), {durable / none:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client(*sys.argv[2:])
    else:
        main()
