"""TLS under octopusd: certificates checked at start, renewed by reload, bad ones refused."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from tests import procs
from tests.helpers import wait_until
from tests.tls_certs import Certs, make_certs, tls_connect

APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(b"tls " + (self.tls.version or "").encode())
"""


def serial(certs: Certs, address: str) -> str:
    """The serial number of the certificate the server presents, after one round trip."""
    with tls_connect(certs.client_context(), address) as client:
        client.sendall(b"hi\n")
        assert client.recv(100).startswith(b"tls TLSv1.")
        cert = client.getpeercert()
    assert cert is not None
    return str(cert["serialNumber"])


def test_reload_renews_certificates_and_refuses_broken_ones(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP)
    certs = make_certs(tmp_path)
    pidfile = tmp_path / "octopusd.pid"
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 tls", "--workers", "2",
                           "--tls-cert", certs.cert, "--tls-key", certs.key,
                           "--pidfile", "octopusd.pid")
    port = server.wait_ready()
    address = f"127.0.0.1:{port}"
    first = serial(certs, address)

    # A broken certificate file: the reload fails with one line, the old workers serve on.
    saved = tmp_path / "saved.pem"
    shutil.copy(certs.cert, saved)
    Path(certs.cert).write_text("not a certificate\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: procs.status(pidfile)["reload"]["status"] == "failed",
               message="the reload to fail")
    assert "tls_cert" in procs.status(pidfile)["reload"]["error"]
    assert serial(certs, address) == first

    # A renewed certificate (same CA, new key): the next reload serves it.
    renewed = certs.ca.issue_cert("localhost", "127.0.0.1")
    renewed.private_key_pem.write_to_path(certs.key)
    renewed.cert_chain_pems[0].write_to_path(certs.cert)
    server.signal(signal.SIGHUP)
    wait_until(lambda: procs.status(pidfile)["reload"]["status"] == "ok",
               message="the second reload to succeed")
    server.wait_for_log("reload complete")
    wait_until(lambda: serial(certs, address) != first, message="the renewed certificate")
    assert "Traceback" not in server.log


def test_start_and_check_refuse_a_missing_certificate(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP)
    config = tmp_path / "octopus.toml"
    config.write_text('app = "app:App"\nbind = ["127.0.0.1:0 tls"]\n'
                      f'tls_cert = "{tmp_path / "missing.pem"}"\n')
    for command in ("start", "check"):
        line = procs.one_line_error(servers.run(command, "--config", str(config)))
        assert "missing.pem" in line, line
    config.write_text('app = "app:App"\nbind = ["127.0.0.1:0 tlss"]\n')
    line = procs.one_line_error(servers.run("check", "--config", str(config)))
    assert "unknown flag 'tlss'" in line, line


def test_one_address_twice_with_different_flags(tmp_path: Path,
                                                servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP.replace('(self.tls.version or "")', '(self.tls and "on" or "")'))
    certs = make_certs(tmp_path)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 tls",
                           "--bind", "127.0.0.1:0", "--tls-cert", certs.cert,
                           "--tls-key", certs.key, "--pidfile", "octopusd.pid")
    server.wait_ready()
    tls_address, plain_address = procs.status(tmp_path / "octopusd.pid")["master"]["listening"]
    assert tls_address != plain_address
    with tls_connect(certs.client_context(), tls_address) as client:
        client.sendall(b"hi\n")
        assert client.recv(100) == b"tls on\n"
    with procs.connect(int(plain_address.rpartition(":")[2])) as sock:
        assert procs.ask(sock) == b"tls "
