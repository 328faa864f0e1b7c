"""``octopusd``: the command line (SPEC section 2).

Only this module exits: library code raises ``OctopusError`` and the user
sees one line, ``octopusd: <reason>``, with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import IO, Any

import click

from octopus import __version__, config, logs
from octopus.errors import OctopusError
from octopus.supervisor import control, pidfile

NOT_RUNNING = 3  # LSB: program is not running


class UserError(click.ClickException):
    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"octopusd: {self.format_message()}", err=True)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OctopusError as exc:
            raise UserError(str(exc)) from None


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """A ``--name-with-dashes`` option for every setting, from the one schema."""
    for setting in reversed(config.SETTINGS):
        decls = [f"{setting.flag}/--no-{setting.flag[2:]}"] if setting.is_flag else [setting.flag]
        command = click.option(
            *decls, setting.name, default=None, multiple=setting.multiple,
            metavar=None if setting.is_flag else setting.metavar,
            help=f"{setting.doc} [default: {setting.default_text}]",
        )(command)
    return command


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_file", metavar="FILE",
                        help="TOML config file (flat top-level keys).")(command)


def all_settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--config``, ``--set`` and an option per setting: what start, check and config take."""
    command = settings_options(command)
    command = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                           help="Any setting, e.g. --set idle_timeout=30.")(command)
    return config_option(command)


def load_settings(config_file: str | None, assignments: tuple[str, ...] = (),
                  options: dict[str, Any] | None = None) -> tuple[config.Settings, dict[str, Any]]:
    """Settings and the CLI overrides that made them (kept for reload).

    A repeatable option takes a comma-separated list as well (``--tls-alpn
    h2,chat/1`` is ``--tls-alpn h2 --tls-alpn chat/1``)."""
    overrides: dict[str, Any] = dict(config.parse_assignment(a) for a in assignments)
    for name, value in (options or {}).items():
        if value is not None and value != ():
            overrides[name] = _split_commas(value) if isinstance(value, tuple) else value
    return config.load(config_file, overrides), overrides


def _split_commas(values: tuple[str, ...]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def check_paths(settings: config.Settings) -> None:
    """What start would meet with the files it writes and reads, found now:
    the log file, the pidfile and the TLS files. OctopusError with one line."""
    from octopus.transports import tls

    if settings.log_file:
        logs.check_file(settings.log_file)
    if settings.pidfile:
        pidfile.check(settings.pidfile)
    tls.check(settings)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="octopusd")
def main() -> None:
    """A prefork, epoll-based socket server."""


@main.command()
@all_settings_options
def start(config_file: str | None, assignments: tuple[str, ...], **options: Any) -> None:
    """Start the master and its workers (in the foreground unless --daemon)."""
    from octopus.master import Master

    settings, overrides = load_settings(config_file, assignments, options)
    if not settings.app:
        raise UserError("no application: pass --app MODULE:CLASS or set app in the config")
    check_paths(settings)

    def run(on_ready: Callable[[], None] | None = None) -> None:
        logs.configure(settings.log_level, settings.log_file, settings.log_format)
        Master(settings, overrides=overrides, on_ready=on_ready).run()

    if settings.daemon:
        from octopus.supervisor.daemon import daemonize

        if not settings.log_file:
            click.echo("octopusd: warning: --daemon without log_file: the log is discarded "
                       "once detached (set log_file)", err=True)
        daemonize(run, [])
    else:
        run()


def _pid_file(config_file: str | None, path: str | None) -> str:
    if path:
        return path
    settings, _ = load_settings(config_file)
    if not settings.pidfile:
        raise UserError("no pidfile: pass --pidfile, or --config with a pidfile setting",
                        NOT_RUNNING)
    return settings.pidfile


def _running_pid(config_file: str | None, path: str | None) -> tuple[int, str]:
    """The master the pidfile names, once it is proven to be this server's master."""
    path = _pid_file(config_file, path)
    try:
        return pidfile.find_master(path, control.control_path(path)), path
    except pidfile.NotRunning as exc:
        raise UserError(str(exc), NOT_RUNNING) from None


def pidfile_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--pidfile", "pid_path", metavar="PATH",
                           help="The master's pidfile.")(command)
    return config_option(command)


