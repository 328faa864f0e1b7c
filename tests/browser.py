"""A real browser for tests: Debian's headless ``chromium``, driven through
``chromedriver``'s WebDriver HTTP API (a few JSON requests; no client library)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import wait_until

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = "needs chromium and chromium-driver (apt-get install chromium chromium-driver)"


class Browser:
    """One headless Chromium; each ``open()`` is a tab of its own."""

    def __init__(self, profile: Path) -> None:
        assert CHROMEDRIVER is not None and CHROMIUM is not None, MISSING
        self.driver = subprocess.Popen([CHROMEDRIVER, "--port=0"], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
        self.session = ""
        try:
            line = ""
            assert self.driver.stdout is not None
            while "was started successfully on port" not in line:
                line = self.driver.stdout.readline()
                assert line, "chromedriver did not start"
            self.base = f"http://127.0.0.1:{int(line.split()[-1].rstrip('.'))}"
            options = {"binary": CHROMIUM,
                       "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                "--disable-dev-shm-usage", f"--user-data-dir={profile}"]}
            reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "goog:chromeOptions": options}}})
            self.session = f"/session/{reply['sessionId']}"
            self.tabs: list[str] = []
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["value"]

    def open(self, url: str) -> str:
        """Load ``url`` in a new tab; its handle."""
        if self.tabs:
            handle = self._call("POST", f"{self.session}/window/new", {"type": "tab"})["handle"]
        else:
            handle = self._call("GET", f"{self.session}/window")
        self.tabs.append(handle)
        self._switch(handle)
        self._call("POST", f"{self.session}/url", {"url": url})
        return str(handle)

    def _switch(self, handle: str) -> None:
        self._call("POST", f"{self.session}/window", {"handle": handle})

    def run(self, tab: str, script: str, *args: Any) -> Any:
        """``script`` (a function body; ``arguments`` are ``args``) in ``tab``."""
        self._switch(tab)
        return self._call("POST", f"{self.session}/execute/sync",
                          {"script": script, "args": list(args)})

    def wait_text(self, tab: str, selector: str, text: str, timeout: float = 10.0) -> None:
        """Until an element matching ``selector`` in ``tab`` has exactly ``text``."""
        script = ("return [...document.querySelectorAll(arguments[0])]"
                  ".map(e => e.textContent)")
        wait_until(lambda: text in self.run(tab, script, selector), timeout,
                   interval=0.05, message=f"{text!r} in {selector} of the page")

    def close(self) -> None:
        try:
            if self.session:
                self._call("DELETE", self.session)
        finally:
            self.driver.kill()
            self.driver.wait(5)
            if self.driver.stdout is not None:
                self.driver.stdout.close()
