"""What a node added to its network namespace's kernel besides its own table, on record, so
that a flush (kernel.flush_on_exit, `lrkp-tsl flush`) takes back exactly that, even after
the node that added it has stopped.

The table is the node's by its name (`table ip lrkp`), and the calls' conntrack entries are
those its maps point at; two things cannot be told from the kernel after the fact:
- the ports the node added to net.ipv4.ip_local_reserved_ports, a list it shares with the
  operator (reserve.py): only those may go, never the operator's own;
- the xt queue rule's number, and whether iptables-nft's `raw` table was created for that
  rule (queue.py): only a raw table the node made, and left empty, may go.

The record sits beside the instance lock (lock.py), `<lock directory>/netns-<inode>.added`
(JSON): per network namespace, in /run, which is emptied at boot as the kernel state is. A
namespace's inode is reused once the namespace is gone, so the record also holds the
namespace's cookie (SO_NETNS_COOKIE, Linux 5.14 and later, never reused while the system
runs): a record of another namespace is ignored, and replaced. It outlives the node (a
restarted node finds the range already reserved and adds nothing: the record still says
whose it is) and is removed once everything on it has been taken back.

A record that cannot be read or written is logged, never fatal: the node runs the same, and
a flush then leaves the reserved ports and the raw table as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrkp_tsl.dataplane.reserve import Ranges, parse, render
from lrkp_tsl.lock import InstanceLock

log = logging.getLogger("lrkp_tsl.dataplane.added")

SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)  # Python 3.11 does not name it
SUFFIX = ".added"


def netns_cookie() -> int | None:
    """This network namespace's cookie, or None on a kernel without one (before 5.14)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Added:
    reserved: Ranges = ()  # ports the node added to ip_local_reserved_ports
    queue_num: int | None = None  # the xt queue rule's number, while the rule is in
    created_raw: bool = False  # iptables-nft's raw table was created for that rule

    @property
    def empty(self) -> bool:
        return self == Added()


class AddedRecord:
    """The record of one network namespace; `added` is what it says now."""

    def __init__(self, path: Path, cookie: int | None) -> None:
        self.path = path
        self.cookie = cookie
        self._stale = False  # the file is another namespace's, or unreadable: replace it
        self.added = self._read()

    @classmethod
    def beside(cls, lock: InstanceLock) -> AddedRecord:
        """The record of the namespace whose instance lock is held."""
        return cls(lock.path.with_suffix(SUFFIX), netns_cookie())

    def _read(self) -> Added:
        try:
            data = json.loads(self.path.read_text())
            if data.get("netns_cookie") != self.cookie:
                self._stale = True  # a namespace that is gone had this inode
                return Added()
            queue_num = data.get("queue_num")
            return Added(
                parse(data.get("reserved_ports", "")),
                None if queue_num is None else int(queue_num),
                bool(data.get("created_raw", False)),
            )
        except FileNotFoundError:
            return Added()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            self._stale = True
            log.warning(
                "%s, the record of what the node added to the kernel, is unreadable (%s): "
                "ignored; a flush leaves the reserved ports and the raw table as they are",
                self.path, exc,
            )  # fmt: skip
            return Added()

    def update(self, **changes: Any) -> None:
        """Change what the record says (fields of Added) and write it."""
        added = dataclasses.replace(self.added, **changes)
        if added == self.added and not self._stale:
            return
        self.added = added
        self.save()

    def save(self) -> None:
        """Write the record (an empty one, or another namespace's, is removed)."""
        try:
            if self.added.empty:
                self.path.unlink(missing_ok=True)
            else:
                text = json.dumps(
                    {
                        "netns_cookie": self.cookie,
                        "reserved_ports": render(self.added.reserved),
                        "queue_num": self.added.queue_num,
                        "created_raw": self.added.created_raw,
                    }
                )
                temporary = self.path.with_name(self.path.name + ".tmp")
                temporary.write_text(text + "\n")
                os.replace(temporary, self.path)
            self._stale = False
        except OSError as exc:
            log.warning(
                "cannot record what the node added to the kernel in %s (%s): a flush will "
                "leave the reserved ports and the raw table as they are",
                self.path, exc.strerror or exc,
            )  # fmt: skip
