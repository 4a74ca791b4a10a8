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
from typing import Callable

from uffd_pager.logs import DEFAULT_LOG_LEVEL, LOG_FORMAT, LOG_LEVELS
from uffd_pager.tenants import DEFAULT_MAX_MAPPED, DEFAULT_MAX_REGIONS


def _listen(path: str) -> socket.socket:
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
    sock.bind(path)
    sock.listen(128)
    return sock


async def _serve(listener: socket.socket, args: argparse.Namespace) -> None:
    from uffd_pager.service import PagerService
    from uffd_pager.tenants import TenantLimits

    service = PagerService(listener, exit_when_idle=args.exit_when_idle,
                           limits=TenantLimits(max_regions=args.max_regions, max_mapped=args.max_mapped),
                           state_dir=args.state_dir, max_resident=args.max_resident, metrics=args.metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.serve()


def _page_multiple(text: str) -> int:
    value = _positive_int(text)
    if value % 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 4096")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = _listen(args.socket)
        logging.getLogger("uffd_pager").info("listening on %s", args.socket)
    try:
        uvloop.run(_serve(listener, args))
    finally:
        listener.close()
        if args.socket and args.listen_fd is None:
            try:
                os.unlink(args.socket)
            except FileNotFoundError:
                pass
    return 0


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
    if args.store != "file":
        from uffd_pager.bench_remote import run_remote_bench
        return run_remote_bench(args.store, quick=args.quick, pages=args.pages, directory=args.dir)
    from uffd_pager.bench import run_bench

    return run_bench(quick=args.quick, pages=args.pages, directory=args.dir, json_path=args.json)


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, not {text!r}")
    return value


def _writable_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"directory {path!r} does not exist")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {path!r} is not writable")
    return path


def _output_file(path: str) -> str:
    # Checked before the run: the benchmark takes minutes, then would fail to save.
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, not a file")
    _writable_directory(os.path.dirname(path) or ".")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path!r} is not writable")
    return path


def _metrics_address(text: str) -> tuple[str, int]:
    from uffd_pager.metrics_http import parse_listen_address

    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default, metavar="LEVEL",
                        help=f"how much the pager logs: {', '.join(LOG_LEVELS)} (any case; default "
                             f"{DEFAULT_LOG_LEVEL}); INFO: a line per connect, map, unmap, close and failed "
                             "request, DEBUG: and per flush")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uffd-pager",
        description="A user-space pager: file-backed, fork-safe memory regions served by userfaultfd.")
    _add_log_level(parser, DEFAULT_LOG_LEVEL)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
        # --log-level after the command too; SUPPRESS keeps one given before it.
        _add_log_level(sub_parser, argparse.SUPPRESS)
        sub_parser.set_defaults(func=func)
        return sub_parser

    serve = command("serve", "run a pager daemon on a Unix socket", cmd_serve)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="path of the Unix socket to listen on")
    where.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # embedded pager: inherited listener
    serve.add_argument("--exit-when-idle", action="store_true",
                       help="exit once no client and no region is left")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="where the pager keeps what an attacker of the stores must not roll back (encrypted "
                            "stores' anchors); default $UFFD_PAGER_STATE_DIR, else /var/lib/uffd-pager for root, "
                            "else $XDG_STATE_HOME/uffd-pager")
    serve.add_argument("--max-regions", type=_positive_int, default=DEFAULT_MAX_REGIONS, metavar="N",
                       help=f"regions one client uid may hold at once (default {DEFAULT_MAX_REGIONS})")
    serve.add_argument("--max-mapped", type=_positive_int, default=DEFAULT_MAX_MAPPED, metavar="BYTES",
                       help=f"bytes one client uid may have mapped at once (default 2^50)")
    serve.add_argument("--max-resident", type=_page_multiple, default=0, metavar="BYTES",
                       help='bytes all regions with dirty_tracking="sync" may keep resident together, kept by '
                            "page-out (a multiple of 4096; default 0: no such cap)")
    serve.add_argument("--metrics", type=_metrics_address, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9100; "
                            "port 0: any free one, logged at INFO); default: none")

    bench = command("bench", "fault-latency benchmark beside the kernel and a C reference", cmd_bench)
    bench.add_argument("--quick", action="store_true", help="fewer pages: the run of ./run.sh")
    bench.add_argument("--store", choices=("file", "redis", "redis+unix"), default="file",
                       help="file (default): the full table over a file store; redis, redis+unix: remote faults "
                            "and write-back over a private redis-server beside a plain GET / pipelined SET")
    bench.add_argument("--pages", type=_positive_int, metavar="N", help="faults per row (default 16384, quick 4096)")
    bench.add_argument("--dir", type=_writable_directory,
                       help="where to put the benchmark file (default: a new temp dir)")
    bench.add_argument("--json", type=_output_file, metavar="FILE", help="also write the figures as JSON to FILE")

    keygen = command("keygen", "write a new 256-bit key (mode 0600) for map(key_file=...)", cmd_keygen)
    keygen.add_argument("--out", help="create this file (it must not exist) instead of writing to stdout")

    status = command("status", "print a daemon's tenants, regions, connections, fds and memory", cmd_status)
    status.add_argument("--socket", required=True, help="the daemon's socket path")
    status.add_argument("--json", action="store_true", help="print it as JSON, for scripts, instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
