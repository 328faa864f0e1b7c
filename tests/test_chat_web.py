"""examples/chat_web.py and examples/chat.html in a real browser (headless
Chromium): two pages and an ``nc``-style line client share one room."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.browser import CHROMEDRIVER, CHROMIUM, MISSING, Browser
from tests.conftest import REPO, ServerProcess
from tests.helpers import LineClient, wait_until

pytest.importorskip("websockets", reason="the ws extra: pip install 'octopus[ws]'")
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=MISSING)]

EXAMPLES = REPO / "examples"
PAGE = (EXAMPLES / "chat.html").as_uri()
Spawn = Callable[..., ServerProcess]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(tmp_path / "profile")
    yield browser
    browser.close()


def addresses(server: ServerProcess, count: int) -> list[str]:
    wait_until(lambda: server.count("listening on ") >= count, 10, message="the listeners")
    return re.findall(r"listening on (\S+)", server.log)[:count]


def page(ws: str, nick: str) -> str:
    return f"{PAGE}?ws=ws://{ws}/chat&nick={nick}"


def test_two_browsers_and_nc_chat_through_octopus(spawn: Spawn, browser: Browser) -> None:
    server = spawn(str(EXAMPLES / "chat_web.py"), "127.0.0.1:0", "127.0.0.1:0")
    ws, line = addresses(server, 2)
    alice = browser.open(page(ws, "alice"))
    browser.wait_text(alice, "#log li", "* alice joined")
    bob = browser.open(page(ws, "bob"))
    browser.wait_text(alice, "#log li", "* bob joined")
    nc = LineClient(line)
    try:
        assert nc.read_line() == "welcome! what is your nickname?"
        nc.send_line("carol")
        assert nc.read_line() == "* carol joined"

        browser.run(bob, "window.chat.send(arguments[0])", "hello from bob, ünïcode")
        browser.wait_text(alice, "#log li", "bob: hello from bob, ünïcode")
        assert nc.read_line() == "bob: hello from bob, ünïcode"

        nc.send_line("hi browsers")
        browser.wait_text(alice, "#log li", "carol: hi browsers")
        browser.wait_text(bob, "#log li", "carol: hi browsers")
        assert nc.read_line() == "carol: hi browsers"
        assert browser.run(alice, "return document.getElementById('state').textContent") \
            == "open"
    finally:
        nc.close()


def test_browsers_stay_connected_across_a_handoff_reload(
        servers: procs.Servers, browser: Browser) -> None:
    server = servers.start("--app", "chat_web:ChatConnection", "--pythonpath", str(EXAMPLES),
                           "--bind", "127.0.0.1:0 ws", "--workers", "2", "--reload-handoff",
                           "--pidfile", "octopusd.pid")
    server.wait_ready()
    old = server.wait_workers(2)
    ws = f"127.0.0.1:{server.port}"
    alice = browser.open(page(ws, "alice"))
    bob = browser.open(page(ws, "bob"))
    browser.wait_text(alice, "#log li", "* bob joined")

    server.signal(signal.SIGHUP)
    server.wait_workers(2, without=tuple(old))  # the old workers handed off and exited

    browser.run(bob, "window.chat.send(arguments[0])", "after the reload")
    browser.wait_text(alice, "#log li", "bob: after the reload")  # nicknames kept
    for tab in (alice, bob):
        assert browser.run(tab, "return document.getElementById('state').textContent") \
            == "open"
