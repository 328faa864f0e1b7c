"""The settings schema: parsing, precedence, error messages and the shipped example."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from pathlib import Path

import pytest

from octopus import config
from octopus.config import (
    DEFAULTS,
    SETTINGS,
    SETTINGS_BY_NAME,
    Settings,
    from_kwargs,
    load,
    parse_assignment,
    render_example,
)
from octopus.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "octopus.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(func: typing.Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        func()
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the schema and the dataclass agree --


def test_settings_fields_follow_the_schema() -> None:
    fields = [field.name for field in dataclasses.fields(Settings)]
    assert fields == [setting.name for setting in SETTINGS] + ["config_file"]
    assert list(SETTINGS_BY_NAME) == [setting.name for setting in SETTINGS]


def _conforms(value: object, hint: object) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint is float:
        return isinstance(value, float)
    return isinstance(value, hint)  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_parsed_defaults_and_examples_match_the_annotations(setting: config.Setting) -> None:
    hint = typing.get_type_hints(Settings)[setting.name]
    assert _conforms(getattr(DEFAULTS, setting.name), hint)
    if setting.default is None:
        assert setting.example is not None
        assert _conforms(setting.parse(setting.example), hint)
    assert setting.doc.endswith(".")


def test_defaults() -> None:
    assert load() == DEFAULTS == from_kwargs()
    assert DEFAULTS.bind == ("127.0.0.1:9876",)
    assert DEFAULTS.pythonpath == ()
    assert (DEFAULTS.workers, DEFAULTS.backlog, DEFAULTS.framing) == (1, 2048, "raw")
    assert (DEFAULTS.max_message_size, DEFAULTS.max_write_buffer) == (1048576, 33554432)
    assert (DEFAULTS.idle_timeout, DEFAULTS.timeout, DEFAULTS.graceful_timeout) == (0, 30, 30)
    assert DEFAULTS.socket_mode == 0o600 and DEFAULTS.umask is None
    assert DEFAULTS.daemon is False and DEFAULTS.log_level == "info"
    assert (DEFAULTS.broadcast, DEFAULTS.broadcast_channel) == ("local", "octopus")
    assert DEFAULTS.config_file is None


def test_cli_properties() -> None:
    max_connections = SETTINGS_BY_NAME["max_connections"]
    assert max_connections.flag == "--max-connections"
    assert max_connections.metavar == "N" and not max_connections.is_flag
    assert SETTINGS_BY_NAME["daemon"].is_flag
    assert SETTINGS_BY_NAME["bind"].multiple and SETTINGS_BY_NAME["bind"].metavar == "ADDR"
    assert SETTINGS_BY_NAME["workers"].default_text == "1"
    assert SETTINGS_BY_NAME["pidfile"].default_text == "unset"


# -- values --

VALID = [
    ("app", "mod:Cls", "mod:Cls"),
    ("app", "pkg.mod:Outer.Inner", "pkg.mod:Outer.Inner"),
    ("app", None, None),
    ("chdir", "/srv/app", "/srv/app"),
    ("pythonpath", ["a", "b"], ("a", "b")),
    ("pythonpath", "a, b,,", ("a", "b")),
    ("pythonpath", (), ()),
    ("bind", "unix:/tmp/s.sock", ("unix:/tmp/s.sock",)),
    ("bind", 9876, ("9876",)),
    ("bind", ["127.0.0.1:1", "[::1]:2", 3, "fd://3"], ("127.0.0.1:1", "[::1]:2", "3", "fd://3")),
    ("workers", 4, 4),
    ("workers", "4", 4),
    ("backlog", 1, 1),
    ("socket_mode", "0660", 0o660),
    ("socket_mode", "777", 0o777),
    ("framing", "line", "line"),
    ("framing", "LENGTH", "length"),
    ("max_message_size", 10, 10),
    ("idle_timeout", 0, 0.0),
    ("idle_timeout", 2.5, 2.5),
    ("idle_timeout", "1.5", 1.5),
    ("timeout", 1, 1.0),
    ("graceful_timeout", 0, 0.0),
    ("user", "nobody", "nobody"),
    ("user", 0, 0),
    ("group", "1000", 1000),
    ("umask", "0022", 0o22),
    ("umask", None, None),
    ("pidfile", "run/x.pid", "run/x.pid"),
    ("daemon", True, True),
    ("log_level", "DEBUG", "debug"),
    ("log_format", "json", "json"),
    ("broadcast", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("broadcast", "rediss://h", "rediss://h"),
    ("broadcast", "unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("broadcast_channel", "chat", "chat"),
]


@pytest.mark.parametrize(("name", "raw", "expected"), VALID)
def test_valid_values(name: str, raw: object, expected: object) -> None:
    value = getattr(from_kwargs(**{name: raw}), name)
    assert value == expected and type(value) is type(expected)


INVALID = [
    ("app", "mod", "app: expected MODULE:CLASS, got 'mod'"),
    ("app", "mod:", "app: expected MODULE:CLASS, got 'mod:'"),
    ("chdir", "", "chdir: expected a non-empty string, got ''"),
    ("pythonpath", [1], "pythonpath: expected a list of paths or a comma-separated string, "
                        "got [1]"),
    ("bind", "x", "bind: invalid address 'x': expected HOST:PORT, unix:PATH or fd://N"),
    ("bind", ["127.0.0.1:1", "h:99999"], "bind: invalid address 'h:99999': port must be 0-65535"),
    ("bind", [], "bind: expected at least one address, got []"),
    ("bind", True, "bind: invalid address True: expected a string or a port number"),
    ("workers", "many", "workers: expected a positive integer or \"auto\", got 'many'"),
    ("workers", 0, "workers: expected a positive integer or \"auto\", got 0"),
    ("workers", True, "workers: expected a positive integer or \"auto\", got True"),
    ("workers", 2.0, "workers: expected a positive integer or \"auto\", got 2.0"),
    ("backlog", -1, "backlog: expected a positive integer, got -1"),
    ("max_message_size", True, "max_message_size: expected a positive integer, got True"),
    ("max_write_buffer", "32M", "max_write_buffer: expected a positive integer, got '32M'"),
    ("max_connections", None, "max_connections: expected a positive integer, got None"),
    ("socket_mode", 660, 'socket_mode: expected a string of octal digits such as "0660", '
                         "got 660"),
    ("socket_mode", "0980", 'socket_mode: expected a string of octal digits such as "0660", '
                            "got '0980'"),
    ("umask", "01777", 'umask: expected a string of octal digits such as "0660", got \'01777\''),
    ("framing", "json", 'framing: expected one of "raw", "line", "length", got \'json\''),
    ("idle_timeout", -1, "idle_timeout: expected a number of seconds >= 0, got -1"),
    ("idle_timeout", float("inf"), "idle_timeout: expected a number of seconds >= 0, got inf"),
    ("timeout", 0, "timeout: expected a number of seconds > 0, got 0"),
    ("timeout", False, "timeout: expected a number of seconds > 0, got False"),
    ("graceful_timeout", "soon", "graceful_timeout: expected a number of seconds >= 0, "
                                 "got 'soon'"),
    ("user", -1, "user: expected a name or a numeric id, got -1"),
    ("group", "", "group: expected a name or a numeric id, got ''"),
    ("daemon", "yes", "daemon: expected true or false, got 'yes'"),
    ("daemon", 1, "daemon: expected true or false, got 1"),
    ("log_level", "loud", 'log_level: expected one of "debug", "info", "warning", "error", '
                          "\"critical\", got 'loud'"),
    ("log_format", "xml", 'log_format: expected one of "text", "json", got \'xml\''),
    ("broadcast", "redis:/h", 'broadcast: expected "local" or a redis://, rediss:// or unix:// '
                              "URL, got 'redis:/h'"),
    ("broadcast", "redis://", 'broadcast: expected "local" or a redis://, rediss:// or '
                              "unix:// URL, got 'redis://'"),
    ("broadcast_channel", 5, "broadcast_channel: expected a non-empty string, got 5"),
]


@pytest.mark.parametrize(("name", "raw", "message"), INVALID)
def test_invalid_values(name: str, raw: object, message: str) -> None:
    assert config_error(lambda: from_kwargs(**{name: raw})) == message
    if raw is not None:  # load() skips None overrides: "not given"
        assert config_error(lambda: load(overrides={name: raw})) == message


def test_workers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert from_kwargs(workers="auto").workers == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert from_kwargs(workers="auto").workers == 1


def test_replace_validates() -> None:
    settings = DEFAULTS.replace(workers=3, bind=9000)
    assert (settings.workers, settings.bind) == (3, ("9000",))
    assert settings.replace(backlog=5).workers == 3
    assert config_error(lambda: settings.replace(workers="x")).startswith("workers: ")
    assert config_error(lambda: settings.replace(config_file="x")) == (
        "unknown setting 'config_file' (did you mean 'log_file'?)")
    assert settings.addresses()[0].port == 9000


def test_unknown_keyword_suggests_the_setting() -> None:
    message = config_error(lambda: from_kwargs(max_conections=5))
    assert message == "unknown setting 'max_conections' (did you mean 'max_connections'?)"
    assert config_error(lambda: from_kwargs(zzz=1)) == "unknown setting 'zzz'"


# -- the config file --

FILE_ERRORS = [
    ("wokers = 4\n", "{path}: unknown setting 'wokers' (did you mean 'workers'?)"),
    ("workers = 'many'\n", "{path}: workers: expected a positive integer or \"auto\", got 'many'"),
    ("workers = true\n", "{path}: workers: expected a positive integer or \"auto\", got True"),
    ("bind = ['x']\n", "{path}: bind: invalid address 'x': expected HOST:PORT, unix:PATH or fd://N"),
    ("umask = 22\n", '{path}: umask: expected a string of octal digits such as "0660", got 22'),
    ("[server]\nworkers = 2\n",
     "{path}: [server]: tables are not supported; settings are top-level keys"),
    ("workers = [1]\n", "{path}: workers: expected a positive integer or \"auto\", got [1]"),
]


@pytest.mark.parametrize(("text", "message"), FILE_ERRORS)
def test_file_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert config_error(lambda: load(path)) == message.format(path=path)


@pytest.mark.parametrize("text", ["workers = = 4\n", "workers = 4\nbind = [\n"])
def test_toml_syntax_error_is_one_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(lambda: load(path))
    assert re.fullmatch(re.escape(path) + r": invalid TOML: .+ \(at (line \d+, column \d+|"
                        r"end of document)\)", message)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "x.toml")
    assert config_error(lambda: load(missing)) == (
        f"cannot read config file {missing!r}: No such file or directory")
    assert config_error(lambda: load(str(tmp_path))) == (
        f"cannot read config file {str(tmp_path)!r}: Is a directory")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"app = '\xff'\n")
    assert config_error(lambda: load(str(binary))) == f"{binary}: invalid TOML: not UTF-8 text"


def test_precedence_overrides_file_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 3\nlog_level = "debug"\nbind = ["a:1", "b:2"]\n')
    settings = load(path, {"workers": "2", "pidfile": None, "daemon": True})
    assert settings.workers == 2  # the override wins
    assert settings.log_level == "debug"  # the file wins over the default
    assert settings.backlog == 2048 and settings.pidfile is None  # defaults; None = not given
    assert settings.daemon is True
    assert settings.bind == ("a:1", "b:2")
    assert settings.config_file == path
    assert load(path, {"bind": ["c:3"]}).bind == ("c:3",)  # replaced, not appended


def test_override_errors_do_not_blame_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 3\n")
    assert config_error(lambda: load(path, {"workers": "x"})) == (
        "workers: expected a positive integer or \"auto\", got 'x'")
    assert config_error(lambda: load(path, {"wrkers": 1})) == (
        "unknown setting 'wrkers' (did you mean 'workers'?)")


# -- --set KEY=VALUE --

ASSIGNMENTS = [
    ("workers=4", ("workers", 4)),
    ("workers=auto", ("workers", "auto")),
    (" workers = 4 ", ("workers", 4)),
    ('bind=["a:1","b:2"]', ("bind", ["a:1", "b:2"])),
    ("bind=9876", ("bind", 9876)),
    ("app=mod:Cls", ("app", "mod:Cls")),
    ('app="mod:Cls"', ("app", "mod:Cls")),
    ("umask=0022", ("umask", "0022")),
    ("daemon=true", ("daemon", True)),
    ("timeout=1.5", ("timeout", 1.5)),
    ("broadcast=redis://h:6379/0", ("broadcast", "redis://h:6379/0")),
    ("pythonpath=a,b", ("pythonpath", "a,b")),
    ("max-connections=5", ("max_connections", 5)),
    ("chdir=", ("chdir", "")),
    ("pidfile=2024-01-01", ("pidfile", "2024-01-01")),
    ("log_file=a=b", ("log_file", "a=b")),
    ("log_file=1\nx = 2", ("log_file", "1\nx = 2")),
]


@pytest.mark.parametrize(("text", "expected"), ASSIGNMENTS)
def test_parse_assignment(text: str, expected: tuple[str, object]) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("workers", "--set: expected KEY=VALUE, got 'workers'"),
    ("=4", "--set: expected KEY=VALUE, got '=4'"),
    ("wokers=4", "--set: unknown setting 'wokers' (did you mean 'workers'?)"),
])
def test_parse_assignment_errors(text: str, message: str) -> None:
    assert config_error(lambda: parse_assignment(text)) == message


def test_set_values_load() -> None:
    overrides = dict(parse_assignment(text) for text in
                     ["workers=2", "umask=0022", "bind=9876", "app=mod:Cls", "daemon=true"])
    settings = load(overrides=overrides)
    assert (settings.workers, settings.umask, settings.bind) == (2, 0o22, ("9876",))
    assert (settings.app, settings.daemon) == ("mod:Cls", True)


# -- the shipped example --


def test_shipped_example_is_generated() -> None:
    assert (ROOT / "conf" / "octopus.toml").read_text() == render_example()


def test_example_documents_every_setting_and_loads_uncommented(tmp_path: Path) -> None:
    text = render_example()
    # Everything commented out (the defaults), but what the systemd unit needs.
    assert tomllib.loads(text) == {"pidfile": "/run/octopus/octopusd.pid"}
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    assigned = tomllib.loads(uncommented)
    assert list(assigned) == [setting.name for setting in SETTINGS]
    settings = load(write(tmp_path, uncommented))
    for setting in SETTINGS:
        if setting.default is not None:
            assert getattr(settings, setting.name) == getattr(DEFAULTS, setting.name)
