"""A line-based chat room: the first line is your nickname, then every line is
sent to everyone as ``nick: text``.

Commands: ``/nick NEW`` renames you. Everyone sees who joins and leaves.

    python examples/chat.py [ADDR]        # default 127.0.0.1:9877
    octopusd start --app chat:ChatConnection --bind 127.0.0.1:9877   # from examples/

Try it with ``nc 127.0.0.1 9877`` in two terminals.

With ``reload_handoff = true`` a reload keeps everyone connected, nicknames
included: ``suspend()`` (old code) returns what a connection must remember and
``resume()`` (new code, in the new worker) takes it back, in place of
``connect()``.
"""

from __future__ import annotations

import sys

from octopus import Octopus, SocketConnection

MAX_NICK = 32


class ChatConnection(SocketConnection):
    framing = "line"

    nick: str | None = None

    def connect(self) -> None:
        self.nick = None
        self.send(b"welcome! what is your nickname?")

    def receive(self, message: bytes) -> None:
        text = message.decode("utf-8", "replace").strip()
        if self.nick is None:
            self._join(text)
        elif text.startswith("/nick"):
            self._rename(text[len("/nick"):].strip())
        elif text:
            self.broadcast(f"{self.nick}: {text}".encode())

    def suspend(self) -> dict[str, str | None]:
        return {"nick": self.nick}

    def resume(self, state: dict[str, str | None]) -> None:
        self.nick = state["nick"]

    def close(self) -> None:
        if self.nick is not None:
            self.broadcast(f"* {self.nick} left".encode())

    def _join(self, nick: str) -> None:
        if not _valid(nick):
            self.send(f"nicknames are 1-{MAX_NICK} characters without spaces".encode())
            return
        self.nick = nick
        self.broadcast(f"* {nick} joined".encode())

    def _rename(self, nick: str) -> None:
        if not _valid(nick):
            self.send(b"usage: /nick NEW")
            return
        old, self.nick = self.nick, nick
        self.broadcast(f"* {old} is now {nick}".encode())


def _valid(nick: str) -> bool:
    return 0 < len(nick) <= MAX_NICK and not any(ch.isspace() for ch in nick)


if __name__ == "__main__":
    server = Octopus(ChatConnection)
    server.listen(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9877")
    server.start()
