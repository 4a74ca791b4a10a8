"""The daemon's configuration file: TOML, one key per `uffd-pager serve`
option, spelled as the option without its dashes in front
(``max-regions = 64`` for ``--max-regions 64``); lists and modes are
strings, as on the command line (``allow-users = "alice,1001"``,
``socket-mode = "0660"``).

The file is read strictly: an unknown key (a typo would otherwise silently
leave a limit at its default), a value of the wrong type and one out of
its option's range are refused, naming the file and the key.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from uffd_pager.logs import LOG_LEVELS
from uffd_pager.tenants import parse_groups, parse_users
from uffd_pager.uffd import PAGE_SIZE

DEFAULT_PATH = "/etc/uffd-pager.toml"


class ConfigError(ValueError):
    """The configuration file cannot be read, or holds a key or value `serve` refuses."""


# The rules of the options' values, for the file's keys and the command
# line's options alike (__main__.py): each returns the value, or raises
# ValueError saying what the value must be.


def positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def page_multiple(value: int) -> int:
    """A byte count of whole pages (0: none)."""
    if value < 0 or value % PAGE_SIZE:
        raise ValueError(f"must be a multiple of {PAGE_SIZE} (0: none)")
    return value


def _path(value: str) -> str:
    if not value or "\0" in value:
        raise ValueError("must be a non-empty path")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value


def _rule(rule: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """A key's check by one of the rules above: what the value must be, or None."""
    def check(value: Any) -> str | None:
        try:
            rule(value)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def parse_socket_mode(text: str) -> int:
    """The socket file's mode from octal text; ValueError says what is expected."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or (mode & 0o600) != 0o600:
        raise ValueError(f"expected an octal mode from 0600 to 0777 (the pager's own user must read and "
                         f"write it), not {text!r}")
    return mode


def _parses(parse: Callable[[str], Any]) -> Callable[[str], str | None]:
    """A rule of a key whose text the option's own parser reads (the command
    line's type), so that both refuse the same values with the same words."""
    def check(value: str) -> str | None:
        try:
            parse(value)
        except ValueError as exc:
            return f"is refused: {exc}"
        return None
    return check


def listen_address(text: str) -> tuple[str, int]:
    """The metrics' HOST:PORT (metrics_http.parse_listen_address)."""
    from uffd_pager.metrics_http import parse_listen_address  # prometheus_client only where metrics are asked for

    return parse_listen_address(text)


def one_group(text: str) -> int:
    """The gid of one group's name or number."""
    if "," in text or not text.strip():
        raise ValueError(f"one group, not {text!r}")
    (gid,) = parse_groups(text)
    return gid


@dataclass(frozen=True)
class Key:
    """One key of the file: the serve option `--NAME`, its TOML type, its rule."""
    name: str
    kind: type
    check: Callable[[Any], str | None] | None = None

    @property
    def dest(self) -> str:
        """The option's attribute in the parsed command line."""
        return self.name.replace("-", "_")


KEYS = {key.name: key for key in (
    Key("socket", str, _rule(_path)),
    Key("state-dir", str, _rule(_path)),
    Key("exit-when-idle", bool),
    Key("max-regions", int, _rule(positive)),
    Key("max-mapped", int, _rule(positive)),
    Key("max-resident", int, _rule(page_multiple)),
    Key("tenant-max-resident", int, _rule(page_multiple)),
    Key("tenant-max-fds", int, _rule(positive)),
    Key("log-level", str, _rule(_log_level)),
    Key("allow-users", str, _parses(parse_users)),
    Key("allow-groups", str, _parses(parse_groups)),
    Key("socket-mode", str, _parses(parse_socket_mode)),
    Key("socket-group", str, _parses(one_group)),
    Key("metrics", str, _parses(listen_address)),
)}

_TOML_TYPES = {str: "a string", int: "an integer", bool: "true or false"}


def config_path(given: str | None, *, embedded: bool) -> str | None:
    """The file to read: the one given, else DEFAULT_PATH if it exists. An
    embedded pager (the library's private one) reads no file it was not
    given: a machine's daemon settings are not the application's."""
    if given is not None:
        return given
    if embedded or not os.path.exists(DEFAULT_PATH):
        return None
    return DEFAULT_PATH


def load(path: str) -> dict[str, Any]:
    """The file's settings by option attribute (``max_regions``), checked;
    ConfigError names the file and the key of anything refused."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    values = {}
    for name, value in table.items():
        key = KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are {', '.join(KEYS)}"
            raise ConfigError(f"config file {path}: unknown key {name!r}{hint}")
        # bool is an int to Python, never to TOML: `max-regions = true` is refused
        if type(value) is not key.kind:
            raise ConfigError(f"config file {path}: {name} must be {_TOML_TYPES[key.kind]}, not {value!r}")
        complaint = key.check(value) if key.check else None
        if complaint:
            raise ConfigError(f"config file {path}: {name} {complaint}, not {value!r}")
        values[key.dest] = value.upper() if name == "log-level" else value
    return values
