"""The daemon for real: control protocol in, kernel relaying out, expiry, lifecycle."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import LRKP_TSL, Controller, Node, set_command
from lrkp_lab.parties import Party, Peers
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.media import Endpoint

CONTROL = (str(INTERNAL_IP), 22333)
IDLE = 2.0
# The kernel's conntrack GC reaps expired entries lazily: seconds after their timeout.
EXPIRY_LAG = 30.0


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    running = Node(
        lab,
        "relay",
        "--internal-ip",
        str(INTERNAL_IP),
        "--external-ip",
        str(EXTERNAL_IP),
        "--ports",
        "20000-21999",
        "--control",
        f"udp:{CONTROL[0]}:{CONTROL[1]}",
        "--allow",
        "10.201.1.5/32",
        "--idle-timeout",
        str(IDLE),
        "--flush-on-exit",
        "--log-level",
        "debug",
    )
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def kamailio(lab: Lab, node: Node) -> Iterator[Controller]:
    client = Controller(lab, "sip", "10.201.1.5")
    try:
        node.wait_ready(CONTROL, client)
        yield client
    finally:
        client.close()


def s_for(
    caller: Party,
    callee: Party,
    relay_port: int,
    call_id: str,
    verb: str = "S",
    callee_ip: str = str(INTERNAL_IP),
) -> bytes:
    """An S as Kamailio sends it for a gt=0 call: callee relay port P, caller's P+2."""
    return set_command(
        verb,
        str(caller.endpoint.ip),
        callee_ip,
        str(INTERNAL_IP),
        str(callee.endpoint.ip),
        caller.endpoint.port,
        relay_port,
        relay_port + 2,
        callee.endpoint.port,
        call_id,
    )


def relays(relay_port: int, callee_ip: str = str(INTERNAL_IP)) -> tuple[Endpoint, Endpoint]:
    return (Endpoint(INTERNAL_IP, relay_port + 2), Endpoint.parse(callee_ip, relay_port))


def talk(
    caller: Party, callee: Party, relay_port: int, tag: bytes, callee_ip: str = str(INTERNAL_IP)
) -> None:
    caller_relay, callee_relay = relays(relay_port, callee_ip)
    caller.send(caller_relay, b"A" + tag)
    assert callee.expect(b"A" + tag) == callee_relay
    callee.send(callee_relay, b"B" + tag)
    assert caller.expect(b"B" + tag) == caller_relay


def test_ping_and_config(kamailio: Controller) -> None:
    assert kamailio.command(b"P", CONTROL) == b"P PONG"
    reply = kamailio.command(b"G", CONTROL)
    assert reply is not None and len(reply) == 2 + 52
    # end_port is the last block start with a whole 4-port block inside 20000-21999.
    assert reply[2:14] == (20000).to_bytes(4, sys.byteorder) + (21996).to_bytes(
        4, sys.byteorder
    ) + (20000).to_bytes(4, sys.byteorder)
    assert reply[14:34].rstrip(b"\0") == b"10.201.1.1"
    assert reply[34:54].rstrip(b"\0") == b"10.201.2.1"


def test_set_replies_after_the_kernel_relays(kamailio: Controller, peers: Peers) -> None:
    caller, callee = peers("a", 4000), peers("x", 6000)
    body = s_for(caller, callee, 20000, "call-1@lab", callee_ip=str(EXTERNAL_IP))
    assert kamailio.command(body, CONTROL) == body + b"OK"
    # The very first packet after OK is relayed: the kernel state was there before the reply.
    talk(caller, callee, 20000, b"first", callee_ip=str(EXTERNAL_IP))


def test_retransmission_gets_same_reply_and_is_applied_once(
    kamailio: Controller, node: Node, peers: Peers
) -> None:
    caller, callee = peers("a", 4010), peers("b", 6010)
    cookie = kamailio.cookie()
    datagram = cookie + b" " + s_for(caller, callee, 20100, "retr@lab")
    replies = []
    for _ in range(3):
        kamailio.send(datagram, CONTROL)
        replies.append(kamailio.receive())
    assert replies == [datagram + b"OK"] * 3
    talk(caller, callee, 20100, b"x")
    time.sleep(0.2)
    assert node.output().count("[retr@lab] relaying") == 1
    assert node.output().count("answered from cache") == 2


def test_delete_stops_relaying(kamailio: Controller, peers: Peers) -> None:
    caller, callee = peers("a", 4020), peers("b", 6020)
    assert kamailio.command(s_for(caller, callee, 20200, "del@lab"), CONTROL)
    talk(caller, callee, 20200, b"live")
    body = s_for(caller, callee, 20200, "del@lab", verb="D")
    assert kamailio.command(body, CONTROL) == body + b"OK"
    caller.send(relays(20200)[0], b"after")
    callee.expect_nothing()


def test_cancelled_call_delete_with_empty_fields_is_acknowledged(kamailio: Controller) -> None:
    body = b"D  10.201.1.1    20300   60 never-answered@lab "
    assert kamailio.command(body, CONTROL) == body + b"OK"