@main.command()
@pidfile_options
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="How long to wait for the master to exit [graceful_timeout + 10].")
@click.option("--quick", is_flag=True, help="Quick stop (SIGINT): close everything now.")
def stop(config_file: str | None, pid_path: str | None, timeout: float | None,
         quick: bool) -> None:
    """Stop the master: gracefully (SIGTERM), or at once with --quick (SIGINT)."""
    pid, _ = _running_pid(config_file, pid_path)
    if timeout is None:
        timeout = (load_settings(config_file)[0].graceful_timeout if config_file else 30) + 10
    os.kill(pid, signal.SIGINT if quick else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise UserError(f"master {pid} still running after {timeout:g}s")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@main.command()
@pidfile_options
@click.option("--no-wait", is_flag=True, help="Only send SIGHUP; do not wait for the outcome.")
@click.option("--timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the new generation.")
def reload(config_file: str | None, pid_path: str | None, no_wait: bool,
           timeout: float) -> None:
    """Reload: new workers with fresh code, then retire the old ones (SIGHUP).

    Waits until the new generation serves (exit 0), or until the reload has
    failed and the old generation serves on (exit 1, with the reason).
    """
    pid, path = _running_pid(config_file, pid_path)
    if no_wait:
        os.kill(pid, signal.SIGHUP)
        return
    ctl = control.control_path(path)
    before = _ask_master(pid, ctl)["reload"]
    os.kill(pid, signal.SIGHUP)
    snapshot = _wait_for_reload(pid, ctl, before, timeout)
    outcome, generation = snapshot["reload"], snapshot["master"]["generation"]
    if outcome["status"] != "ok":
        raise UserError(f"reload failed: {outcome['error']}; generation {generation} "
                        "serves on")
    click.echo(f"reloaded: generation {generation} serving")


def _ask_master(pid: int, ctl: str) -> dict[str, Any]:
    try:
        return control.query(ctl)
    except (OSError, ValueError) as exc:
        raise UserError(f"master {pid} does not answer on its control socket: {exc}") from None


def _wait_for_reload(pid: int, ctl: str, before: dict[str, Any],
                     timeout: float) -> dict[str, Any]:
    """The first status whose reload outcome answers a request made after ``before``."""
    asked = before.get("requested")
    deadline = time.monotonic() + timeout
    while True:
        try:
            snapshot = control.query(ctl)
        except (OSError, ValueError):
            if not _alive(pid):
                raise UserError(f"master {pid} exited before the reload finished") from None
            snapshot = None  # busy: ask again
        if snapshot is not None:
            outcome = snapshot["reload"]
            if (outcome.get("answered", 0) > asked if asked is not None
                    else outcome["time"] != before["time"]):  # a master without the count
                return snapshot
        if time.monotonic() >= deadline:
            raise UserError(f"reload not finished after {timeout:g}s (master {pid} is still "
                            "booting the new workers; see status)")
        time.sleep(0.05)


@main.command()
@pidfile_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_file: str | None, pid_path: str | None, as_json: bool) -> None:
    """Show the master, its workers and the last reload's outcome."""
    pid, path = _running_pid(config_file, pid_path)
    try:
        snapshot = control.query(control.control_path(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"master {pid} does not answer on its control socket: {exc}") from None
    if as_json:
        click.echo(json.dumps(snapshot))
        return
    master, reload_ = snapshot["master"], snapshot["reload"]
    click.echo(f"master {master['pid']}: up {master['age']:.0f}s, generation "
               f"{master['generation']}, listening on {', '.join(master['listening'])}")
    for w in snapshot["workers"]:
        click.echo(f"  worker {w['index']} pid {w['pid']} gen {w['generation']} {w['state']}: "
                   f"age {w['age']:.0f}s, {w['connections']} connections, "
                   f"{w['messages_in']} in, {w['messages_out']} out, "
                   f"{w['restarts']} restarts" + _process_text(w))
    if "totals" in snapshot:
        _echo_totals(snapshot["totals"])
    if reload_["time"] is None:
        click.echo("last reload: none")
    else:
        outcome = reload_["status"] + (f": {reload_['error']}" if reload_["error"] else "")
        handoff = reload_.get("handoff")
        if handoff:
            outcome += (f"; hand-off: {handoff['moved']} moved, {handoff['drained']} drained, "
                        f"{handoff['failed']} failed")
            if handoff["pending"]:
                outcome += f" ({handoff['pending']} worker(s) still handing off)"
        click.echo(f"last reload: {outcome}")


def _process_text(worker: dict[str, Any]) -> str:
    if worker.get("rss_bytes") is None:
        return ""
    return (f", cpu {worker['cpu_seconds']:.2f}s, rss {worker['rss_bytes'] / 2**20:.1f} MiB, "
            f"heartbeat {worker['heartbeat_age']:.2f}s ago")


def _counts(counts: dict[str, int]) -> str:
    """``eof 3, reset 1``: the non-zero entries, or ``none``."""
    return ", ".join(f"{name} {count}" for name, count in counts.items() if count) or "none"


def _echo_totals(totals: dict[str, Any]) -> None:
    """Every worker's counters summed, exited workers included."""
    click.echo(f"totals: {totals['accepted']} accepted, {totals['messages_in']} messages in "
               f"({totals['bytes_in']} bytes), {totals['messages_out']} out "
               f"({totals['bytes_out']} bytes), {totals['broadcasts_sent']} broadcasts, "
               f"cpu {totals['cpu_seconds']:.2f}s")
    click.echo(f"  closed: {_counts(totals['closes'])}")
    click.echo(f"  accept pauses: {_counts(totals['accept_pauses'])}")
    click.echo(f"  broadcasts: {totals['broadcasts_delivered']} delivered, "
               f"{totals['broadcasts_dropped']} dropped, {totals['redis_gap']} missed Redis")
    click.echo(f"  worker restarts: {_counts(totals['worker_restarts'])}; "
               f"reloads: {_counts(totals['reloads'])}")


@main.command()
@all_settings_options
def check(config_file: str | None, assignments: tuple[str, ...], **options: Any) -> None:
    """Validate the settings, the files they name and the application; bind nothing."""
    from octopus.importer import import_app, prepare_path
    from octopus.supervisor import privileges

    settings, _ = load_settings(config_file, assignments, options)
    privileges.check(settings.user, settings.group)
    check_paths(settings)
    prepare_path(settings.chdir, settings.pythonpath)
    cls = import_app(settings.app)
    click.echo(f"ok: {settings.app} ({cls.__module__}.{cls.__qualname__}), "
               f"{settings.workers} worker(s), bind {', '.join(settings.bind)}")


@main.command(name="config")
@all_settings_options
def show_config(config_file: str | None, assignments: tuple[str, ...], **options: Any) -> None:
    """Print the effective settings as TOML (that --config accepts back)."""
    settings, _ = load_settings(config_file, assignments, options)
    click.echo(config.render_effective(settings), nl=False)
