"""TLS mode: echo over TLS and handshakes per second, octopus against uvloop and C.

    python bench/run.py --tls [--quick] [--workers 1,2]

Servers: octopus (``octopus_echo.py --tls-cert C --tls-key K``: a listener
``"ADDR tls"``), uvloop (``uvloop_tls_echo.py``: ``create_server(ssl=...)``)
and the C floor (``c_tls_echo``: OpenSSL on epoll), all with the same
throwaway self-signed ECDSA P-256 certificate made for the run, and OpenSSL's
defaults: TLS 1.3 and its first cipher. The load generator is ``loadgen_tls``
(``loadgen.c`` built with ``-DLOADGEN_TLS``), which verifies nothing and
resumes no session. Scenarios per worker count: pingpong and pipeline 16
(CPU per message), and connect churn (connect, handshake, one round trip,
close): its msg/s is handshakes per second. Server and load generator are
pinned as in --scaling.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
from pathlib import Path

import report
import scaling
from report import Section
from runner import Run, Scenario, echo_scenarios, matching, run_all, select_servers
from servers import TLS_PROGRAMS, build

TLS_SERVERS = ("octopus-tls", "uvloop-tls", "c-tls")


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, valid two days, and its key (PEM)."""
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            sys.exit("run.py --tls: needs the cryptography package or the openssl command")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key


def plan(args: argparse.Namespace) -> list[Scenario]:
    return matching(args, [sc for w in args.worker_counts
                           for sc in echo_scenarios("tls", w, args.conns)])


def negotiated(runs: list[Run]) -> list[str]:
    """The protocol and cipher each server negotiated, as the load generator saw them."""
    seen: dict[str, set[str]] = {}
    for r in runs:
        if r.get("tls"):
            seen.setdefault(r["server"], set()).add(r["tls"])
    lines = report.header(["server", "protocol and cipher"])
    return lines + [report.row([server, ", ".join(sorted(found))])
                    for server, found in seen.items()]


def sections(runs: list[Run]) -> list[Section]:
    ok = [r for r in runs if "failed" not in r and "skipped" not in r]
    out = []
    for base, lines in report.workers_tables(ok, "uvloop-tls", "c-tls"):
        what = ("handshakes: msg/s is handshakes per second, CPU per handshake"
                if "/connect/" in base else "echo")
        out.append((f"TLS {what}, {base}", lines))
    out.append(("Negotiated", negotiated(ok)))
    return out


def run(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Run], list[Section]]:
    try:
        build(TLS_PROGRAMS)
    except (subprocess.CalledProcessError, OSError) as exc:
        sys.exit(f"run.py --tls: cannot build the OpenSSL programs ({exc}); "
                 "they need OpenSSL's headers (apt-get install libssl-dev)")
    scaling.configure(args, workers=[1])
    args.tls_files = make_cert(tmpdir)
    specs = select_servers(args, TLS_SERVERS)
    runs = run_all(args, specs, plan(args), tmpdir)
    for r in runs:
        if r.get("server") == "octopus-tls" and "skipped" in r:
            last = r["skipped"].rsplit(" | ", 1)[-1].strip()
            r["skipped"] = ("did not start: octopus's TLS (tls_cert, tls_key, a listener "
                            f"\"ADDR tls\") is missing or failed here; its log ends: {last}")
    return runs, sections(runs)
