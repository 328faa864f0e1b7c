"""Throwaway certificates for TLS tests: a CA, a server certificate, client certificates."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Certs:
    ca: trustme.CA
    cert: str  # the server's chain, PEM
    key: str
    ca_file: str  # the CA's certificate, to verify clients with

    def settings(self, **more: object) -> dict[str, object]:
        return {"tls_cert": self.cert, "tls_key": self.key, **more}

    def client_context(self, alpn: list[str] | None = None,
                       client_ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A client that trusts the server; with ``client_ca``, it shows a certificate
        from that CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(alpn)
        if client_ca is not None:
            client_ca.issue_cert("client@example.com").configure_cert(context)
        return context


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    server.cert_chain_pems[0].write_to_path(str(cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, str(cert), str(key), str(ca_file))


def tls_connect(context: ssl.SSLContext, address: str, timeout: float = 5.0,
                server_hostname: str = "localhost", sock: socket.socket | None = None
                ) -> ssl.SSLSocket:
    """A blocking TLS client, handshake done."""
    if sock is None:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
