"""`uffd-pager serve --config FILE`: a TOML file of serve's options, read
strictly, the command line overriding it; and `uffd-pager --version`."""
from __future__ import annotations

import errno
from importlib.metadata import version
from pathlib import Path

import pytest

from support import assert_usage_error, map_and_check, run_cli
from uffd_pager import PAGE_SIZE, config
from uffd_pager.__main__ import build_parser
from uffd_pager.errors import LimitExceeded

SIZE = 16 * PAGE_SIZE


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(60)
def test_config_file_sets_the_socket_and_the_limits(start_daemon, socket_dir, tmp_path, random_file):
    store = random_file(SIZE)
    path = write_config(tmp_path / "pager.toml", f'socket = "{socket_dir / "from-config.sock"}"\n'
                                                 'max-regions = 1\n')
    daemon = start_daemon("from-config.sock", options=["--config", path])
    with daemon.connect() as pager:
        with map_and_check(pager, store, SIZE):
            with pytest.raises(LimitExceeded) as refused:
                pager.map(f"file://{store}", SIZE)
            assert refused.value.errno == errno.EDQUOT and "--max-regions" in str(refused.value)
        with map_and_check(pager, store, SIZE):  # the first one's place is free again
            pass


@pytest.mark.timeout(60)
def test_command_line_overrides_the_config_file(start_daemon, socket_dir, tmp_path, random_file):
    store = random_file(SIZE)
    path = write_config(tmp_path / "pager.toml", f'socket = "{socket_dir / "not-this.sock"}"\nmax-regions = 1\n')
    daemon = start_daemon("this.sock", options=["--config", path, "--socket", str(socket_dir / "this.sock"),
                                                "--max-regions", "2"])
    assert not (socket_dir / "not-this.sock").exists()
    with daemon.connect() as pager, map_and_check(pager, store, SIZE), map_and_check(pager, store, SIZE):
        assert pager.status()["regions"] == 2


@pytest.mark.parametrize("argv, level", [
    (["serve"], "DEBUG"),
    (["serve", "--log-level", "error"], "ERROR"),
    (["--log-level", "info", "serve"], "INFO"),
])
def test_log_level_of_the_config_file_unless_given_before_or_after_serve(tmp_path, argv, level):
    settings = config.load(write_config(tmp_path / "pager.toml", 'log-level = "debug"\nmax-regions = 3\n'))
    args = build_parser(settings).parse_args(argv)
    assert (args.log_level, args.max_regions) == (level, 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, words", [
    ("max_regions = 4\n", ["unknown key 'max_regions'", "did you mean 'max-regions'"]),
    ('colour = "blue"\n', ["unknown key 'colour'", "socket", "max-mapped"]),
    ("[serve]\nmax-regions = 4\n", ["unknown key 'serve'"]),
])
def test_an_unknown_key_is_refused(tmp_path, text, words):
    path = write_config(tmp_path / "pager.toml", text)
    result = run_cli("serve", "--config", path, "--socket", str(tmp_path / "never.sock"))
    assert_usage_error(result, path, *words)
    assert not (tmp_path / "never.sock").exists(), "it listened before refusing"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, words", [
    ('max-regions = "16"\n', ["max-regions must be an integer", "'16'"]),
    ("max-regions = true\n", ["max-regions must be an integer", "True"]),
    ("socket = 5\n", ["socket must be a string", "5"]),
    ('exit-when-idle = "yes"\n', ["exit-when-idle must be true or false"]),
    ("max-regions = 0\n", ["max-regions must be at least 1"]),
    ("max-resident = 1000\n", ["max-resident must be a multiple of 4096", "1000"]),
    ('log-level = "loud"\n', ["log-level must be one of DEBUG, INFO, WARNING, ERROR", "'loud'"]),
    ("max-regions = \n", ["not valid TOML"]),
    ('allow-users = "no-such-user-here"\n', ["allow-users is refused: no user named 'no-such-user-here'"]),
    ('allow-groups = ["users"]\n', ["allow-groups must be a string"]),
    ('socket-mode = "0400"\n', ["socket-mode is refused: expected an octal mode from 0600 to 0777"]),
    ('socket-group = "users,nogroup"\n', ["socket-group is refused: one group"]),
    ('metrics = "localhost"\n', ["metrics is refused"]),
])
def test_a_value_of_the_wrong_type_or_range_is_refused_naming_its_key(tmp_path, text, words):
    path = write_config(tmp_path / "pager.toml", text)
    result = run_cli("serve", "--config", path, "--socket", str(tmp_path / "never.sock"))
    assert_usage_error(result, path, *words)


