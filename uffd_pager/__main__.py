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


async def _serve(listener: socket.socket, exit_when_idle: bool) -> None:
    from uffd_pager.service import PagerService

    service = PagerService(listener, exit_when_idle=exit_when_idle)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.serve()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = _listen(args.socket)
        logging.getLogger("uffd_pager").info("listening on %s", args.socket)
    try:
        uvloop.run(_serve(listener, args.exit_when_idle))
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
        print(json.dumps(pager.status(), indent=2))
    finally:
        pager.close()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from uffd_pager.crypto import Key

    text = Key.generate().to_text()
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    else:
        fd = sys.stdout.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
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
    from uffd_pager.bench import run_bench

    return run_bench(quick=args.quick, pages=args.pages, directory=args.dir, json_path=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uffd-pager", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a pager daemon on a Unix socket")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="path of the Unix socket to listen on")
    where.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # embedded pager: inherited listener
    serve.add_argument("--exit-when-idle", action="store_true",
                       help="exit once no client and no region is left")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="fault-latency benchmark beside the kernel and a C reference")
    bench.add_argument("--quick", action="store_true", help="fewer pages: the run of ./run.sh")
    bench.add_argument("--pages", type=int, help="faults per row (default 16384, quick 4096)")
    bench.add_argument("--dir", help="where to put the benchmark file (default: a new temp dir)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    bench.set_defaults(func=cmd_bench)

    keygen = sub.add_parser("keygen", help="write a new 256-bit key (mode 0600) for map(key_file=...)")
    keygen.add_argument("--out", help="create this file (it must not exist) instead of writing to stdout")
    keygen.set_defaults(func=cmd_keygen)

    status = sub.add_parser("status", help="print a daemon's connections, regions, fds and memory")
    status.add_argument("--socket", required=True, help="the daemon's socket path")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="uffd-pager[%(process)d] %(levelname)s %(message)s")
    try:
        return args.func(args)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return 1
        print(f"uffd-pager: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
