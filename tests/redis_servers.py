"""Real redis-server processes for the tests: a single server (TCP or Unix
socket) and a 3-master Redis Cluster, each in a temp dir of its own, never
the machine's service. Plain classes, no pytest: tests use them through
redis_fixtures.py, scripts and benchmarks directly.

    with RedisServer() as server:                  # TCP on a free 127.0.0.1 port
        url = server.url_for("model.bin")          # redis://127.0.0.1:PORT/model.bin
        server.kill(); server.restart(empty=True)  # an appliance that lost its memory
    with RedisCluster() as cluster:                # 3 masters, no replicas
        cluster.url_for("x"); cluster.keys_per_master()

Nothing outlives the test process:
* stop() / the context managers end the process and remove the temp dir;
* an atexit hook does the same for whatever a run forgot;
* every server is started with prctl(PR_SET_PDEATHSIG, SIGKILL), so a test
  process that is killed (SIGKILL, the watchdog, a crash) takes its servers
  with it. Linux delivers that signal when the *thread* that started the
  server exits, not the process: start servers from the main thread (pytest
  fixtures do) or from a thread that lives as long as they must;
* a temp dir left by a killed run (its name holds the run's pid) is removed
  by the next run that starts a server.
Every wait has a timeout, and a server that fails to start raises
RedisServerError with the tail of its log.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from urllib.parse import quote

if TYPE_CHECKING:  # redis-py only for client(); the servers themselves need no client library
    import redis
    import redis.cluster

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"
DIR_PREFIX = "uffd-redis-"  # + the owning process's pid + "-": see _sweep_stale_dirs
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class RedisServerError(RuntimeError):
    """A server that would not start, answer or stop in time (with its log tail)."""


class RedisReplyError(RedisServerError):
    """An error reply (-ERR ...) to one of this module's own commands."""


