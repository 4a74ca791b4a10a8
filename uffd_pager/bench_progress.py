"""Progress of a benchmark run on stderr, so that stdout keeps only the
table scripts read. A run takes minutes and its rows are interleaved in
rounds: each step says what starts now, where the run stands and how long it
has taken, so a person sees it move and, if it hangs, where. On a terminal
the steps share one line, rewritten in place; elsewhere (a log, a pipe) each
step is a line of its own."""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    def __init__(self, what: str, total: int, stream: TextIO | None = None) -> None:
        self._what = what
        self._total = total
        self._done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._started = time.monotonic()

    def step(self, name: str) -> None:
        """Step `name` starts now (the one before it has finished)."""
        self._done += 1
        self._say(f"{self._what} [{self._done:{len(str(self._total))}}/{self._total} "
                  f"{_clock(time.monotonic() - self._started)}] {name}")

    def finish(self) -> None:
        self._say(f"{self._what}: {self._done} steps done in {_clock(time.monotonic() - self._started)}")
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _say(self, line: str) -> None:
        if self._tty:
            # One screen line: \r cannot go back over a line the terminal wrapped.
            width = (os.get_terminal_size(self._stream.fileno()).columns or 80) - 1  # 0: a size never set
            self._stream.write(f"\r\x1b[K{line[:width]}")  # \x1b[K: erase what a longer line left
        else:
            self._stream.write(f"{line}\n")
        self._stream.flush()
