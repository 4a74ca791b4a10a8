"""The client process of tests/conftest.py's `Client` (the `spawn_client`
fixture), as importable code: ``python client_child.py private [RESTARTS]|SOCKET``.

It keeps the line protocol conftest.py documents: first "pager PID", then
one reply a line to each command read from stdin. The pager, the region and
its view are globals of the script, as they were when this ran as
``python -c``: after "exit" (or at the end of stdin) the interpreter's own
shutdown meets whatever is still open.
"""
from __future__ import annotations

import gc
import sys
import time

import uffd_pager

PAGE = uffd_pager.PAGE_SIZE


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    global pager, region, view, expected
    if sys.argv[1] == "private":
        pager = uffd_pager.Pager(**({"restarts": int(sys.argv[2])} if len(sys.argv) > 2 else {}))
    else:
        pager = uffd_pager.connect(sys.argv[1])
    say("pager", pager.pid)
    while line := sys.stdin.readline():
        command, *args = line.split()
        if command == "exit":
            break
        try:
            if command == "map":
                interval = {"writeback_interval": float(args[2])} if len(args) > 2 else {}
                region = pager.map(args[0], int(args[1]), **interval)
                view = region.view()
                with open(args[0].removeprefix("file://"), "rb") as f:
                    expected = f.read(region.size).ljust(region.size, b"\0")
                say("mapped")
            elif command == "read":
                delay = float(args[2]) if len(args) > 2 else 0.0
                for page in range(int(args[0]), int(args[1])):
                    at = slice(page * PAGE, (page + 1) * PAGE)
                    if view[at] != expected[at]:
                        say("differs", page)
                        break
                    time.sleep(delay)
                else:
                    say("same")
            elif command == "write":
                for page in range(int(args[0]), int(args[1])):
                    view[page * PAGE] = int(args[2])
                say("written")
            elif command == "touch":
                say("byte", view[int(args[0]) * PAGE])
            elif command == "stats":
                region.stats()
                say("stats")
            elif command == "close":
                del view
                region.close()
                pager.close()
                say("closed")
            elif command == "drop":
                del region, view
                gc.collect()
                say("dropped")
            else:
                say("error", "UnknownCommand", command)
        except Exception as exc:
            say("error", type(exc).__name__, str(exc).replace("\n", " "))


if __name__ == "__main__":
    main()
