"""The queue's mark never leaks past the node: a queued first packet, once accepted, leaves
with the mark it came with (the node clears the queue's bit in its verdict; the table has
no chain after the queue to do it, so relayed packets cross one hook of it, not two)."""

from __future__ import annotations

import re

from lrkp_lab.calls import KAMAILIO_IP, NODE_ARGS, Call, burst, running_node
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller
from lrkp_lab.parties import Peers
from lrkp_tsl.dataplane.queue import QUEUE_MARK

WATCH = f"""
table ip markwatch {{
    counter leaked {{ }}
    counter forwarded {{ }}
    chain forwarding {{
        type filter hook forward priority 0; policy accept;
        counter name forwarded
        meta mark & {QUEUE_MARK:#x} == {QUEUE_MARK:#x} counter name leaked
    }}
}}
"""


def packets(lab: Lab, table: str, name: str) -> int:
    out = lab.run("relay", "nft", f"list counter ip {table} {name}").stdout
    found = re.search(r"packets (\d+)", out)
    assert found, out
    return int(found.group(1))


def test_forwarded_packets_carry_no_queue_mark(lab: Lab) -> None:
    with running_node(lab, *NODE_ARGS) as _node, Peers(lab) as peers:
        lab.run("relay", "nft", WATCH)
        kamailio = Controller(lab, "sip", KAMAILIO_IP)
        try:
            caller, callee = peers("c", 4070), peers("b", 6070)
            call = Call(kamailio, caller, callee, 20700, "mark2@lab")
            burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"A")
            burst(callee, call.callee_relay, caller, call.caller_relay, 5, b"B")
            assert packets(lab, "lrkp", "queued") >= 1
            assert packets(lab, "markwatch", "forwarded") >= 10
            assert packets(lab, "markwatch", "leaked") == 0
        finally:
            kamailio.close()
            lab.run("relay", "nft", "delete table ip markwatch", check=False)