@pytest.mark.parametrize("key, value, refusal", [
    ("max-resident", 0, None), ("max-resident", 8192, None), ("max-resident", 1000, "must be a multiple of 4096"),
    ("tenant-max-resident", 0, None), ("max-regions", 0, "must be at least 1"), ("max-regions", 7, None),
    ("tenant-max-fds", 0, "must be at least 1"), ("max-mapped", -4096, "must be at least 1"),
])
def test_the_config_file_and_the_command_line_take_and_refuse_the_same_values(tmp_path, key, value, refusal):
    """One rule for each: a value the file takes, the option takes (0, "no
    cap", was refused on the command line), in the same words otherwise."""
    path = write_config(tmp_path / "pager.toml", f"{key} = {value}\n")
    if refusal is None:
        assert getattr(build_parser(config.load(path)).parse_args(["serve"]), key.replace("-", "_")) == value
        assert getattr(build_parser().parse_args(["serve", f"--{key}", str(value)]), key.replace("-", "_")) == value
        return
    with pytest.raises(config.ConfigError, match=refusal):
        config.load(path)
    result = run_cli("serve", f"--{key}", str(value), "--socket", str(tmp_path / "never.sock"))
    assert_usage_error(result, refusal)


def test_every_serve_option_has_a_key_and_reads_as_on_the_command_line(tmp_path):
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = {action.dest for action in serve._actions if action.option_strings and action.dest not in
               ("help", "config", "listen_fd", "parent_pid")}  # the library's private pager's own
    assert options == {key.dest for key in config.KEYS.values()}, "an option the config file cannot set, or the reverse"
    settings = config.load(write_config(tmp_path / "pager.toml", 'allow-users = "nobody,0"\nallow-groups = "users"\n'
                                        'socket-mode = "0660"\nsocket-group = "100"\nmetrics = "127.0.0.1:0"\n'))
    args = build_parser(settings).parse_args(["serve"])
    assert (args.allow_users, args.allow_groups, args.socket_mode, args.socket_group, args.metrics) == \
        (frozenset({65534, 0}), frozenset({100}), 0o660, 100, ("127.0.0.1", 0))


@pytest.mark.timeout(60)
def test_a_missing_config_file_is_refused(tmp_path):
    missing = str(tmp_path / "missing.toml")
    assert_usage_error(run_cli("serve", "--config", missing, "--socket", str(tmp_path / "never.sock")),
                       missing, "No such file")


@pytest.mark.timeout(60)
def test_serve_without_a_socket_anywhere_is_a_usage_error(tmp_path):
    path = write_config(tmp_path / "pager.toml", "max-regions = 4\n")
    assert_usage_error(run_cli("serve", "--config", path), "no socket", "--socket", "config file")


def test_the_default_file_is_read_by_a_daemon_only(tmp_path, monkeypatch):
    default = tmp_path / "uffd-pager.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(default))
    assert config.config_path(None, embedded=False) is None  # absent: no file
    default.write_text("max-regions = 4\n")
    assert config.config_path(None, embedded=False) == str(default)
    assert config.config_path(None, embedded=True) is None, "the library's private pager read the daemon's file"
    assert config.config_path("/x.toml", embedded=True) == "/x.toml"


@pytest.mark.timeout(60)
def test_version_prints_the_installed_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"uffd-pager {version('uffd_pager')}\n"
    assert version("uffd_pager")[0].isdigit()


@pytest.mark.timeout(60)
def test_a_tenant_at_its_descriptor_limit_is_told_and_what_it_lets_go_is_free_again(start_daemon, random_file):
    """--tenant-max-fds 7: a connection costs 2, a region 3 — one
    connection and one region fit, a second region does not, and a second
    connection with the region held does; what is let go is free again."""
    store = random_file(SIZE)
    daemon = start_daemon("fds.sock", args=["--tenant-max-fds", "7"])
    with daemon.connect() as pager, map_and_check(pager, store, SIZE):
        with pytest.raises(LimitExceeded) as refused:
            pager.map(f"file://{store}", SIZE)
        assert refused.value.errno == errno.EDQUOT and "--tenant-max-fds" in str(refused.value)
        with daemon.connect() as second:  # 5 + 2
            assert second.status()["connections"] == 2
            with pytest.raises(LimitExceeded, match="--tenant-max-fds"):
                daemon.connect().status()  # 7 + 2: refused at the door, and told why
    with daemon.connect() as pager, map_and_check(pager, store, SIZE):
        assert pager.status()["regions"] == 1
