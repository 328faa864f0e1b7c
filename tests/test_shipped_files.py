"""The shipped deployment files work as shipped: deploy/haproxy.cfg, and the
systemd unit with conf/octopus.toml."""

from __future__ import annotations

import configparser
import shutil
import socket
import tomllib
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = shutil.which("haproxy")
PRLIMIT = shutil.which("prlimit")
# Lines of the global section that name this host's files and users.
HOST_SPECIFIC = ("log ", "user ", "group ", "chroot ", "stats socket ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(HAPROXY is None or PRLIMIT is None, reason="needs haproxy and prlimit")
def test_the_haproxy_config_starts_under_a_descriptor_limit_of_20000(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    lines = [line for line in text.splitlines()
             if not line.strip().startswith(HOST_SPECIFIC) and not line.lstrip().startswith("#")]
    config = "\n".join(lines) + "\n"
    plain, tls = free_port(), free_port()
    for old, new in {"bind :9876": f"bind 127.0.0.1:{plain}",
                     "bind :9443": f"bind 127.0.0.1:{tls}"}.items():
        assert old in config
        config = config.replace(old, new)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    assert HAPROXY is not None and PRLIMIT is not None
    # As root, HAProxy raises its soft limit to what maxconn needs, up to the hard one.
    haproxy = procs.ProcessGroup([PRLIMIT, "--nofile=20000:20000", HAPROXY, "-db", "-f",
                                  str(path)], tmp_path, merge_stdout=True)
    try:
        def accepting() -> bool:
            assert haproxy.proc.poll() is None, f"haproxy exited:\n{haproxy.log}"
            try:
                socket.create_connection(("127.0.0.1", plain), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(accepting, message=f"haproxy to listen:\n{haproxy.log}")
    finally:
        haproxy.kill()


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(ROOT / "systemd" / "octopusd.service")
    return parser


def test_the_unit_and_the_shipped_config_fit_together() -> None:
    service = unit()["Service"]
    settings = tomllib.loads((ROOT / "conf" / "octopus.toml").read_text())
    # The pidfile lies in the unit's RuntimeDirectory, the one place under /run
    # that ProtectSystem=strict leaves writable: stop, reload and status find it.
    runtime = Path("/run") / service["RuntimeDirectory"]
    assert Path(settings["pidfile"]).parent == runtime
    assert service["ProtectSystem"] == "strict"
    # Logs go to the journal: stderr, no log_file; Type=notify keeps it in the foreground.
    assert "log_file" not in settings and "daemon" not in settings
    assert service["Type"].startswith("notify")
    assert "--config /etc/octopus/octopus.toml" in service["ExecStart"]
    # An example log file, uncommented, would land in the unit's LogsDirectory.
    example = (ROOT / "conf" / "octopus.toml").read_text()
    assert f'# log_file = "/var/log/{service["LogsDirectory"]}/' in example
