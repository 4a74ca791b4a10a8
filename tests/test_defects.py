"""Regression tests for defects found in review: a fault lost while another
thread forks, fork() blocking forever beside map() or close(), the pager
crashing when a forked child is killed during its flush, a forked child
reading zeros after its pager died, close() losing data and waking threads
into zeros once the pager is gone, and descriptor limits and client waits.

Whatever can block in a fault or in fork() runs in a scenario process
(tests/scenarios.py, one function per scenario), started in a session of
its own, waited for with a timeout, and then killed with everything it
forked. Scenarios report one JSON object a line; a test asserts on bytes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import uffd_pager
from scenarios import PAGE, WRITTEN, is_dead, kill_pager
from support import ChildScript, accepts, describe_returncode, one

SCENARIOS_PY = Path(__file__).with_name("scenarios.py")
POLICIES = ("on-write", "on-access", "at-fork")
TRACKING = ("async", "sync")
RACE_ITERATIONS = 200


# --- scenario processes --------------------------------------------------------------------


def session_where(session: int) -> str:
    """Every process of the session, and where each of its threads sleeps in the kernel."""
    lines = []
    for entry in sorted(filter(str.isdigit, os.listdir("/proc")), key=int):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat_line = f.read()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        fields = stat_line[stat_line.rindex(")") + 2:].split()
        if int(fields[3]) != session:
            continue
        threads = []
        with contextlib.suppress(OSError):
            for tid in sorted(os.listdir(f"/proc/{entry}/task"), key=int):
                with contextlib.suppress(OSError), open(f"/proc/{entry}/task/{tid}/wchan") as f:
                    threads.append(f.read() or "(running)")
        lines.append(f"  pid {entry} ({comm}, {fields[0]}): threads at {', '.join(threads)}")
    return "\n".join(lines) or "  (no process left)"


class Scenario(ChildScript):
    """A running `scenarios.py NAME ARGS...`, the leader of its own session."""

    def __init__(self, name: str, *args: Any) -> None:
        super().__init__(SCENARIOS_PY, name, *args)

    def wait(self, timeout: float) -> int:
        """The leader's return code; fails (after noting where everyone
        sleeps) if it is still running after `timeout` s."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s{self.context()}") from None

    def status(self) -> str:
        return describe_returncode(self.process.poll())

    def context(self) -> str:
        """Where its processes sleep, then its messages and stderr."""
        return f"\nwhere its processes sleep:\n{session_where(self.process.pid)}" + super().context()

    def kill(self) -> None:
        """SIGKILL to the whole session (the private pager, forked children),
        and every message it wrote is in the queue."""
        super().kill(join_readers=True)

    def __enter__(self) -> "Scenario":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_scenario(name: str, *args: Any, timeout: float, status: int = 0) -> list[dict[str, Any]]:
    """Runs a scenario to its end: its messages, once it exited with `status`
    within `timeout` s (then what is left of its session is killed)."""
    scenario = Scenario(name, *args)
    try:
        code = scenario.wait(timeout)
    finally:
        scenario.kill()
    messages = scenario.unread()
    errors = [m for m in messages if m["what"] == "error"]
    assert not errors, f"{name}: process {errors[0]['pid']} failed:\n{errors[0]['traceback']}{scenario.context()}"
    assert code == status, f"{name} ended with {describe_returncode(code)}, expected exit {status}{scenario.context()}"
    return messages


def first(messages: list[dict[str, Any]], what: str) -> dict[str, Any] | None:
    return next((m for m in messages if m["what"] == what), None)


# --- 1. a first touch while another thread forks ------------------------------------------

TOUCH_PAGES = 32  # first-touched by one memmove each iteration, while the fork runs


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_first_touch_while_another_thread_forks_is_served(random_file, policy, tracking):
    path = random_file(RACE_ITERATIONS * TOUCH_PAGES * PAGE)
    messages = run_scenario("fault-during-fork", path, policy, tracking, RACE_ITERATIONS, TOUCH_PAGES, timeout=60)
    hung = first(messages, "hung")
    assert hung is None, (
        f"a first touch was never served: the reading thread hung at iteration {hung['iteration']} "
        f"(after {hung['forks']} forks), stats()['pending'] == {hung['pending']}, its threads at {hung['threads']}")
    done = one(messages, "done")
    assert done["wrong_iterations"] == 0, f"pages read differ from the file: {done['wrong']}"
    assert done["whole_region_differs"] == []
    assert done["pending"] == 0, f"stats()['pending'] == {done['pending']} with no thread waiting"
    assert done["forks"] >= RACE_ITERATIONS
    assert done["pager_problem"] is None, done["pager_problem"]


