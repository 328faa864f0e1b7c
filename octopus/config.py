"""Settings: one declarative schema for the config file, the CLI and ``Octopus(**kw)``.

Each setting is one :class:`Setting` in :data:`SETTINGS`; its ``parse`` turns a
raw value (from TOML, ``--set`` or a keyword) into the typed value that
:class:`Settings` holds, or raises ValueError/TypeError with a short reason.
CLI flags, ``--help``, ``conf/octopus.toml`` and the defaults derive from it.
Precedence: overrides (the CLI) > config file > defaults. User errors are
one-line ConfigErrors naming the key, and the file when the value came from one.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import json
import math
import os
import pwd
import re
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from octopus.core.address import Address, parse_address, parse_bind
from octopus.errors import ConfigError

Parser = Callable[[object], object]


# -- parsers: raw value -> typed value, or ValueError/TypeError with a reason --


def _expected(what: str, value: object) -> ValueError:
    return ValueError(f"expected {what}, got {value!r}")


def _maybe_int(value: object) -> int | None:
    """An int from an int or a string of digits; None for anything else (bool too)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Upper bounds. Every number a user gives has one, so that a typo is one line
# at start (or a failed reload), never an OverflowError deep in a system call.
MAX_BACKLOG = 65535  # listen() takes an int; the kernel caps it at net.core.somaxconn
# One per CPU of the largest hosts, and more; the scoreboard is sized from
# ``workers`` (coordination.scoreboard.capacity_for), so any of these reloads.
MAX_WORKERS = 1024
MAX_SECONDS = 31_536_000.0  # a year: any longer timeout is a typo
GiB = 2**30


def _at_most(maximum: float, value: object) -> ValueError:
    return ValueError(f"expected at most {maximum:.0f}, got {value!r}")


def _integer(minimum: int, maximum: int) -> Parser:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(value: object) -> int:
        number = _maybe_int(value)
        if number is None or number < minimum:
            raise _expected(what, value)
        if number > maximum:
            raise _at_most(maximum, value)
        return number

    return parse


def _positive_int(maximum: int) -> Parser:
    return _integer(1, maximum)


_LIMIT_MAX = 10**9  # per_ip_connections, per_ip_rate: far above any real client
_count = _integer(0, _LIMIT_MAX)


def _rate(value: object) -> float:
    number = _maybe_float(value)
    if number is None or number < 0:
        raise _expected("a number >= 0", value)
    if number > _LIMIT_MAX:
        raise _at_most(_LIMIT_MAX, value)
    return number


def _ids(lookup: Callable[[str], int], what: str) -> Parser:
    """A list of ids: numbers, or names looked up now (pwd/grp); or one
    comma-separated string."""

    def parse(value: object) -> tuple[int, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, int):
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise _expected(f"a list of {what} names or ids", value)
        ids = []
        for item in items:
            number = _maybe_int(item)
            if number is not None and number >= 0:
                ids.append(number)
                continue
            if not isinstance(item, str) or not item.strip() or number is not None:
                raise _expected(f"a {what} name or an id >= 0", item)
            try:
                ids.append(lookup(item.strip()))
            except KeyError:
                raise ValueError(f"no {what} named {item.strip()!r}") from None
        return tuple(ids)

    return parse


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _workers(value: object) -> int:
    if value == "auto":
        return min(os.cpu_count() or 1, MAX_WORKERS)
    number = _maybe_int(value)
    if number is None or number < 1:
        raise _expected('a positive integer or "auto"', value)
    if number > MAX_WORKERS:
        raise _at_most(MAX_WORKERS, value)
    return number


def _maybe_float(value: object) -> float | None:
    """A finite float from an int, a float or a decimal string; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and not re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*", value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _seconds(positive: bool) -> Parser:
    what = "a number of seconds " + ("> 0" if positive else ">= 0")

    def parse(value: object) -> float:
        number = _maybe_float(value)
        if number is None or number < 0 or (positive and number == 0):
            raise _expected(what, value)
        if number > MAX_SECONDS:
            raise _at_most(MAX_SECONDS, value)
        return number

    return parse


def _choice(*choices: str) -> Parser:
    what = "one of " + ", ".join(json.dumps(choice) for choice in choices)

    def parse(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _expected(what, value)
        return value.lower()

    return parse


def _optional(parse: Parser) -> Parser:
    def parse_optional(value: object) -> object:
        return None if value is None else parse(value)

    return parse_optional


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string", value)
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _app(value: object) -> str:
    dotted = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
    if not isinstance(value, str) or not re.fullmatch(f"{dotted}:{dotted}", value):
        raise _expected("MODULE:CLASS", value)
    return value


def _paths(value: object) -> tuple[str, ...]:
    """A list of strings, or one comma-separated string; empty entries are dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise _expected("a list of paths or a comma-separated string", value)
    return tuple(item.strip() for item in items if item.strip())


