"""``octopusd check`` and ``octopusd config`` take every option ``start`` takes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from octopus import config
from tests import procs

OPTIONS = ["--app", "app:App", "--workers", "3", "--bind", "unix:a.sock proxy",
           "--bind", "127.0.0.1:0", "--socket-mode", "0660", "--umask", "0022",
           "--tls-alpn", "h2,chat/1", "--set", "idle_timeout=2.5", "--set",
           'pythonpath=["lib"]', "--reload-handoff", "--user", "0", "--log-format", "json"]


def test_check_takes_the_options_of_start(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    result = servers.run("check", *OPTIONS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("ok: app:App (app.App), 3 worker(s), "
                             "bind unix:a.sock proxy, 127.0.0.1:0\n")
    assert not (tmp_path / "a.sock").exists()
    bad = {
        ("--set", "workers=many"): "workers: expected a positive integer",
        ("--bind", "nowhere"): "bind: invalid address 'nowhere'",
        ("--set", "log_file=logs/x.log"): "log_file: cannot open logs/x.log: directory",
    }
    for args, expected in bad.items():
        line = procs.one_line_error(servers.run("check", "--app", "app:App", *args))
        assert expected in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["app.py"]


def test_config_prints_toml_that_config_accepts_back(tmp_path: Path,
                                                     servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    (tmp_path / "base.toml").write_text('graceful_timeout = 7\nbroadcast_channel = "chat"\n')
    first = servers.run("config", "--config", "base.toml", *OPTIONS)
    assert first.returncode == 0, first.stderr
    assert 'tls_alpn = ["h2", "chat/1"]\n' in first.stdout
    assert 'socket_mode = "0660"\n' in first.stdout and 'umask = "0022"\n' in first.stdout
    assert "graceful_timeout = 7.0\n" in first.stdout
    assert "# pidfile is unset\n" in first.stdout
    (tmp_path / "effective.toml").write_text(first.stdout)

    again = servers.run("config", "--config", "effective.toml")
    assert again.returncode == 0, again.stderr
    body = [line for line in first.stdout.splitlines() if not line.startswith("# octopus")]
    assert [line for line in again.stdout.splitlines()
            if not line.startswith("# octopus")] == body
    assert servers.run("check", "--config", "effective.toml").returncode == 0


def test_every_setting_survives_the_round_trip(tmp_path: Path) -> None:
    examples = {s.name: s.example for s in config.SETTINGS if s.example is not None}
    for settings in (config.DEFAULTS, config.from_kwargs(**examples)):
        path = tmp_path / "effective.toml"
        path.write_text(config.render_effective(settings))
        loaded = config.load(str(path))
        assert dataclasses.replace(loaded, config_file=None) == settings
