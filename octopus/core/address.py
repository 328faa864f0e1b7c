"""ADDR parsing: the text a user writes for a listening address.

Accepted forms (SPEC section 2)::

    9876 / "9876" / ":9876"   TCP port on all interfaces (IPv4, and IPv6 where present)
    "HOST:PORT"               TCP on a host name or IPv4 address
    "[V6]:PORT"               TCP on an IPv6 address
    "unix:PATH" / "/a/path"   Unix-domain stream socket (a bare path contains "/")
    "fd://N"                  an already-listening socket inherited as descriptor N

A bind entry may follow the address with flag words, nginx-style
(``"0.0.0.0:9443 proxy tls"``): ``tls`` serves TLS, ``proxy`` expects a PROXY
protocol header first. Parsing is pure: nothing is resolved or bound here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from octopus.errors import ConfigError

Kind = Literal["tcp", "unix", "fd"]
FLAGS = ("tls", "proxy")


@dataclass(frozen=True)
class Address:
    kind: Kind
    host: str = ""  # tcp: "" means every interface
    port: int = 0  # tcp: 0 lets the kernel choose
    path: str = ""  # unix
    fd: int = -1  # fd

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host or '*'}:{self.port}"


def _port(text: str, addr: object) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"invalid address {addr!r}: port must be 0-65535")
    return int(text)


def parse_address(addr: str | int) -> Address:
    """Parse one ADDR; raise ConfigError naming it when it is not valid."""
    if isinstance(addr, bool) or not isinstance(addr, (str, int)):
        raise ConfigError(f"invalid address {addr!r}: expected a string or a port number")
    if isinstance(addr, int):
        return Address("tcp", port=_port(str(addr), addr))
    text = addr.strip()
    if not text:
        raise ConfigError("invalid address '': empty")
    if text.startswith("unix:"):
        if not text[5:]:
            raise ConfigError(f"invalid address {addr!r}: missing socket path")
        return Address("unix", path=text[5:])
    if "/" in text and not text.startswith("fd://") and not text.startswith("["):
        return Address("unix", path=text)
    if text.startswith("fd://"):
        if not text[5:].isdigit():
            raise ConfigError(f"invalid address {addr!r}: fd:// takes a descriptor number")
        return Address("fd", fd=int(text[5:]))
    if text.isdigit():
        return Address("tcp", port=_port(text, addr))
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ConfigError(f"invalid address {addr!r}: expected [IPV6]:PORT")
        return Address("tcp", host=host, port=_port(port, addr))
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"invalid address {addr!r}: expected HOST:PORT, unix:PATH or fd://N")
    if ":" in host:
        raise ConfigError(f"invalid address {addr!r}: write IPv6 addresses as [V6]:PORT")
    return Address("tcp", host=host, port=_port(port, addr))


def parse_bind(entry: str | int) -> tuple[Address, frozenset[str]]:
    """Parse one bind entry: an ADDR and its flag words; ConfigError naming it."""
    if isinstance(entry, str) and len(words := entry.split()) > 1:
        address = parse_address(words[0])
        unknown = [word for word in words[1:] if word not in FLAGS]
        if unknown:
            raise ConfigError(f"invalid address {entry!r}: unknown flag {unknown[0]!r} "
                              f"(expected {' or '.join(FLAGS)})")
        return address, frozenset(words[1:])
    return parse_address(entry), frozenset()