def test_second_set_updates_in_place_and_identical_is_noop(
    kamailio: Controller, node: Node, peers: Peers
) -> None:
    caller, early, final = peers("a", 4030), peers("b", 6030), peers("b", 6032)
    first = s_for(caller, early, 20400, "update@lab")
    assert kamailio.command(first, CONTROL) == first + b"OK"
    assert kamailio.command(first, CONTROL) == first + b"OK"  # new cookie, same call
    talk(caller, early, 20400, b"183")
    second = s_for(caller, final, 20400, "update@lab")
    assert kamailio.command(second, CONTROL) == second + b"OK"
    talk(caller, final, 20400, b"200")
    early.expect_nothing()
    log = node.output()
    assert log.count("[update@lab] relaying") == 1
    assert log.count("[update@lab] updated") == 1


def test_relay_ports_of_another_call_replace_it(
    kamailio: Controller, node: Node, peers: Peers
) -> None:
    old_caller, old_callee = peers("a", 4040), peers("b", 6040)
    new_caller, new_callee = peers("a", 4042), peers("b", 6042)
    assert kamailio.command(s_for(old_caller, old_callee, 20500, "old@lab"), CONTROL)
    assert kamailio.command(s_for(new_caller, new_callee, 20500, "new@lab"), CONTROL)
    talk(new_caller, new_callee, 20500, b"newest wins")
    old_caller.send(relays(20500)[0], b"stale")
    old_callee.expect_nothing()
    assert re.search(
        r"\[old@lab\] removed: relay ports reassigned to call 'new@lab'", node.output()
    )


def test_idle_call_expires_and_active_call_stays(
    kamailio: Controller, node: Node, lab: Lab, peers: Peers
) -> None:
    idle_caller, idle_callee = peers("a", 4050), peers("b", 6050)
    busy_caller, busy_callee = peers("a", 4052), peers("b", 6052)
    assert kamailio.command(s_for(idle_caller, idle_callee, 20600, "idle@lab"), CONTROL)
    assert kamailio.command(s_for(busy_caller, busy_callee, 20700, "busy@lab"), CONTROL)
    talk(idle_caller, idle_callee, 20600, b"once")
    # Idle means the kernel expired the streams' entries: its GC reaps them lazily.
    deadline = time.monotonic() + IDLE + EXPIRY_LAG
    while time.monotonic() < deadline and "[idle@lab] removed" not in node.output():
        talk(busy_caller, busy_callee, 20700, b"tick")
        time.sleep(0.2)
    log = node.output()
    assert f"[idle@lab] removed: no media for {IDLE:g} s" in log
    assert "[busy@lab] removed" not in log
    listing = lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    assert "idle@lab" not in listing and "busy@lab" in listing
    conntrack = lab.run("relay", "conntrack", "-L", "-p", "udp", check=False).stdout
    assert "dport=20602" not in conntrack
    idle_caller.send(relays(20600)[0], b"late")
    idle_callee.expect_nothing()
    talk(busy_caller, busy_callee, 20700, b"still")


def test_controller_not_on_allow_list_is_ignored(
    lab: Lab, node: Node, kamailio: Controller
) -> None:
    stranger = Controller(lab, "sip", "10.201.2.5")  # the sip host's external address
    try:
        assert stranger.command(b"P", (str(EXTERNAL_IP), 22333), wait=0.5) is None
        assert stranger.command(b"P", CONTROL, wait=0.5) is None
    finally:
        stranger.close()
    assert "not in the allow list" in node.output()
    assert kamailio.command(b"P", CONTROL) == b"P PONG"


@pytest.mark.parametrize(
    ("datagram", "code"),
    [
        (b"1_1 X", b"unknown-command"),
        (b"1_1 S 10.0.0.1 10.201.1.1", b"field-count"),
        (b"1_1 S 10.0.0.999 10.201.1.1 10.201.1.1 10.0.0.2 4000 20000 20002 6000 60 c ", b"bad-ip"),
        (b"1_1 S 10.0.0.1 10.201.1.1 10.201.1.1 10.0.0.2 4000 20000 99999 6000 60 c ", b"bad-port"),
    ],
)
def test_malformed_input_gets_error_reply_and_node_lives(
    kamailio: Controller, node: Node, datagram: bytes, code: bytes
) -> None:
    kamailio.send(datagram, CONTROL)
    reply = kamailio.receive()
    assert reply is not None and reply.startswith(b"1_1 E " + code + b" ")
    kamailio.send(b"\xff\x00garbage", CONTROL)
    assert kamailio.receive(0.3) is None  # no cookie: nothing to answer
    assert kamailio.command(b"P", CONTROL) == b"P PONG"
    assert node.proc.poll() is None


