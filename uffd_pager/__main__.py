"""The command line: ``uffd-pager serve | bench | status | keygen``."""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Callable, Mapping

from uffd_pager.config import DEFAULT_PATH as DEFAULT_CONFIG, LOG_LEVELS, ConfigError, config_path, load as load_config
from uffd_pager.config import listen_address, one_group, page_multiple, parse_socket_mode, positive
from uffd_pager.durable import DurableState, StateError, remove_state, state_path
from uffd_pager.logs import DEFAULT_LOG_LEVEL, LOG_FORMAT
from uffd_pager.tenants import DEFAULT_MAX_MAPPED, DEFAULT_MAX_REGIONS, parse_groups, parse_users

if TYPE_CHECKING:
    from uffd_pager.sd_daemon import Notifier
    from uffd_pager.service import PagerService


def _listen(path: str, mode: int, group: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"uffd-pager: {path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a pager that died
        else:
            raise SystemExit(f"uffd-pager: a pager is already listening on {path}")
        finally:
            probe.close()
    # The file takes its mode at bind() through the umask: never, even for
    # a moment, more open than asked.
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    if group is not None:
        os.chown(path, -1, group)
    sock.listen(128)
    return sock


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def _serve(listener: socket.socket, args: argparse.Namespace, notifier: Notifier | None,
                 durable: DurableState | None) -> None:
    from uffd_pager.service import PagerService
    from uffd_pager.tenants import Access, TenantLimits

    service = PagerService(listener, exit_when_idle=args.exit_when_idle,
                           limits=TenantLimits(max_regions=args.max_regions, max_mapped=args.max_mapped,
                                               max_fds=args.tenant_max_fds),
                           state_dir=args.state_dir, max_resident=args.max_resident,
                           tenant_max_resident=args.tenant_max_resident, metrics=args.metrics,
                           durable=durable, access=Access(args.allow_users, args.allow_groups),
                           program=args.parent_pid)
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, _stop, service, notifier)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if notifier is None:
        await service.serve()
    else:
        await notifier.supervise(service.serve())