# --- 2. fork() racing map() and close() -------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("forker", ["fork-during-map-and-close", "pool-during-map-and-close"])
def test_forks_beside_a_thread_that_maps_touches_and_closes_regions_never_block(random_file, forker):
    path = random_file(16 * PAGE)
    messages = run_scenario(forker, path, RACE_ITERATIONS, timeout=60)
    done = one(messages, "done")
    assert done.get("error") is None, f"the mapping thread failed:\n{done['error']}"
    assert done["done"] == RACE_ITERATIONS
    assert done["wrong"] == [], f"touched pages differ from the file: {done['wrong']}"
    assert done["forks"] > 0
    assert done["pager_problem"] is None, done["pager_problem"]


# --- 3. forked children killed during their flush ----------------------------------------------


CHILDREN_PER_ROUND = 4  # flushing at once, killed one by one: the pager crashed about once in 70 kills


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tracking", TRACKING)
@pytest.mark.parametrize("policy", ["on-write", "on-access"])
def test_the_pager_survives_forked_children_killed_during_their_flush(random_file, policy, tracking):
    path, seed = random_file(32 * PAGE), random.randrange(1 << 30)
    messages = run_scenario("kill-child-during-flush", path, policy, tracking, RACE_ITERATIONS, CHILDREN_PER_ROUND,
                            seed, timeout=60)
    lost = first(messages, "pager-lost")
    assert lost is None, (
        f"round {lost['round'] + 1} of {RACE_ITERATIONS}, {lost['kills']} kills (seed {seed}): "
        f"{lost['problem'] or 'a child never started flushing'} (the children: {lost['children_ends']})")
    done = one(messages, "done")
    assert done["kills"] == RACE_ITERATIONS * CHILDREN_PER_ROUND
    assert done["view_differs"] == [], "the parent's region changed under its children"
    assert done["flushed_pages"] > 0
    assert done["file_differs"] == [], "the parent's own flush did not write its pages"
    assert done["pager_problem"] is None, done["pager_problem"]


# --- 4. a forked child after its pager died ------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("generation", ["child", "grandchild"])
def test_a_forked_process_whose_pager_died_never_reads_zeros(tmp_path, generation):
    path = tmp_path / "ab.bin"
    path.write_bytes(b"\xab" * 64 * PAGE)
    with Scenario("child-after-pager-death", path, generation) as scenario:
        mapped = scenario.expect("mapped")
        assert mapped["parent_ok"]
        ready = scenario.expect("ready")
        assert ready["wrong"] == [], f"pages {ready['wrong']} did not read 0xab while the pager ran"
        kill_pager(mapped["pager"])
        scenario.send("touch")
        resident = scenario.expect("resident")
        assert resident["wrong"] == [], \
            f"pages {resident['wrong']}, touched before the pager died, no longer read 0xab"
        outcome = scenario.next(timeout=4)
        if outcome is None:  # it waits for a pager: what a missing page does when none is left
            assert not is_dead(ready["pid"]), f"the {generation} is gone{scenario.context()}"
            return
        if outcome["what"] == "touched":
            assert not outcome["zeros"], f"the {generation} read a page of zeros with no pager"
            assert outcome["same"], f"the {generation} read {outcome['first_byte']:#x}, not 0xab, with no pager"
        elif outcome["what"] == "exited":
            assert outcome["end"] == "killed by SIGBUS", f"the {generation} ended with {outcome['end']}"
        else:
            assert outcome["what"] == "raised", outcome


# --- 5. a region whose pager died -------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracking", TRACKING)
def test_after_the_pager_died_close_raises_and_keeps_the_written_bytes(random_file, tracking):
    path = random_file(16 * PAGE)
    original = path.read_bytes()
    result = one(run_scenario("close-after-pager-death", path, tracking, timeout=40), "result")
    assert result["read_only_wrong_before"] == []
    assert result["flush"]["pager_gone"], f"flush() with no pager did not raise PagerGone: {result['flush']}"
    assert result["close"]["pager_gone"], f"close() with no pager did not raise PagerGone: {result['close']}"
    assert result["closed"] is False, "close() with no pager closed the region: its unflushed bytes are gone"
    assert result["written_differs"] == [], "written pages lost their bytes after the failed close()"
    assert result["read_only_differs"] == [], "resident clean pages no longer read as the file"
    assert path.read_bytes() == original, "the file changed though no pager was there to write it"