# --- parent death ------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child should only call, not load


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when its parent (thread) exits.
    If the parent already died between fork and prctl, nobody would send it:
    then the child gives up at once."""

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


# --- the live set, for the atexit safety net ---------------------------------------

_live: set["RedisServer"] = set()
_ports_taken: set[int] = set()  # handed out in this process and not yet released by stop()


@atexit.register
def _stop_everything() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server._destroy(graceful=False)


def _sweep_stale_dirs(base: str) -> None:
    """Remove temp dirs of earlier runs whose process is gone (a run that was
    SIGKILLed ran no atexit hook; its servers died with it by PDEATHSIG)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            match = re.fullmatch(re.escape(DIR_PREFIX) + r"(\d+)-.*", entry.name)
            if not match or not entry.is_dir(follow_symlinks=False):
                continue
            pid = int(match.group(1))
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(entry.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie counts as gone: PID 1 here may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --- ports -----------------------------------------------------------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(avoid: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now. Chosen below the
    kernel's ephemeral range when there is room, so that a port kept across
    restart() is not taken meanwhile by some outgoing connection; the caller
    still retries on "Address already in use" (another process may bind it)."""
    avoid = set(avoid) | _ports_taken
    low, _ = _ephemeral_range()
    for _ in range(200):
        if low > 12000:
            port = random.randrange(10000, low)
        else:  # no room below: let the kernel choose
            with socket.socket() as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
        if port in avoid:
            continue
        with socket.socket() as s:  # no SO_REUSEADDR: a port in TIME_WAIT counts as busy
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _ports_taken.add(port)
        return port
    raise RedisServerError("no free TCP port found on 127.0.0.1")


# --- a minimal RESP client (no library, explicit timeouts, no retries) --------------


def command(address: tuple[str, int] | str, *args: str | bytes | int, timeout: float = 2.0) -> Any:
    """Send one command to (host, port) or a Unix socket path; return the
    reply (bytes, int, list, None), or raise RedisReplyError / OSError."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        with sock.makefile("rb") as reader:
            return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = reader.read(int(rest) + 2)
        return data[:-2]
    if kind == b"*":
        return None if int(rest) < 0 else [_read_reply(reader) for _ in range(int(rest))]
    raise ConnectionError(f"unexpected reply line {line!r}")


def _info_fields(text: bytes) -> dict[str, str]:
    fields = {}
    for line in text.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


# --- one server ---------------------------------------------------------------------------


class RedisServer:
    """One redis-server process in a temp dir: TCP on a free 127.0.0.1 port,
    or (unix=True) only a Unix socket in that dir. No persistence unless
    appendonly=True (then appendfsync always, so what a client was told is
    written survives kill()). extra_config: more redis.conf directives."""

    def __init__(
        self,
        *,
        unix: bool = False,
        appendonly: bool = False,
        extra_config: Mapping[str, str] | None = None,
        base_dir: str | None = None,
        start_timeout: float = START_TIMEOUT,
        _cluster_node_timeout_ms: int | None = None,
    ) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            raise RedisServerError(f"{REDIS_SERVER} not found: run ./test.sh, or apt-get install redis-server")
        self.unix = unix
        self.appendonly = appendonly
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self._cluster_node_timeout_ms = _cluster_node_timeout_ms
        base = base_dir or tempfile.gettempdir()
        _sweep_stale_dirs(base)
        self.root = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base))
        self.data_dir = self.root / "data"  # wiped by restart(empty=True); config, logs, nodes.conf stay
        self.data_dir.mkdir()
        self.log_path = self.root / "redis.log"
        self.stdout_path = self.root / "stdout.log"  # what redis prints before it opens its log file
        self._port: int | None = None
        self._bus_port: int | None = None
        self._unix_path = str(self.root / "redis.sock") if unix else None
        if self._unix_path is not None and len(self._unix_path) > 100:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RedisServerError(f"socket path too long for sun_path: {self._unix_path}")
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []
        self._destroyed = False
        _live.add(self)

    # -- addresses --

    @property
    def host(self) -> str | None:
        return None if self.unix else HOST

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def unix_path(self) -> str | None:
        return self._unix_path

    @property
    def address(self) -> str:
        """HOST:PORT, or the socket path."""
        return self._unix_path if self.unix else f"{HOST}:{self._port}"  # type: ignore[return-value]

    def url_for(self, name: str) -> str:
        """The store URL of pseudo file `name` on this server (name percent-quoted)."""
        if self.unix:
            return f"redis+unix://{self._unix_path}?name={quote(name, safe='')}"
        return f"redis://{HOST}:{self._port}/{quote(name, safe='')}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _sockaddr(self) -> tuple[str, int] | str:
        return self._unix_path if self.unix else (HOST, self._port)  # type: ignore[return-value]

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Any:
        """One command over a fresh connection (see module-level command())."""
        return command(self._sockaddr(), *args, timeout=timeout)

    def client(self, **kwargs: Any) -> "redis.Redis":
        """A sync redis.Redis on this server (closed by stop())."""
        import redis

        kwargs.setdefault("socket_timeout", 5)
        if self.unix:
            c = redis.Redis(unix_socket_path=self._unix_path, **kwargs)
        else:
            c = redis.Redis(host=HOST, port=self._port, **kwargs)
        self._clients.append(c)
        return c

    # -- lifecycle --

    def __enter__(self) -> "RedisServer":
        if not self.alive:
            try:
                self.start()
            except BaseException:  # __exit__ does not run when __enter__ raises
                self.stop()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "RedisServer":
        """Start the server and wait until it answers PING and has loaded its data."""
        if self._destroyed:
            raise RedisServerError("this server was stopped for good; make a new one")
        if self.alive:
            raise RedisServerError(f"already running (pid {self.pid})")
        first = self._port is None and not self.unix
        deadline = time.monotonic() + self.start_timeout
        for attempt in range(8):
            if first and attempt > 0:  # someone took our port: another one
                _ports_taken.discard(self._port)  # type: ignore[arg-type]
                _ports_taken.discard(self._bus_port)  # type: ignore[arg-type]
                self._port = self._bus_port = None
            if not self.unix and self._port is None:
                self._port = free_port()
                if self._cluster_node_timeout_ms is not None:
                    self._bus_port = free_port()
            self._launch()
            try:
                self._wait_ready(deadline)
                return self
            except _Exited:
                if "Address already in use" not in self._log_tail() or time.monotonic() > deadline:
                    raise RedisServerError(self._failure("exited at start")) from None
                if not first:  # restart(): the port is ours to keep; wait for whoever holds it
                    time.sleep(0.2)
        raise RedisServerError(self._failure("could not bind a port"))

    def shutdown(self, *, save: bool = False) -> None:
        """SHUTDOWN [NO]SAVE, then SIGKILL if it lingers; the dir and the port
        stay, for restart(). save=True writes an RDB snapshot first."""
        if not self.alive:
            self._reap()
            return
        with contextlib.suppress(OSError, RedisServerError):
            self.command("SHUTDOWN", "SAVE" if save else "NOSAVE", timeout=STOP_TIMEOUT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (a crashed server, for failure tests); the dir and the port stay, for restart()."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._reap()

    def restart(self, *, empty: bool = True) -> "RedisServer":
        """Stop (gracefully if running) and start again on the same port or socket.
        empty=True: the data dir is wiped, the server comes back with no data.
        empty=False: it comes back with what it had persisted: everything with
        appendonly=True; without it, a running server is stopped with SHUTDOWN
        SAVE (so it keeps its data), a killed one comes back with its last such
        snapshot, if any (a rolled-back appliance), else empty."""
        self.shutdown(save=not empty)
        if empty:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir.mkdir()
        return self.start()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, SIGKILL if needed; close clients; remove the temp dir. Final, idempotent."""
        self._destroy(graceful=True)

    # -- internals --

    def _destroy(self, *, graceful: bool) -> None:
        if self._destroyed:
            return
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        try:
            if graceful:
                self.shutdown()
            else:
                self.kill()
        finally:
            self._destroyed = True
            _live.discard(self)
            _ports_taken.difference_update({self._port, self._bus_port})
            shutil.rmtree(self.root, ignore_errors=True)

    def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)

    def _config(self) -> str:
        lines = [
            "daemonize no",
            f"dir {self.data_dir}",
            f"logfile {self.log_path}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync always",  # kill() loses nothing a client was told is written
        ]
        if self.unix:
            lines += ["port 0", f"unixsocket {self._unix_path}", "unixsocketperm 700"]
        else:
            lines += [f"bind {HOST}", f"port {self._port}"]
        if self._cluster_node_timeout_ms is not None:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {self.root / 'nodes.conf'}",  # outside data/: survives restart(empty=True)
                f"cluster-node-timeout {self._cluster_node_timeout_ms}",
                f"cluster-port {self._bus_port}",  # explicit: PORT+10000 may be taken or past 65535
            ]
        lines += [f"{k} {v}" for k, v in self.extra_config.items()]
        return "\n".join(lines) + "\n"

    def _launch(self) -> None:
        conf = self.root / "redis.conf"
        conf.write_text(self._config())
        with open(self.stdout_path, "ab") as out:
            self.process = subprocess.Popen(
                [REDIS_SERVER, str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, whose teardown stops us
                preexec_fn=_die_with(os.getpid()),
            )

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.process.poll() is not None:  # type: ignore[union-attr]
                raise _Exited
            with contextlib.suppress(OSError, RedisServerError):
                # PING answers while an AOF is still loading: wait for loading:0 too
                if self.command("PING", timeout=1.0) == b"PONG":
                    if _info_fields(self.command("INFO", "persistence", timeout=1.0)).get("loading") == "0":
                        return
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(self._failure(f"not ready after {self.start_timeout:g} s"))
            time.sleep(0.02)

    def _log_tail(self, lines: int = 15) -> str:
        text = []
        for path in (self.stdout_path, self.log_path):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    text.append(f"--- {path.name}:\n" + "\n".join(tail))
        return "\n".join(text) or "(no log)"

    def _failure(self, what: str) -> str:
        status = self.process.poll() if self.process is not None else None
        return f"redis-server at {self.address} {what} (exit status {status}); {self._log_tail()}"

    def __repr__(self) -> str:
        return f"<RedisServer {self.address} pid={self.pid} alive={self.alive}>"


class _Exited(Exception):
    pass


# --- a cluster -------------------------------------------------------------------------------


class RedisCluster:
    """`masters` cluster-enabled RedisServers (no replicas), joined with
    `redis-cli --cluster create`; ready when every node says cluster_state:ok.
    node_timeout_ms: how soon the others mark a killed node failed."""

    def __init__(
        self,
        masters: int = 3,
        *,
        appendonly: bool = False,
        node_timeout_ms: int = 2000,
        base_dir: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create wants at least 3 masters")
        if not os.access(REDIS_CLI, os.X_OK):
            raise RedisServerError(f"{REDIS_CLI} not found: run ./test.sh, or apt-get install redis-tools")
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.nodes.append(RedisServer(appendonly=appendonly, base_dir=base_dir,
                                              _cluster_node_timeout_ms=node_timeout_ms))
        except BaseException:
            self.stop()
            raise
        self._clients: list[Any] = []

    @property
    def addresses(self) -> list[str]:
        """HOST:PORT of every node, in creation order (also after kill_node)."""
        return [n.address for n in self.nodes]

    def url_for(self, name: str) -> str:
        return f"redis+cluster://{','.join(self.addresses)}/{quote(name, safe='')}"

    def __enter__(self) -> "RedisCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            result = subprocess.run(
                [REDIS_CLI, "--cluster", "create", *self.addresses, "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.start_timeout,
            )
            if result.returncode != 0:
                raise RedisServerError(
                    f"redis-cli --cluster create failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every live node says cluster_state:ok and knows every node."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            states = {}
            for node in self.nodes:
                if not node.alive:
                    continue
                try:
                    info = _info_fields(node.command("CLUSTER", "INFO"))
                    states[node.address] = (info.get("cluster_state"), info.get("cluster_known_nodes"))
                except (OSError, RedisServerError) as exc:
                    states[node.address] = (repr(exc), None)
            if states and all(s == ("ok", str(len(self.nodes))) for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"cluster not ok: {states}; first node's log: {self.nodes[0]._log_tail()}")
            time.sleep(0.05)

    def kill_node(self, i: int) -> None:
        """SIGKILL node i (after node_timeout_ms the others mark it failed; with
        no replicas its slots are gone and the cluster_state turns fail)."""
        self.nodes[i].kill()

    def restart_node(self, i: int, *, empty: bool = True) -> None:
        """Bring node i back on its port with its slots (nodes.conf is kept);
        empty=True: without its data. Waits for cluster_state:ok everywhere."""
        self.nodes[i].restart(empty=empty)
        self.wait_ok()

    def masters(self) -> list[str]:
        """HOST:PORT of the nodes that a live node's CLUSTER NODES lists as masters."""
        for node in self.nodes:
            if node.alive:
                text = node.command("CLUSTER", "NODES").decode()
                break
        else:
            raise RedisServerError("no node of the cluster is running")
        found = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 2 and "master" in fields[2].split(","):
                found.append(fields[1].split("@")[0])
        order = {a: k for k, a in enumerate(self.addresses)}
        return sorted(found, key=lambda a: order.get(a, len(order)))

    def keys_per_master(self) -> dict[str, int]:
        """{HOST:PORT: DBSIZE} for every master (raises if one is down)."""
        by_address = {n.address: n for n in self.nodes}
        return {a: by_address[a].command("DBSIZE") for a in self.masters()}

    def client(self, **kwargs: Any) -> "redis.cluster.RedisCluster":
        """A sync redis.cluster.RedisCluster on the nodes (closed by stop())."""
        from redis.cluster import ClusterNode, RedisCluster as Client

        kwargs.setdefault("socket_timeout", 5)
        c = Client(startup_nodes=[ClusterNode(HOST, n.port) for n in self.nodes], **kwargs)
        self._clients.append(c)
        return c

    def stop(self) -> None:
        """Stop every node and remove their dirs. Final, idempotent."""
        for c in getattr(self, "_clients", []):
            with contextlib.suppress(Exception):
                c.close()
        for node in self.nodes:
            node.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster {','.join(self.addresses)}>"
