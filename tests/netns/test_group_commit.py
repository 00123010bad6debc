"""Group commit for real: `S` commands from several Kamailio workers that reach the node at
the same moment are committed in one nf_tables transaction, each call relays right after
its `OK`, and a call the kernel refuses is refused alone.

To make the commands arrive together for sure, the node is stopped (SIGSTOP) while the
clients send, then continued: every datagram is waiting when it reads its socket.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator

from lrkp_lab.calls import CONTROL, KAMAILIO_IP, NODE_ARGS, running_node
from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Party, Peers
from lrkp_tsl.media import Endpoint

WORKERS = 5
REFUSED = 2  # the call whose flow key the kernel already holds with other data


def s_body(caller: Party, callee: Party, port: int, call_id: str, verb: str = "S") -> bytes:
    relay = str(INTERNAL_IP)
    a, b = caller.endpoint, callee.endpoint
    return set_command(verb, str(a.ip), relay, relay, str(b.ip), a.port, port, port + 2, b.port,
                       call_id)  # fmt: skip


@contextlib.contextmanager
def paused(node: Node) -> Iterator[None]:
    """The node stopped: what is sent meanwhile waits in its socket, read in one go."""
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.proc.send_signal(signal.SIGCONT)


def together(node: Node, workers: list[Controller], bodies: list[bytes]) -> list[bytes | None]:
    """One command from each worker, all arriving at once; each worker's reply."""
    datagrams = []
    with paused(node):
        for worker, body in zip(workers, bodies, strict=True):
            datagram = worker.cookie() + b" " + body
            worker.send(datagram, CONTROL)
            datagrams.append(datagram)
    replies = []
    for worker, datagram in zip(workers, datagrams, strict=True):
        reply = worker.receive(5.0)
        assert reply is None or reply.startswith(datagram.split(b" ", 1)[0] + b" ")
        replies.append(reply)
    return replies


def relayed(caller: Party, callee: Party, port: int, tag: bytes) -> None:
    """Both directions of the call's RTP cross the relay, from the relay endpoints."""
    caller_relay, callee_relay = Endpoint(INTERNAL_IP, port + 2), Endpoint(INTERNAL_IP, port)
    caller.send(caller_relay, b"A" + tag)
    assert callee.expect(b"A" + tag) == callee_relay
    callee.send(callee_relay, b"B" + tag)
    assert caller.expect(b"B" + tag) == caller_relay


def counters(node: Node) -> dict[str, int]:
    node.stop(signal.SIGTERM)
    found = re.search(r"counters: (.*)", node.output())
    assert found, node.output()
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split(", "))}


def test_concurrent_sets_commit_together_and_a_refused_one_refuses_only_itself(lab: Lab) -> None:
    with running_node(lab, *NODE_ARGS) as node, Peers(lab) as peers:
        workers = [Controller(lab, "sip", KAMAILIO_IP) for _ in range(WORKERS)]
        try:
            callers = [peers("a", 4100 + n) for n in range(WORKERS)]
            callees = [peers("b", 6100 + n) for n in range(WORKERS)]
            ports = [20400 + 4 * n for n in range(WORKERS)]
            bodies = [s_body(callers[n], callees[n], ports[n], f"group-{n}@lab")
                      for n in range(WORKERS)]  # fmt: skip
            # Someone else's element at the refused call's caller flow key, with other data:
            # the kernel refuses (EEXIST) any transaction that adds this key for that call.
            caller = callers[REFUSED].endpoint
            key = f"{caller.ip} . {caller.port} . {INTERNAL_IP} . {ports[REFUSED] + 2}"
            element = f"ip lrkp dnat_to {{ {key} : 10.201.9.9 . 9 }}"
            lab.run("relay", "nft", f"add element {element}")

            replies = together(node, workers, bodies)
            for n, reply in enumerate(replies):
                assert reply is not None, f"worker {n}: no reply"
                if n == REFUSED:
                    assert b" E kernel " in reply, reply
                else:
                    assert reply.endswith(bodies[n] + b"OK"), reply
                    relayed(callers[n], callees[n], ports[n], b"%d" % n)
            # The refused call relays nothing (not even through the planted element).
            callers[REFUSED].send(Endpoint(INTERNAL_IP, ports[REFUSED] + 2), b"refused")
            callees[REFUSED].expect_nothing()

            # Once the kernel takes it, Kamailio's retransmission sets it up.
            lab.run("relay", "nft", f"delete element {element}")
            retry = workers[REFUSED].command(bodies[REFUSED], CONTROL, wait=5.0)
            assert retry == bodies[REFUSED] + b"OK"
            relayed(callers[REFUSED], callees[REFUSED], ports[REFUSED], b"again")

            # Deletions from every worker at once: committed together, media stops.
            deletes = [b"D" + body[1:] for body in bodies]
            for delete, reply in zip(deletes, together(node, workers, deletes), strict=True):
                assert reply is not None and reply.endswith(delete + b"OK"), reply
            for n in range(WORKERS):
                callers[n].send(Endpoint(INTERNAL_IP, ports[n] + 2), b"after")
                callees[n].expect_nothing()
        finally:
            for worker in workers:
                worker.close()
        found = counters(node)
        # The five S in one transaction, the retransmission alone, the five D together.
        assert found["kernel.group_commits"] == 3, found
        assert found["kernel.group_commands"] == 2 * WORKERS + 1, found