@pytest.mark.timeout(90)
def test_after_the_pager_died_close_leaves_a_thread_blocked_on_a_missing_page_blocked(random_file):
    trials, npages, seed = 20, 128, random.randrange(1 << 30)
    path = random_file(npages * PAGE)
    messages = run_scenario("close-with-blocked-thread", path, trials, seed, timeout=60)
    results = [m for m in messages if m["what"] == "trial"]
    assert len(results) == trials
    for result in results:
        trial = f"{result['trial']} (seed {seed})"
        assert result["read_at_kill"] < npages - WRITTEN, f"trial {trial}: the thread read every page before the kill"
        assert result["wrong"] == [], f"trial {trial}: the thread read wrong bytes: {result['wrong']}"
        assert result["close"]["pager_gone"], \
            f"trial {trial}: close() with no pager did not raise PagerGone: {result['close']}"
        assert result["closed"] is False, f"trial {trial}: close() with no pager closed the region"
        assert result["written_differs"] == [], f"trial {trial}: written pages lost their bytes"
        assert result["reader_alive"] and result["read_after_close"] == result["read_at_kill"], \
            f"trial {trial}: close() woke the thread blocked on a missing page"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close-then-sys-exit", "sys-exit", "end-of-script"])
def test_a_process_with_a_thread_stuck_on_a_dead_pager_exits_with_status_0(random_file, how):
    path = random_file(16 * PAGE)
    messages = run_scenario("exit-with-stuck-thread", path, how, timeout=30)
    assert one(messages, "stuck")["alive"], "the thread was not stuck on the missing page"
    if how == "close-then-sys-exit":
        assert one(messages, "close")["pager_gone"]


# --- 7. descriptor limits and client waits ----------------------------------------------------------


class LimitedDaemon:
    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = str(path)
        self.process = process

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def assert_alive(self) -> None:
        code = self.process.poll()
        assert code is None, f"the daemon died: {describe_returncode(code)}"


@pytest.fixture
def limited_daemon(socket_dir: Path) -> Iterator[Callable[..., LimitedDaemon]]:
    """limited_daemon(soft, hard) -> a `uffd_pager serve` daemon started under
    RLIMIT_NOFILE (soft, hard), listening; stopped at teardown. Its tenant
    may use every descriptor (its own limit would be met first)."""
    daemons: list[LimitedDaemon] = []

    def start(soft: int, hard: int) -> LimitedDaemon:
        path = socket_dir / f"limited-{len(daemons)}.sock"
        process = subprocess.Popen(
            [sys.executable, "-m", "uffd_pager", "serve", "--socket", str(path), "--tenant-max-fds", str(1 << 30)],
            stdin=subprocess.DEVNULL, cwd="/",
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )
        daemon = LimitedDaemon(path, process)
        daemons.append(daemon)
        deadline = time.monotonic() + 20
        while not accepts(path):
            daemon.assert_alive()
            assert time.monotonic() < deadline, f"the daemon is not listening on {path} after 20 s"
            time.sleep(0.02)
        return daemon

    yield start
    for daemon in daemons:
        daemon.process.terminate()
        try:
            daemon.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


@pytest.mark.timeout(120)
def test_a_daemon_with_a_soft_limit_of_256_descriptors_serves_400_regions_at_once(limited_daemon, random_file):
    daemon = limited_daemon(soft=256, hard=8192)
    path = random_file(64 * PAGE)
    messages = run_scenario("map-many", daemon.path, path, 400, timeout=90)
    mapped = one(messages, "mapped")
    failure = mapped["failure"]
    assert failure is None, f"map() #{failure['index']} failed: {failure['type']}: {failure['message']}"
    assert mapped["mapped"] == 400 and mapped["daemon_regions"] >= 400
    assert mapped["wrong"] == [], f"regions {mapped['wrong']} do not read as the file"
    daemon.assert_alive()


DESCRIPTOR_WORDS = ("descriptor", "rlimit_nofile", "open files")
LATECOMERS = 3


