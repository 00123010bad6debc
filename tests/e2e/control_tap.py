"""A recording UDP forwarder between Kamailio's lrkproxy and a real node (e2e tests only).

Kamailio is pointed at the tap (`udp:10.201.1.5:22400`, in the `sip` namespace) instead of
the node; the tap forwards every command to the node from one socket of its own on Kamailio's
address (so the node's `--allow 10.201.1.5` still admits it) and every reply back to the
Kamailio process that sent the command, matched by cookie. It records both directions, so a
test can read the exact bytes the module sent (a `D` with empty fields, its random cookie)
and what the node answered. `lose_first_reply` drops the first reply to each command with
one of the given letters: Kamailio then retransmits the same datagram after
`lrkproxy_tout` seconds, as it does when a reply is lost on the network.

It forwards rtpengine's ng protocol (the `rtpengine` module's `<cookie> <bencoded dict>`)
just as well: a command's name is then its ng `command` (`offer`, `delete`...), `message`
is the decoded dictionary, and `ng_replies(name)` the replies to the commands of that name.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from lrkp_lab.lab import Lab
from lrkp_lab.ngpeer import text
from lrkp_tsl.ng.bencode import BencodeError, decode

TAP_IP = "10.201.1.5"
TAP_PORT = 22400
UPSTREAM_PORT = 22401


@dataclass(frozen=True)
class Seen:
    direction: str  # "command" (Kamailio -> node) or "reply" (node -> Kamailio)
    data: bytes
    forwarded: bool
    at: float = 0.0  # time.time() when the tap got it (SIPp's traces use the same clock)

    @property
    def cookie(self) -> bytes:
        return self.data.split(b" ", 1)[0]

    @property
    def command(self) -> str:
        """lrkproxy: the command letter (a reply's: `E` or the command's); ng: `command`."""
        message = self.message
        if message is not None:
            return str(message.get("command", ""))
        parts = self.data.split(b" ", 2)
        return parts[1][:1].decode("ascii", "replace") if len(parts) >= 2 else ""

    @property
    def message(self) -> dict[str, Any] | None:
        """The ng dictionary after the cookie (strings as text), or None: not ng. lrkproxy
        commands are capital letters, a bencoded dictionary starts with `d`."""
        body = self.data.partition(b" ")[2]
        if not body.startswith(b"d"):
            return None
        try:
            decoded = text(decode(body))
        except BencodeError:
            return None
        return decoded if isinstance(decoded, dict) else None


@dataclass
class ControlTap:
    lab: Lab
    node: tuple[str, int]
    lose_first_reply: Collection[str] = ()
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.down = self.lab.udp_socket("sip", TAP_IP, TAP_PORT)
        self.up = self.lab.udp_socket("sip", TAP_IP, UPSTREAM_PORT)
        self._senders: dict[bytes, tuple[str, int]] = {}
        self._commands: dict[bytes, str] = {}
        self._replied: set[bytes] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-tap", daemon=True)

    @property
    def url(self) -> str:
        return f"udp:{TAP_IP}:{TAP_PORT}"

    def __enter__(self) -> ControlTap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.down.close()
        self.up.close()

    def _record(self, direction: str, data: bytes, forwarded: bool) -> None:
        with self._lock:
            self.seen.append(Seen(direction, data, forwarded, time.time()))

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.down, self.up], [], [], 0.1)
            for sock in ready:
                with contextlib.suppress(OSError):
                    data, sender = sock.recvfrom(65535)
                    if sock is self.down:
                        self._command(data, (sender[0], sender[1]))
                    else:
                        self._reply(data)

    def _command(self, data: bytes, sender: tuple[str, int]) -> None:
        entry = Seen("command", data, True)
        self._senders[entry.cookie] = sender
        self._commands[entry.cookie] = entry.command
        self._record("command", data, True)
        self.up.sendto(data, self.node)

    def _reply(self, data: bytes) -> None:
        cookie = data.split(b" ", 1)[0]
        command = self._commands.get(cookie, "")
        first = cookie not in self._replied
        self._replied.add(cookie)
        target = self._senders.get(cookie)
        forward = target is not None and not (first and command in self.lose_first_reply)
        self._record("reply", data, forward)
        if forward and target is not None:
            self.down.sendto(data, target)

    def commands(self, letter: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.direction == "command" and s.command == letter]

    def replies(self, letter: str) -> list[Seen]:
        with self._lock:
            cookies = {s.cookie for s in self.seen if s.direction == "command"}
            return [
                s
                for s in self.seen
                if s.direction == "reply" and s.cookie in cookies and s.command == letter
            ]

    def ng_replies(self, name: str) -> list[Seen]:
        """Replies to the ng commands called `name`, in order (retransmissions included)."""
        with self._lock:
            cookies = {
                s.cookie for s in self.seen if s.direction == "command" and s.command == name
            }
            return [s for s in self.seen if s.direction == "reply" and s.cookie in cookies]

    def commands_seen(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.direction == "command"]

    def wait_for(self, letter: str, count: int = 1, timeout: float = 5.0) -> list[Seen]:
        """Replies to `letter` commands, once at least `count` arrived (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.replies(letter)
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.02)