def test_sigterm_exits_cleanly_and_flush_on_exit_removes_state(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("a", 4060), peers("b", 6060)
    assert kamailio.command(s_for(caller, callee, 20800, "bye@lab"), CONTROL)
    talk(caller, callee, 20800, b"x")
    assert node.stop(signal.SIGTERM) == 0
    assert lab.run("relay", "nft", "list", "table", "ip", TABLE, check=False).returncode != 0
    caller.send(relays(20800)[0], b"after exit")
    callee.expect_nothing()


def test_a_node_without_its_store_adopts_the_calls_it_finds_in_the_kernel(
    lab: Lab, peers: Peers
) -> None:
    """An upgrade from a release without a store, or a lost state directory: the calls in
    the kernel maps keep flowing and are managed again. (Restarts with the store are in
    test_restart.py.)"""
    args = (
        "--internal-ip",
        str(INTERNAL_IP),
        "--ports",
        "20000-21999",
        "--idle-timeout",
        str(IDLE),
        "--control",
        f"udp:{CONTROL[0]}:{CONTROL[1]}",
        "--allow",
        "10.201.1.5",
    )
    node = Node(lab, "relay", *args)
    client = Controller(lab, "sip", "10.201.1.5")
    restarted = None
    try:
        node.wait_ready(CONTROL, client)
        caller, callee = peers("a", 4070), peers("b", 6070)
        assert client.command(s_for(caller, callee, 20900, "keep@lab"), CONTROL)
        assert node.stop(signal.SIGINT) == 0
        talk(caller, callee, 20900, b"while the node is down")
        restarted = Node(lab, "relay", *args)  # a new, empty state directory
        restarted.wait_ready(CONTROL, client)
        deadline = time.monotonic() + 10
        while "adopted 1 calls" not in restarted.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        output = restarted.output()
        assert "adopted 1 calls found in the kernel with no stored record" in output
        assert "'keep@lab'" in output
        talk(caller, callee, 20900, b"after restart")
        # Re-adopted means managed again: silence now expires it like any call.
        deadline = time.monotonic() + IDLE + EXPIRY_LAG
        while "[keep@lab] removed" not in restarted.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"[keep@lab] removed: no media for {IDLE:g} s" in restarted.output()
        caller.send(relays(20900)[0], b"expired")
        callee.expect_nothing()
    finally:
        client.close()
        node.stop()
        if restarted is not None:
            restarted.stop()
        lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
        lab.run("relay", "conntrack", "-F", check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ports", "40000-20000"], "ports = '40000-20000'"),
        (["--control", "tcp:1.2.3.4:5"], "control = 'tcp:1.2.3.4:5'"),
        (["--external-ip", "2001:db8::1"], "external_ip = '2001:db8::1': not an IPv4 address"),
        (["--log-level", "loud"], "log_level = 'loud'"),
        (
            ["--ports", "20000-40000", "--control", "udp:10.0.0.1:22333"],
            "port 22333 is inside the relay port range",
        ),
    ],
)
def test_bad_config_exits_naming_key_and_value(args: list[str], message: str) -> None:
    # --config /dev/null: flags only, whatever /etc/lrkp-tsl/lrkp-tsl.toml holds on this
    # host (a file there could make a bad flag good and start a node in the host namespace).
    result = subprocess.run(
        [*LRKP_TSL, "run", "--config", "/dev/null", "--internal-ip", "10.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_bad_config_file_names_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('internal_ip = "10.0.0.1"\n[sessions]\nidle_timeuot = 5\n')
    result = subprocess.run(
        [*LRKP_TSL, "run", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "unknown key 'sessions.idle_timeuot'" in result.stderr


def test_lrkp_ctl_ping_and_config(lab: Lab, kamailio: Controller) -> None:
    for command, expected in (
        ("ping", "udp:10.201.1.1:22333: P PONG"),
        ("config", "ports 20000-21996 (current 20000), internal 10.201.1.1, external 10.201.2.1"),
    ):
        result = lab.run(
            "sip",
            *LRKP_TSL[:2],
            "lrkp_tsl.ctl",
            "--control",
            f"udp:{CONTROL[0]}:{CONTROL[1]}",
            command,
        )
        assert expected in result.stdout


def test_unix_socket_mode(lab: Lab, tmp_path: Path, peers: Peers) -> None:
    path = tmp_path / "lrkp.sock"
    node = Node(
        lab,
        "relay",
        "--internal-ip",
        str(INTERNAL_IP),
        "--ports",
        "20000-21999",
        "--control",
        f"unix:{path}",
        "--flush-on-exit",
    )
    try:
        deadline = time.monotonic() + 15
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        def command(body: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(body)
                return sock.recv(4096)

        assert command(b"P") == b"P PONG"
        caller, callee = peers("a", 4080), peers("b", 6080)
        body = set_command(
            "S",
            str(caller.endpoint.ip),
            str(INTERNAL_IP),
            str(INTERNAL_IP),
            str(callee.endpoint.ip),
            4080,
            21000,
            21002,
            6080,
            "unix@lab",
        )
        assert command(body) == body + b"OK"
        talk(caller, callee, 21000, b"over unix")
        assert command(b"X").startswith(b"E unknown-command ")
    finally:
        assert node.stop() == 0