def names_the_descriptor_limit(failure: dict[str, Any]) -> bool:
    return failure["is_oserror"] and (
        failure["errno"] in (errno.EMFILE, errno.ENFILE)
        or any(word in failure["message"].lower() for word in DESCRIPTOR_WORDS))


def assert_idle(daemon: LimitedDaemon, when: str) -> None:
    before = daemon.cpu_seconds()
    time.sleep(2.0)
    spent = daemon.cpu_seconds() - before
    assert spent < 0.5, f"the daemon spun {when}: {spent:.2f} s of CPU in 2 idle seconds"


@pytest.mark.timeout(150)
def test_a_daemon_out_of_descriptors_refuses_clearly_stays_idle_and_recovers(limited_daemon, random_file):
    daemon = limited_daemon(soft=64, hard=64)
    path = random_file(64 * PAGE)
    with Scenario("map-until-failure", daemon.path, path, 500) as client:
        failed = client.expect("failed", timeout=60)
        failure = failed["failure"]
        assert failure is not None, f"{failed['mapped']} regions mapped at a limit of 64 descriptors"
        assert failed["wrong"] == [], f"regions {failed['wrong']} do not read as the file"
        assert names_the_descriptor_limit(failure), \
            f"map() #{failure['index']} failed without naming the descriptor limit: {failure}"
        assert_idle(daemon, "at its descriptor limit")

        # Clients knocking while no descriptor is left: the first may take
        # the last one, the others find none even for their connection.
        latecomers = [Scenario("map-many", daemon.path, path, 1) for _ in range(LATECOMERS)]
        try:
            time.sleep(0.2)
            assert_idle(daemon, "with clients waiting to connect at its descriptor limit")
            for latecomer in latecomers:
                late = latecomer.expect("mapped", timeout=40)
                assert late["failure"] is None or names_the_descriptor_limit(late["failure"]), \
                    f"a client connecting at the daemon's descriptor limit failed unclearly: {late['failure']}"
                assert late["wrong"] == []
        finally:
            for latecomer in latecomers:
                latecomer.kill()

        client.send("close")
        assert client.expect("closed")["closed"] == failed["mapped"]
        assert client.wait(timeout=30) == 0
    daemon.assert_alive()
    mapped = one(run_scenario("map-many", daemon.path, path, 8, timeout=60), "mapped")
    assert mapped["failure"] is None, f"a new client cannot map after the first let go: {mapped['failure']}"
    assert mapped["mapped"] == 8 and mapped["wrong"] == []
    daemon.assert_alive()


@pytest.fixture
def silent_pager(socket_dir: Path) -> Iterator[str]:
    """The path of a socket that accepts connections and never answers."""
    path = socket_dir / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    acceptor = threading.Thread(target=accept_forever, daemon=True)
    acceptor.start()
    yield str(path)
    listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
    listener.close()
    acceptor.join(timeout=10)
    for conn in accepted:
        conn.close()  # and a client still waiting on one sees it end


@pytest.mark.timeout(60)
def test_connect_to_a_pager_that_never_answers_times_out(silent_pager):
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        started = time.monotonic()
        try:
            uffd_pager.connect(silent_pager, timeout=2)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    attempt_thread = threading.Thread(target=attempt, daemon=True)
    attempt_thread.start()
    attempt_thread.join(timeout=15)
    assert not attempt_thread.is_alive(), "connect(path, timeout=2) still waits for an answer after 15 s"
    error = outcome.get("error")
    assert error is not None, "connect() returned though the pager never answered hello"
    assert not isinstance(error, TypeError), f"connect() takes no timeout: {error}"
    assert isinstance(error, TimeoutError), f"connect() raised {type(error).__name__}: {error}"
    if hasattr(uffd_pager, "PagerError"):
        assert isinstance(error, uffd_pager.PagerError)
    assert outcome["seconds"] < 10, f"connect(path, timeout=2) raised only after {outcome['seconds']:.1f} s"
    assert str(error)


@pytest.mark.timeout(60)
def test_a_private_pager_with_a_timeout_serves(random_file):
    path = random_file(8 * PAGE)
    with uffd_pager.Pager(timeout=5) as pager, pager.map(f"file://{path}", 8 * PAGE) as region:
        view = region.view()
        assert bytes(view) == path.read_bytes()
        del view