def _stop(service: PagerService, notifier: Notifier | None) -> None:
    if notifier is not None:
        notifier.notify("STOPPING=1")
    service.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from uffd_pager import sd_daemon

    # From the moment the socket accepts, SIGTERM must stop us cleanly: it
    # waits, blocked, until the loop's handler is there (_serve).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    # The library's private pager (--listen-fd) is not the daemon of a unit:
    # systemd's variables in its environment are its application's.
    embedded = args.listen_fd is not None
    activated = None if embedded else sd_daemon.activated_listener()
    if embedded:
        listener = socket.socket(fileno=args.listen_fd)
    elif activated is not None:
        listener = activated  # systemd's socket unit owns its path
        logging.getLogger("uffd_pager").info("listening on the socket passed by systemd")
        if args.socket_mode is not None or args.socket_group is not None:
            logging.getLogger("uffd_pager").warning(
                "--socket-mode and --socket-group are not applied to a socket systemd made: set SocketMode= "
                "and SocketGroup= in its .socket unit")
    elif args.socket:
        mode = args.socket_mode
        if mode is None:
            mode = 0o666 if args.allow_users or args.allow_groups else 0o600
        listener = _listen(args.socket, mode, args.socket_group)
        logging.getLogger("uffd_pager").info("listening on %s", args.socket)
    else:
        print("uffd-pager serve: error: no socket to listen on: give --socket PATH, socket = PATH in the "
              "config file, or start it through a systemd socket unit", file=sys.stderr)
        return 2
    try:
        durable = _durable_state(listener, args.state_dir)
    except StateError as exc:  # what another version wrote: never overwritten nor half-read
        listener.close()
        print(f"uffd-pager serve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a user's daemon given root's directory: it serves, without a successor
        logging.getLogger("uffd_pager").warning(
            "keeping no durable state (%s): a pager started after this one cannot take its regions over", exc)
        durable = None
    notifier = None if embedded else sd_daemon.Notifier()
    try:
        uvloop.run(_serve(listener, args, notifier, durable))
    finally:
        listener.close()
        if durable is not None:
            # A private pager's state is its program's alone: once no region
            # is recorded (the program closed them, or exited), nothing may
            # take over from it, and it must not pile up.
            forget = embedded and not durable.regions()
            durable.close()
            if forget:
                remove_state(durable.path)
        if notifier is not None:
            notifier.close()
        if args.socket and not embedded and activated is None:
            try:
                os.unlink(args.socket)
            except FileNotFoundError:
                pass
    return 0


def _durable_state(listener: socket.socket, state_dir: str | None) -> DurableState | None:
    """The pager's durable state (durable.py), in its state directory,
    named after the socket's path or abstract name (a private pager's);
    None for an unnamed socket."""
    from uffd_pager.catalog import ensure_state_dir

    address = listener.getsockname()
    if not address:
        return None
    return DurableState(state_path(ensure_state_dir(state_dir), address))


def cmd_status(args: argparse.Namespace) -> int:
    from uffd_pager.client import connect

    pager = connect(args.socket)
    try:
        status = pager.status()
    finally:
        pager.close()
    status.pop("ok", None)  # the protocol's envelope, not the pager's state
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        from uffd_pager.status_view import format_status
        print(format_status(status))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from uffd_pager.crypto import Key

    text = Key.generate().to_text()
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    else:
        fd = sys.stdout.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_size:
                # `keygen >> FILE`: a second key after the first makes a file no reader accepts
                print("uffd-pager: stdout is a file that is not empty; not adding a key to it "
                      "(a key file holds one key: use `>` or --out NEW_FILE)", file=sys.stderr)
                return 2
            os.fchmod(fd, 0o600)  # `keygen > FILE`: the shell made FILE with the umask's mode
        elif os.isatty(fd):
            print("uffd-pager: not writing a key to a terminal; redirect it to a file or use --out", file=sys.stderr)
            return 2
    try:
        os.write(fd, text.encode())
    finally:
        if args.out:
            os.close(fd)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from uffd_pager import bench_report

    if args.report is not None:
        try:
            bench_report.require_matplotlib()  # now, not after minutes of benchmarking
        except ModuleNotFoundError as exc:
            args.usage_error(str(exc))
    if args.saved is not None:
        if args.report is None:
            args.usage_error("--from FILE makes a report of a saved run: it needs --report DIR")
        given = [flag for flag, value in (("--quick", args.quick), ("--pages", args.pages), ("--dir", args.dir),
                                          ("--json", args.json), ("--store", args.store != "file")) if value]
        if given:
            args.usage_error(f"--from runs nothing: {', '.join(given)} would not be used")
        try:
            results = bench_report.load_json(args.saved)
        except ValueError as exc:
            args.usage_error(f"--from: {exc}")
    else:
        if args.store != "file":
            from uffd_pager.bench_remote import run_remote_bench
            results = run_remote_bench(args.store, quick=args.quick, pages=args.pages, directory=args.dir)
        else:
            from uffd_pager.bench import run_bench
            results = run_bench(quick=args.quick, pages=args.pages, directory=args.dir)
        if args.json:
            bench_report.save_json(results, args.json)
    if args.report is not None:
        print(f"uffd-pager bench: report in {bench_report.write_report(results, args.report)}", file=sys.stderr)
    return 0


def _whole_number(rule: Callable[[int], int]) -> Callable[[str], int]:
    """An argparse type of a whole number (decimal, or 0x... / 0o...) that
    passes one of config.py's rules, refused in the config file's words."""
    def convert(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        try:
            return rule(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, not {text!r}") from None
    return convert


_positive_int = _whole_number(positive)


BENCH_MAX_PAGES = 1 << 20  # 4 GiB a row: beyond it a run takes hours and its four copies fill the disk


def _bench_pages(text: str) -> int:
    value = _positive_int(text)
    if value > BENCH_MAX_PAGES:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {BENCH_MAX_PAGES} pages (4 GiB)")
    return value


# The paths a benchmark writes are checked by trying, before the run (it
# takes minutes, then would fail to save): os.access() says yes to root even
# where the file system refuses (sysfs, a read-only mount).


def _writable_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"directory {path!r} does not exist")
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"directory {path!r} is not writable: {exc.strerror}") from None
    return path


def _output_file(path: str) -> str:
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, not a file")
    _writable_directory(os.path.dirname(path) or ".")
    existed = os.path.exists(path)
    try:
        # O_NONBLOCK: a FIFO without a reader fails at once instead of blocking; no O_TRUNC: a refused run keeps it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path!r} is not writable: {exc.strerror}") from None
    if not existed:
        os.unlink(path)
    return path


def _report_directory(path: str) -> str:
    from uffd_pager.bench_report import check_report_directory

    try:
        check_report_directory(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    _writable_directory(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return path


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type of a parser that raises ValueError (config.py's and
    tenants.py's, which the config file's keys are checked with too)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default, metavar="LEVEL",
                        help=f"how much the pager logs: {', '.join(LOG_LEVELS)} (any case; default "
                             f"{DEFAULT_LOG_LEVEL}); INFO: a line per connect, map, unmap, close and failed "
                             "request, DEBUG: and per flush")


def _version() -> str:
    try:
        return version("uffd_pager")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed: every command still runs
        return "(not installed: no version)"


def build_parser(config: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line; `config`: serve's settings from its config file,
    the defaults of the options it names (the command line wins)."""
    config = dict(config or {})
    parser = argparse.ArgumentParser(
        prog="uffd-pager",
        description="A user-space pager: file-backed, fork-safe memory regions served by userfaultfd.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_log_level(parser, config.pop("log_level", DEFAULT_LOG_LEVEL))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
        # --log-level after the command too; SUPPRESS keeps one given before it.
        _add_log_level(sub_parser, argparse.SUPPRESS)
        sub_parser.set_defaults(func=func)
        return sub_parser

    serve = command("serve", "run a pager daemon on a Unix socket", cmd_serve)
    serve.add_argument("--config", metavar="PATH",
                       help="a TOML file of these options' settings, overridden by the command line (default "
                            f"{DEFAULT_CONFIG} if it exists)")
    # Required, but the config file may name it: checked by cmd_serve.
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket", help="path of the Unix socket to listen on")
    where.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # embedded pager: inherited listener
    # The embedded pager's program: an idle pager waits for it to connect, and stops once it is gone.
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--exit-when-idle", action=argparse.BooleanOptionalAction, default=False,
                       help="exit once no client and no region is left")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="where the pager keeps what an attacker of the stores must not roll back (encrypted "
                            "stores' anchors); default $UFFD_PAGER_STATE_DIR, else /var/lib/uffd-pager for root, "
                            "else $XDG_STATE_HOME/uffd-pager")
    serve.add_argument("--max-regions", type=_positive_int, default=DEFAULT_MAX_REGIONS, metavar="N",
                       help=f"regions one client uid may hold at once (default {DEFAULT_MAX_REGIONS})")
    serve.add_argument("--max-mapped", type=_positive_int, default=DEFAULT_MAX_MAPPED, metavar="BYTES",
                       help="bytes one client uid may have mapped at once (default 2^50)")
    serve.add_argument("--max-resident", type=_whole_number(page_multiple), default=0, metavar="BYTES",
                       help='bytes all regions may keep resident together, kept by '
                            "page-out (a multiple of 4096; default 0: no such cap)")
    serve.add_argument("--tenant-max-fds", type=_positive_int, default=0, metavar="N",
                       help="descriptors of the pager one client uid may hold at once: 2 a connection, 3 a region "
                            "(default: half of the pager's open-file limit)")
    serve.add_argument("--tenant-max-resident", type=_whole_number(page_multiple), default=0, metavar="BYTES",
                       help='bytes the regions of one client uid may keep resident '
                            "together, kept by page-out (a multiple of 4096; default 0: no such cap)")
    serve.add_argument("--allow-users", type=_argument_type(parse_users), default=frozenset(), metavar="USERS",
                       help="users (names or uids, comma-separated) who may use the pager besides root and its "
                            "own user (default: none)")
    serve.add_argument("--allow-groups", type=_argument_type(parse_groups), default=frozenset(), metavar="GROUPS",
                       help="groups (names or gids, comma-separated) whose members (primary or supplementary "
                            "group) may use it too (default: none)")
    serve.add_argument("--socket-mode", type=_argument_type(parse_socket_mode), metavar="MODE",
                       help="the socket file's mode, in octal (default 0600; 0666 with --allow-users or "
                            "--allow-groups: who may connect is decided by them)")
    serve.add_argument("--socket-group", type=_argument_type(one_group), metavar="GROUP",
                       help="the socket file's group (name or gid; default: the pager's)")
    serve.add_argument("--metrics", type=_argument_type(listen_address), metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9100; "
                            "port 0: any free one, logged at INFO); default: none")
    serve.set_defaults(**config)

    bench = command("bench", "fault-latency benchmark beside the kernel and a C reference", cmd_bench)
    bench.add_argument("--quick", action="store_true", help="fewer pages: the run of ./run.sh")
    bench.add_argument("--store", choices=("file", "redis", "redis+unix"), default="file",
                       help="file (default): the full table over a file store; redis, redis+unix: remote faults "
                            "and write-back over a private redis-server beside a plain GET / pipelined SET")
    bench.add_argument("--pages", type=_bench_pages, metavar="N",
                       help=f"faults per row, 1 to {BENCH_MAX_PAGES} (default 16384, quick 4096)")
    bench.add_argument("--dir", type=_writable_directory,
                       help="where to put the benchmark file (default: a new temp dir)")
    bench.add_argument("--json", type=_output_file, metavar="FILE", help="also write the figures as JSON to FILE")
    bench.add_argument("--report", type=_report_directory, metavar="DIR",
                       help="also write DIR/README.md with plots of the figures beside their floors (needs matplotlib)")
    bench.add_argument("--from", dest="saved", metavar="FILE",
                       help="with --report: make the report from a saved --json FILE instead of running")
    bench.set_defaults(usage_error=bench.error)

    keygen = command("keygen", "write a new 256-bit key (mode 0600) for map(key_file=...)", cmd_keygen)
    keygen.add_argument("--out", help="create this file (it must not exist) instead of writing to stdout")

    status = command("status", "print a daemon's tenants, regions, connections, fds and memory", cmd_status)
    status.add_argument("--socket", required=True, help="the daemon's socket path")
    status.add_argument("--json", action="store_true", help="print it as JSON, for scripts, instead of tables")
    return parser


def _with_config(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """serve's command line parsed again over its config file's settings."""
    path = config_path(args.config, embedded=args.listen_fd is not None)
    if path is None:
        return args
    try:
        settings = load_config(path)
    except ConfigError as exc:
        build_parser().error(str(exc))
    if args.listen_fd is not None:
        settings.pop("socket", None)  # the inherited listener is the socket
    return build_parser(settings).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args = _with_config(args, argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        return args.func(args)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return 1
        print(f"uffd-pager: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
