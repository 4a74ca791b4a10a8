"""The plumbing of a child process that a test runs as a script,
``python tests/scenarios.py NAME ARGS...`` or ``python tests/hostile_clients.py
NAME ARGS...``: a registry of its functions by name, reports on stdout,
orders on stdin, and the command line that runs one function.

A child reports on stdout, one JSON object a line, each with a "what" key
(and the reporting process's "pid"); one that takes orders reads them from
stdin, one line each. Every line is written with os.write and read byte by
byte, so that nothing sits in a buffer across fork() or os._exit. A function
that raises reports "error" with its traceback and the process exits with
status 1.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Callable


def report(what: str, **fields: Any) -> None:
    data = (json.dumps({"what": what, "pid": os.getpid(), **fields}) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def order(*, eof_error: bool = False) -> str:
    """The next line on stdin (read byte by byte: no buffer to inherit);
    once stdin is closed "", or EOFError if `eof_error`."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            if eof_error:
                raise EOFError("stdin closed")
            return ""
        line += byte
    return line.decode().strip()


class PlainRegistry:
    """The functions of a child script that keeps a plain stdout protocol
    (what the test parses is whatever it prints), run as a ``python -c``
    script would be: an exception is a traceback on stderr and status 1,
    and the process ends by the interpreter's own exit unless the function
    says os._exit."""

    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., None]] = {}

    def register(self, name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def add(function: Callable[..., None]) -> Callable[..., None]:
            self.functions[name] = function
            return function

        return add

    def main(self, argv: list[str] | None = None) -> None:
        name, *args = sys.argv[1:] if argv is None else argv
        self.functions[name](*args)


class Registry:
    """The functions a child script runs by name: ``@registry.register(NAME)``
    adds one, ``registry.main()`` runs the one the command line names."""

    def __init__(self) -> None:
        self.functions: dict[str, tuple[Callable[..., None], bool]] = {}

    def register(self, name: str, *, normal_exit: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
        """A function returns into `main`, which ends the process with
        os._exit(0), unless it is registered with ``normal_exit=True``: those
        test the interpreter's own way out (sys.exit, the end of the script)."""

        def add(function: Callable[..., None]) -> Callable[..., None]:
            self.functions[name] = (function, normal_exit)
            return function

        return add

    def main(self, argv: list[str] | None = None) -> None:
        name, *args = sys.argv[1:] if argv is None else argv
        function, normal_exit = self.functions[name]
        try:
            function(*args)
        except SystemExit:
            raise
        except BaseException:
            report("error", traceback=traceback.format_exc())
            os._exit(1)
        if not normal_exit:
            os._exit(0)
