"""TLS through ``ssl.MemoryBIO``: the socket path stays the plain one.

OpenSSL never touches the socket here. The connection reads and writes
ciphertext exactly as a plain connection reads and writes its bytes (one
``recv`` per readiness event, its own write buffer, EPOLLOUT, the slow-consumer
limit), and TLS sits where framing sits: :class:`TLSLayer` is the connection's
framer, decrypting what is fed before the application's framing splits it,
and encrypting each outgoing message after it is framed. A plain connection
has no layer and pays nothing for TLS.

Facts this relies on:
- ``SSLObject.read`` returns at most one record's plaintext per call, so
  every fed chunk is read until ``SSLWantReadError``: nothing may stay
  decrypted-but-undelivered, since no epoll event would announce it;
- ``SSLObject.write`` into a MemoryBIO never blocks: the BIO grows, and the
  connection's write buffer bounds what waits;
- reading can make OpenSSL write (a TLS 1.3 KeyUpdate answer), so what the
  outgoing BIO holds is flushed with the next message.

Certificates are loaded by each worker when it boots (``make_context``), so a
reload picks up renewed files; the master loads them once too, to fail
``start``, ``check`` and a reload with one line when they are wrong.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from octopus.core.framing import FrameError
from octopus.errors import ConfigError

if TYPE_CHECKING:
    from octopus.config import Settings
    from octopus.core.framing import Framer

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
RECORD = 16384  # the largest TLS record's plaintext: what one SSLObject.read returns


class TLSError(Exception):
    """A handshake or record failure; ``str()`` is one line for the debug log."""


def uses_tls(settings: Settings) -> bool:
    return any("tls" in flags for flags in settings.listener_flags().values())


def check(settings: Settings) -> None:
    """Fail with one line (ConfigError) if the TLS settings cannot serve."""
    if uses_tls(settings):
        make_context(settings)


def make_context(settings: Settings) -> ssl.SSLContext:
    """The server context for ``settings``; ConfigError with one line when it cannot be."""
    if not settings.tls_cert:
        raise ConfigError("a tls listener needs tls_cert (and tls_key, unless the cert "
                          "file holds the key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:  # before OSError, its base class
        raise ConfigError(_pem_problem(settings.tls_cert, settings.tls_key, exc)) from None
    except FileNotFoundError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename or settings.tls_cert!r}: "
                          "no such file") from None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {settings.tls_cert!r}: {exc.strerror}") from None
    if settings.tls_ca:
        try:
            context.load_verify_locations(settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca: cannot load {settings.tls_ca!r}: {_reason(exc)}") \
                from None
    context.verify_mode = _VERIFY[settings.tls_verify]
    if settings.tls_verify != "none" and not settings.tls_ca:
        raise ConfigError(f'tls_verify = "{settings.tls_verify}" needs tls_ca')
    if settings.tls_ciphers:
        try:
            context.set_ciphers(settings.tls_ciphers)
        except ssl.SSLError:
            raise ConfigError(f"tls_ciphers: no cipher matches {settings.tls_ciphers!r}") \
                from None
    if settings.tls_alpn:
        context.set_alpn_protocols(list(settings.tls_alpn))
    context.sni_callback = _remember_server_name
    return context


def _pem_problem(cert: str, key: str | None, exc: ssl.SSLError) -> str:
    """One line naming the file at fault: OpenSSL's own words ("pem lib")
    name neither the file nor what is wrong with it."""
    def holds(path: str, marker: bytes) -> bool:
        try:
            with open(path, "rb") as file:
                return marker in file.read(1 << 20)
        except OSError:
            return False

    if not holds(cert, b"-----BEGIN CERTIFICATE-----"):
        return f"tls_cert: {cert} holds no PEM certificate"
    key_file = key or cert
    if not holds(key_file, b"PRIVATE KEY-----"):
        where = "tls_key" if key else "tls_cert (no tls_key given)"
        return f"{where}: {key_file} holds no PEM private key"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"tls_key: {key_file} is not the key of the certificate in {cert}"
    return f"tls_cert/tls_key: cannot load {cert}" + (f" with {key}" if key else "") + \
        f": {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def _remember_server_name(obj: Any, server_name: str | None, context: ssl.SSLContext) -> None:
    # The server side learns SNI only here; keep it for connection.tls.
    obj.octopus_server_name = server_name


@dataclass(frozen=True)
class TLSInfo:
    """``connection.tls`` of a TLS connection."""

    version: str | None
    cipher: str | None
    alpn_protocol: str | None
    server_name: str | None
    peer_cert: dict[str, Any] | None


class Handshake:
    """The server side of one handshake over memory buffers (sans-IO).

    ``feed()`` the bytes read from the peer (``b""`` at EOF); it returns True
    once the handshake is complete. ``data_to_send()`` gives what must be
    written to the peer after every feed. Failures raise TLSError.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def feed(self, data: bytes) -> bool:
        if not data:
            self.incoming.write_eof()
        else:
            self.incoming.write(data)
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            if not data:
                raise TLSError("TLS: the client closed during the handshake") from None
            return False
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake failed: {_reason(exc)}") from None
        return True

    def data_to_send(self) -> bytes:
        return self.outgoing.read()

    def info(self) -> TLSInfo:
        obj = self.obj
        cipher = obj.cipher()
        return TLSInfo(
            version=obj.version(),
            cipher=cipher[0] if cipher else None,
            alpn_protocol=obj.selected_alpn_protocol(),
            server_name=getattr(obj, "octopus_server_name", None),
            peer_cert=obj.getpeercert() or None,
        )

    def layer(self, inner: Framer | None) -> TLSLayer:
        """The connection's framer once the handshake is done."""
        return TLSLayer(self, inner)


