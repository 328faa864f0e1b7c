"""A chat room shared by browsers (WebSocket) and line clients (``nc``).

The first message is your nickname, then every message is sent to everyone
as ``nick: text``; ``/nick NEW`` renames you. A browser connects to the
``ws`` listener and gets text messages; ``nc`` connects to the plain one and
gets lines. ``broadcast()`` reaches both: a text message becomes a line.

    python examples/chat_web.py [WS_ADDR [LINE_ADDR]]  # 127.0.0.1:8080, 127.0.0.1:9877
    octopusd start --app chat_web:ChatConnection --workers 2 \\
        --bind "127.0.0.1:8080 ws" --bind 127.0.0.1:9877        # from examples/

Then open ``examples/chat.html`` in a browser (it connects to
ws://127.0.0.1:8080 unless ``?ws=URL`` says otherwise) and ``nc 127.0.0.1 9877``.
With ``--reload-handoff``, ``octopusd reload`` keeps every client connected,
browsers included, and each keeps its nickname (``suspend``/``resume``).
"""

from __future__ import annotations

import sys
from typing import Any

from octopus import Octopus, SocketConnection

MAX_NICK = 32


class ChatConnection(SocketConnection):
    framing = "line"  # for the line clients; a WebSocket message is always whole

    nick: str | None = None

    def connect(self) -> None:
        self.nick = None
        self.say("welcome! what is your nickname?")

    def say(self, text: str) -> None:
        """To this client only: a text message, or a line."""
        self.send(text if self.websocket is not None else text.encode())  # type: ignore[arg-type]

    def receive(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        text = message.strip()
        if self.nick is None:
            self._join(text)
        elif text.startswith("/nick"):
            self._rename(text[len("/nick"):].strip())
        elif text:
            self.broadcast(f"{self.nick}: {text}")  # type: ignore[arg-type]

    def close(self) -> None:
        if self.nick is not None:
            self.broadcast(f"* {self.nick} left")  # type: ignore[arg-type]

    def suspend(self) -> Any:
        return self.nick  # a reload with reload_handoff: the new code resumes with it

    def resume(self, state: Any) -> None:
        self.nick = state

    def _join(self, nick: str) -> None:
        if not _valid(nick):
            self.say(f"nicknames are 1-{MAX_NICK} characters without spaces")
            return
        self.nick = nick
        self.broadcast(f"* {nick} joined")  # type: ignore[arg-type]

    def _rename(self, nick: str) -> None:
        if not _valid(nick):
            self.say("usage: /nick NEW")
            return
        old, self.nick = self.nick, nick
        self.broadcast(f"* {old} is now {nick}")  # type: ignore[arg-type]


def _valid(nick: str) -> bool:
    return 0 < len(nick) <= MAX_NICK and not any(ch.isspace() for ch in nick)


if __name__ == "__main__":
    server = Octopus(ChatConnection)
    server.listen((sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080") + " ws")
    server.listen(sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:9877")
    server.start()
