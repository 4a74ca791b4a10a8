"""The pager's log levels and line format, shared by the command line and
the embedded pager's `Pager(log_level=...)`."""
from __future__ import annotations

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "WARNING"
# The pid of the pager process; every line about a client names the client's pid itself.
LOG_FORMAT = "uffd-pager[%(process)d] %(levelname)s %(message)s"


def parse_log_level(value: object) -> str:
    """The level's name in capitals, or ValueError naming the choices."""
    if isinstance(value, str) and value.upper() in LOG_LEVELS:
        return value.upper()
    raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)} (any case), not {value!r}")