class TLSLayer:
    """TLS under the application's framing: ciphertext in and out, messages between."""

    __slots__ = ("_incoming", "_inner", "_outgoing", "_pending", "_read", "_unwrap", "_write",
                 "name")

    def __init__(self, handshake: Handshake, inner: Framer | None) -> None:
        obj = handshake.obj
        self._incoming, self._outgoing = handshake.incoming, handshake.outgoing
        self._read, self._write, self._pending = obj.read, obj.write, obj.pending
        self._inner = inner
        self.name = "tls+" + (inner.name if inner is not None else "raw")
        self._unwrap = obj.unwrap

    def pending(self) -> list[bytes]:
        """Messages from what the handshake already buffered (sent with its last flight)."""
        return self._messages(self._decrypt())

    def feed_messages(self, data: bytes) -> list[bytes]:
        if data:
            self._incoming.write(data)
            plain = self._decrypt()
            if not plain:
                return []
            inner = self._inner
            return [plain] if inner is None else inner.feed_messages(plain)
        self._incoming.write_eof()
        plain = self._decrypt()
        inner = self._inner
        if inner is None:
            return [plain] if plain else []
        messages = inner.feed_messages(plain) if plain else []
        return messages + inner.feed_messages(b"")

    def _decrypt(self) -> bytes:
        read, incoming, buffered = self._read, self._incoming, self._pending
        chunks = []
        try:
            # Stop when nothing is left rather than on SSLWantReadError: the
            # exception costs more than the record it would report.
            chunk = read(RECORD)
            if not incoming.pending and not buffered():
                return chunk  # one record: the common case
            while chunk:
                chunks.append(chunk)
                if not incoming.pending and not buffered():
                    break
                chunk = read(RECORD)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify (the peer's TCP EOF follows), or TCP EOF without it:
            # many clients just close; either way the framing sees an EOF.
            pass
        except ssl.SSLError as exc:
            raise FrameError(f"TLS: {_reason(exc)}") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _messages(self, plain: bytes) -> list[bytes]:
        if not plain:
            return []
        inner = self._inner
        return [plain] if inner is None else inner.feed_messages(plain)

    def frame(self, message: bytes) -> bytes:
        inner = self._inner
        self._write(message if inner is None else inner.frame(message))
        return self._outgoing.read()

    def frame_into(self, buffer: bytearray, message: bytes) -> None:
        buffer += self.frame(message)

    def close_notify(self) -> bytes:
        """The close_notify alert to send before our FIN."""
        try:
            self._unwrap()
        except ssl.SSLError:  # SSLWantReadError: the peer's alert has not come yet
            pass
        return self._outgoing.read()