def _bind(value: object) -> tuple[str, ...]:
    """One ADDR or a list of them; kept as text (ints become strings)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise _expected("at least one address", value)
    for item in items:
        try:
            parse_bind(item)  # type: ignore[arg-type]  # it rejects other types itself
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return tuple(" ".join(str(item).split()) for item in items)


def _address(value: object) -> str:
    """One ADDR, kept as text."""
    try:
        parse_address(value)  # type: ignore[arg-type]  # it rejects other types itself
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return str(value).strip()


def _names(value: object) -> tuple[str, ...]:
    """A list of non-empty strings, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(item, str) and item.strip() for item in items):
        raise _expected("a list of names or a comma-separated string", value)
    return tuple(item.strip() for item in items)


def _networks(value: object) -> tuple[str, ...]:
    """CIDR networks ("10.0.0.0/8", "::1"), checked now, kept as text."""
    items = _names(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _expected("a network such as \"10.0.0.0/8\"", item) from None
    return items


def _identity(value: object) -> str | int:
    """A user or group: a name, or a numeric id (an int or a string of digits)."""
    number = _maybe_int(value)
    if number is not None and 0 <= number < 2**32 - 1:  # (uid_t) -1 means "no change"
        return number
    if isinstance(value, str) and value.strip() and number is None:
        return value.strip()
    raise _expected("a name or a numeric id", value)


def _octal(value: object) -> int:
    # Modes are strings: TOML has no octal literal with a leading 0, and a
    # decimal 660 silently means something else.
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{1,4}", value) \
            or int(value, 8) > 0o777:
        raise _expected('a string of octal digits such as "0660"', value)
    return int(value, 8)


def _octal_text(mode: int) -> str:
    return f"{mode:04o}"


def _broadcast(value: object) -> str:
    schemes = ("redis://", "rediss://", "unix://")
    if value == "local" or (isinstance(value, str) and value.startswith(schemes)
                            and value.partition("://")[2]):
        return value
    raise _expected('"local" or a redis://, rediss:// or unix:// URL', value)


# -- the schema --


@dataclass(frozen=True)
class Setting:
    """One setting: its name, parser, raw default (as written in TOML) and doc."""

    name: str
    parse: Parser
    default: object  # the raw default, as it would be written in TOML; None = unset
    doc: str
    metavar: str = "VALUE"
    multiple: bool = False  # the CLI option may be repeated (values form a list)
    example: object = None  # shown in conf/octopus.toml for settings unset by default
    # Set (not commented out) in conf/octopus.toml, which systemd/octopusd.service
    # reads: the value that fits the unit.
    shipped: object = None
    # The parsed value written back as ``parse`` reads it (``octopusd config``).
    unparse: Callable[[Any], object] = lambda value: value

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        """A boolean: the CLI option takes no value."""
        return isinstance(self.default, bool)

    @property
    def default_text(self) -> str:
        return "unset" if self.default is None else toml_value(self.default)


SECTIONS: tuple[tuple[str, tuple[Setting, ...]], ...] = (
    ("Application", (
        Setting("app", _optional(_app), None,
                "The SocketConnection subclass to serve, as MODULE:CLASS. The working "
                "directory and the pythonpath entries are on the import path.",
                "MODULE:CLASS", example="myapp:EchoConnection"),
        Setting("chdir", _optional(_text), None,
                "Directory to change to before importing the application.",
                "DIR", example="/srv/myapp"),
        Setting("pythonpath", _paths, [],
                "Extra directories put on the import path: a list, or one "
                "comma-separated string.", "DIR", multiple=True),
    )),
    ("Listening", (
        Setting("bind", _bind, ["127.0.0.1:9876"],
                "Addresses to listen on: HOST:PORT, [IPV6]:PORT, a port number, unix:PATH "
                'or fd://N, each optionally followed by the flags "tls", "proxy" and '
                '"ws" ("0.0.0.0:9443 proxy tls", "0.0.0.0:8080 ws"). A list or one address; '
                "sockets passed by systemd (LISTEN_FDS) take its place.", "ADDR", multiple=True),
        Setting("backlog", _positive_int(MAX_BACKLOG), 2048,
                "Listen backlog: connections the kernel queues before they are accepted.",
                "N"),
        Setting("socket_mode", _octal, "0600",
                "File mode of the Unix sockets octopus creates, as a string of octal "
                "digits. An abstract socket (unix:@name) has no file: any local user "
                "can connect to it (see unix_allow_uids).", "MODE", unparse=_octal_text),
    )),
    ("Workers", (
        Setting("workers", _workers, 1,
                'Number of worker processes, or "auto" for one per CPU.', "N"),
        Setting("max_connections", _positive_int(2**20), 10000,
                "Connections per worker, those still in a TLS handshake or PROXY header "
                "included (these may take at most half); beyond it the worker stops "
                "accepting and new clients wait in the backlog.", "N"),
        Setting("timeout", _seconds(positive=True), 30,
                "Seconds a worker's loop may go without a heartbeat before the master "
                "kills and replaces it.", "SECONDS"),
        Setting("graceful_timeout", _seconds(positive=False), 30,
                "Seconds retiring workers get to finish their connections on reload or "
                "stop.", "SECONDS"),
        Setting("reload_handoff", _bool, False,
                "On reload (and TTOU), move open connections to the new workers instead "
                "of draining them: the socket, its unread input and unsent output, and "
                "what the class's suspend() returns, handed to resume() in the new code. "
                "TLS connections cannot move and drain as before. Takes effect for "
                "workers started with it on."),
        Setting("threads", _positive_int(1024), 4,
                "Threads in each worker's pool for run_in_thread() (blocking calls off "
                "the event loop). The pool starts on first use: a worker that never "
                "uses it has no threads.", "N"),
    )),
    ("Connections", (
        Setting("framing", _choice("raw", "line", "length"), "raw",
                'Framing when the connection class sets none: "raw" (each read as it '
                'arrived), "line" (newline-delimited) or "length" (4-byte big-endian '
                "length prefix).", "raw|line|length"),
        Setting("max_message_size", _positive_int(GiB), 1048576,
                "Largest framed message in bytes; one byte more ends the connection. "
                "Also the largest broadcast() that reaches the other workers.",
                "BYTES"),
        Setting("max_write_buffer", _positive_int(64 * GiB), 33554432,
                "Bytes pending for one connection before it is disconnected as a slow "
                "consumer.", "BYTES"),
        Setting("max_worker_buffer", _positive_int(256 * GiB), 1073741824,
                "Bytes pending in one worker, all its connections together; past it the "
                "connections with the most pending output are disconnected first, as slow "
                "consumers.", "BYTES"),
        Setting("idle_timeout", _seconds(positive=False), 0,
                "Seconds without input before a connection is closed; 0 never closes it.",
                "SECONDS"),
        Setting("linger_timeout", _seconds(positive=False), 2,
                "Seconds a closing connection waits for the peer's EOF after the "
                "server's FIN, reading and discarding what still arrives: closing with "
                "unread input would send an RST, which can destroy the reply the peer "
                "has not read yet. A stop with idle clients connected takes up to this "
                "long. 0 closes at once.", "SECONDS"),
    )),
    ("Privileges", (
        Setting("user", _optional(_identity), None,
                "User name or id the workers switch to after binding; the master keeps "
                "its own, to bind again on reload.", "USER", example="nobody"),
        Setting("group", _optional(_identity), None,
                "Group name or id the workers switch to after binding.",
                "GROUP", example="nogroup"),
        Setting("umask", _optional(_octal), None,
                "Umask of the workers, as a string of octal digits.",
                "MODE", example="0022", unparse=_octal_text),
    )),
    ("Process", (
        Setting("pidfile", _optional(_text), None,
                "File the master writes its pid to; stop, reload and status read it.",
                "PATH", example="/run/octopus/octopusd.pid",
                shipped="/run/octopus/octopusd.pid"),
        Setting("daemon", _bool, False,
                "Detach and run in the background; start returns once the server "
                "accepts."),
    )),
    ("Logging", (
        Setting("log_level", _choice("debug", "info", "warning", "error", "critical"),
                "info", "Lowest level logged.", "LEVEL"),
        Setting("log_file", _optional(_text), None,
                "File to log to instead of stderr (under systemd, stderr goes to the "
                "journal); reopened on SIGUSR1.",
                "PATH", example="/var/log/octopus/octopusd.log"),
        Setting("log_format", _choice("text", "json"), "text",
                'Log line format: "text", or "json" for one JSON object a line.',
                "text|json"),
    )),
    ("Broadcast", (
        Setting("broadcast", _broadcast, "local",
                'Where broadcast() goes: "local" (the workers of this server) or a Redis '
                'URL such as "redis://127.0.0.1:6379/0" (every server sharing it).', "URL"),
        Setting("broadcast_channel", _text, "octopus",
                "Channel name on the shared broadcast backend; servers that share it see "
                "each other's broadcasts.", "NAME"),
    )),
    ("TLS and PROXY protocol", (
        Setting("tls_cert", _optional(_text), None,
                'PEM certificate (the chain may follow it) for the bind addresses '
                'flagged "tls" ("0.0.0.0:9443 tls"). Read by each worker when it boots, '
                "so a reload picks up a renewed certificate.",
                "PATH", example="/etc/octopus/cert.pem"),
        Setting("tls_key", _optional(_text), None,
                "PEM private key of tls_cert (unset: the cert file holds it).",
                "PATH", example="/etc/octopus/key.pem"),
        Setting("tls_ca", _optional(_text), None,
                "PEM bundle of the CAs that sign client certificates.",
                "PATH", example="/etc/octopus/clients-ca.pem"),
        Setting("tls_verify", _choice("none", "optional", "required"), "none",
                'Client certificates: "none" (not asked for), "optional" (verified when '
                'sent) or "required".', "none|optional|required"),
        Setting("tls_min_version", _choice("1.2", "1.3"), "1.2",
                'Oldest TLS version accepted: "1.2" or "1.3".', "1.2|1.3"),
        Setting("tls_ciphers", _optional(_text), None,
                "OpenSSL cipher string for TLS 1.2 (unset: OpenSSL's default).",
                "CIPHERS", example="ECDHE+AESGCM:ECDHE+CHACHA20"),
        Setting("tls_alpn", _names, [],
                "ALPN protocols offered, in order of preference.", "PROTOCOL",
                multiple=True),
        Setting("tls_handshake_timeout", _seconds(positive=True), 10,
                "Seconds a client gets to complete the TLS handshake.", "SECONDS"),
        Setting("proxy_trusted", _networks, [],
                'Networks (CIDR) allowed to send PROXY headers on listeners flagged '
                '"proxy"; empty: any peer.', "CIDR", multiple=True),
        Setting("proxy_timeout", _seconds(positive=True), 5,
                "Seconds a client gets to send its PROXY header.", "SECONDS"),
    )),
    ("WebSocket", (
        Setting("ws_subprotocols", _names, [],
                'Subprotocols the listeners flagged "ws" accept, in the server\'s order of '
                "preference; the first one the client offers is chosen. A client that "
                "offers none is served without one.", "NAME", multiple=True),
        Setting("ws_origins", _names, [],
                "Origin header values allowed to open a WebSocket (others get 403); empty "
                "allows any. Requests without an Origin (clients that are not browsers) "
                "are allowed.", "ORIGIN", multiple=True),
        Setting("ws_ping_interval", _seconds(positive=False), 20,
                "Seconds between the server's pings on an open WebSocket; 0 never pings.",
                "SECONDS"),
        Setting("ws_ping_timeout", _seconds(positive=True), 20,
                "Seconds to wait for the pong before the connection is closed as dead.",
                "SECONDS"),
        Setting("ws_close_timeout", _seconds(positive=True), 10,
                "Seconds a WebSocket the server closes waits for the peer's close frame "
                "and EOF.", "SECONDS"),
        Setting("ws_compression", _choice("off", "deflate"), "off",
                '"off" or "deflate" (permessage-deflate, 12-bit windows). With '
                "reload_handoff, compressed connections drain with close code 1012 "
                "instead of moving.", "off|deflate"),
    )),
    ("Admission", (
        Setting("per_ip_connections", _count, 0,
                "Most open connections from one client address, all workers together "
                "(on a proxy listener, the address in the PROXY header); 0: no limit. "
                "Clients behind one NAT share an address. Refused connections are "
                "closed at accept, before any TLS handshake or connect().", "N"),
        Setting("per_ip_rate", _rate, 0,
                "Most new connections per second from one client address (a token "
                "bucket: bursts of twice that); 0: no limit.", "N"),
        Setting("admission_dry_run", _bool, False,
                "Count and log what per_ip_connections, per_ip_rate and the unix_allow "
                "lists would refuse, and refuse nothing: to tune the limits."),
        Setting("unix_allow_uids", _ids(_uid, "user"), [],
                "On Unix listeners, serve only peers whose uid (SO_PEERCRED) is listed "
                "(user names or ids), or whose gid is in unix_allow_gids; both empty: "
                "any peer. The one protection of abstract sockets (unix:@name).",
                "USER", multiple=True),
        Setting("unix_allow_gids", _ids(_gid, "group"), [],
                "On Unix listeners, serve peers whose gid is listed (group names or ids).",
                "GROUP", multiple=True),
    )),
    ("Metrics", (
        Setting("metrics_bind", _optional(_address), None,
                "Address where the master serves GET /metrics (Prometheus text format) "
                "and GET /health (200 when every worker is ready and accepting, else "
                "503): HOST:PORT, [IPV6]:PORT or unix:PATH. Unset: not served.",
                "ADDR", example="127.0.0.1:9100"),
    )),
)

SETTINGS: tuple[Setting, ...] = tuple(s for _, group in SECTIONS for s in group)
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _prefix(origin: str | None) -> str:
    return f"{origin}: " if origin else ""


def _unknown(name: str, origin: str | None) -> ConfigError:
    close = difflib.get_close_matches(name, SETTINGS_BY_NAME, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{_prefix(origin)}unknown setting {name!r}{hint}")


def _parse_all(raw: Mapping[str, object], origin: str | None) -> dict[str, Any]:
    """Parse every value of ``raw``; ``origin`` (a file name) prefixes the errors."""
    for name in raw:
        if name not in SETTINGS_BY_NAME:
            raise _unknown(name, origin)
    parsed: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            parsed[name] = SETTINGS_BY_NAME[name].parse(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{_prefix(origin)}{name}: {exc}") from None
    return parsed


# -- the parsed settings --


@dataclass(frozen=True)
class Settings:
    """Parsed, validated settings: one typed attribute per entry of SETTINGS."""

    app: str | None
    chdir: str | None
    pythonpath: tuple[str, ...]
    bind: tuple[str, ...]
    backlog: int
    socket_mode: int
    workers: int
    max_connections: int
    timeout: float
    graceful_timeout: float
    reload_handoff: bool
    threads: int
    framing: str
    max_message_size: int
    max_write_buffer: int
    max_worker_buffer: int
    idle_timeout: float
    linger_timeout: float
    user: str | int | None
    group: str | int | None
    umask: int | None
    pidfile: str | None
    daemon: bool
    log_level: str
    log_file: str | None
    log_format: str
    broadcast: str
    broadcast_channel: str
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    tls_verify: str
    tls_min_version: str
    tls_ciphers: str | None
    tls_alpn: tuple[str, ...]
    tls_handshake_timeout: float
    proxy_trusted: tuple[str, ...]
    proxy_timeout: float
    ws_subprotocols: tuple[str, ...]
    ws_origins: tuple[str, ...]
    ws_ping_interval: float
    ws_ping_timeout: float
    ws_close_timeout: float
    ws_compression: str
    per_ip_connections: int
    per_ip_rate: float
    admission_dry_run: bool
    unix_allow_uids: tuple[int, ...]
    unix_allow_gids: tuple[int, ...]
    metrics_bind: str | None
    # Not a user setting: the file load() read (absolute), for reload to read again.
    config_file: str | None = None

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` (raw or typed values) validated and applied."""
        return dataclasses.replace(self, **_parse_all(changes, None))

    def bind_entries(self) -> list[tuple[Address, frozenset[str]]]:
        """``bind`` parsed: each address and its flags (validated when these
        settings were made)."""
        return [parse_bind(text) for text in self.bind]

    def addresses(self) -> tuple[Address, ...]:
        return tuple(address for address, _ in self.bind_entries())

    def listener_flags(self) -> dict[str, frozenset[str]]:
        """The flags of each bind entry by its key (``listener_keys``)."""
        return dict(zip(self.listener_keys(), (f for _, f in self.bind_entries()),
                        strict=True))

    def listener_keys(self) -> list[str]:
        """A key per bind entry: its address as ``str(Address)`` writes it, so
        that a reload keeps the socket of an address whose flags changed; a
        repeated address ("127.0.0.1:0" twice) gets "#2", "#3"... appended."""
        keys: list[str] = []
        for address, _ in self.bind_entries():
            text = str(address)
            seen = sum(1 for key in keys if key.partition("#")[0] == text)
            keys.append(f"{text}#{seen + 1}" if seen else text)
        return keys


DEFAULTS = Settings(**_parse_all({s.name: s.default for s in SETTINGS}, None))


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for name, value in document.items():
        if isinstance(value, dict) and name not in SETTINGS_BY_NAME:
            raise ConfigError(f"{path}: [{name}]: tables are not supported; "
                              "settings are top-level keys")
    return document


def load(config_file: str | None = None,
         overrides: Mapping[str, object] | None = None) -> Settings:
    """Defaults, then the TOML ``config_file``, then ``overrides``, all validated.

    An override of None means "not given" and is skipped (the CLI passes every
    option). A list value (``bind``) replaces the file's, it is not appended.
    The result keeps ``config_file`` as an absolute path, for reload.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_parse_all(_read_file(config_file), config_file))
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    values.update(_parse_all(given, None))
    path = None if config_file is None else os.path.abspath(config_file)
    return dataclasses.replace(DEFAULTS, config_file=path, **values)


def from_kwargs(**kwargs: object) -> Settings:
    """Settings for ``Octopus(cls, **settings)``: defaults with ``kwargs`` applied."""
    return DEFAULTS.replace(**kwargs)


def parse_assignment(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE``: the value as TOML when it is one, else the raw string.

    ``workers=4`` gives 4, ``bind=["a:1","b:2"]`` a list, ``app=mod:Cls`` the
    string. Dashes in KEY are read as underscores. The value is not validated here.
    """
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise ConfigError(f"--set: expected KEY=VALUE, got {text!r}")
    if name not in SETTINGS_BY_NAME:
        raise _unknown(name, "--set")
    raw = raw.strip()
    try:
        document = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return name, raw
    value = document.get("v")
    if list(document) != ["v"] or not isinstance(value, (str, int, float, bool, list)):
        return name, raw  # a date, a table, or a value smuggling in more keys
    return name, value


# -- the annotated example file --


def toml_value(value: object) -> str:
    """``value`` (str, bool, number or list of them) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


_HEADER = """\
# octopus configuration: TOML with flat top-level keys (octopusd --config FILE).
# Every setting is shown with its default, commented out; uncomment to change.
# Only pidfile is set: systemd/octopusd.service and this file work together as
# they are (/etc/octopus/octopus.toml; logs go to the journal).
# The command line overrides this file: each setting is also an option
# (--max-connections 500), and --set NAME=VALUE takes any of them.
# "octopusd reload" re-reads this file. Generated from octopus/config.py.
"""


def render_example() -> str:
    """The annotated ``conf/octopus.toml``, generated from SETTINGS."""
    lines = [_HEADER.rstrip("\n")]
    for title, group in SECTIONS:
        lines += ["", f"# ---- {title} " + "-" * (72 - len(title)), ""]
        for setting in group:
            lines += textwrap.wrap(setting.doc, 78, initial_indent="# ",
                                   subsequent_indent="# ")
            if setting.shipped is not None:
                lines.append("# Set for systemd/octopusd.service (its RuntimeDirectory); "
                             "unset by default.")
                lines.append(f"{setting.name} = {toml_value(setting.shipped)}")
            elif setting.default is None:
                example = toml_value(setting.example)
                lines.append(f"# {setting.name} = {example}  # an example; unset by default")
            else:
                lines.append(f"# {setting.name} = {toml_value(setting.default)}")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_effective(settings: Settings) -> str:
    """``settings`` as a TOML file that ``load`` reads back to the same settings
    (``octopusd config``): every setting, those unset as comments."""
    source = settings.config_file or "defaults"
    lines = [f"# octopus settings in effect (from {source} and the command line)."]
    for setting in SETTINGS:
        value = getattr(settings, setting.name)
        if value is None:
            lines.append(f"# {setting.name} is unset")
        else:
            lines.append(f"{setting.name} = {toml_value(setting.unparse(value))}")
    return "\n".join(lines) + "\n"
