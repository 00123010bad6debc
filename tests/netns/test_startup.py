"""Starting the real node on a host that cannot run it: exit 2, and the kernel left as found.

Each test runs the node in the lab's second relay namespace (relay2: 10.201.1.2, 10.201.2.2),
records what the kernel holds there (the ruleset, iptables-nft's raw table, the sysctls the
node sets), makes the start fail, and compares. A table a previous run left, with its live
call, must come through a failed start untouched.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.lab import Lab
from lrkp_lab.node import LRKP_TSL, Controller, Node, clear_host, set_command
from lrkp_lab.parties import Peers
from lrkp_tsl import __version__
from lrkp_tsl.dataplane import sysctl
from lrkp_tsl.defaults import DEFAULT_RULES
from lrkp_tsl.media import Endpoint

HOST = "relay2"
RELAY_IP = "10.201.1.2"
CONTROL = (RELAY_IP, 22333)
KAMAILIO_IP = "10.201.1.5"
ARGS = (
    "--internal-ip", RELAY_IP, "--ports", "30000-30999", "--control", f"udp:{RELAY_IP}:22333",
    "--allow", KAMAILIO_IP, "--queue-num", "4711",
)  # fmt: skip
# Values the node changes, set before each start so that a change shows.
BEFORE = {
    "net.ipv4.ip_forward": "0",
    "net.netfilter.nf_conntrack_acct": "0",
    "net.netfilter.nf_conntrack_events": "2",
}


RESERVED = "net.ipv4.ip_local_reserved_ports"  # the node adds its relay range (reserve.py)


def kernel(lab: Lab) -> dict[str, str]:
    """What the node could touch in relay2: its whole ruleset and the sysctls it sets."""
    state = {"ruleset": lab.run(HOST, "nft", "list", "ruleset").stdout}
    for name in (*sysctl.REQUIRED, RESERVED):
        state[name] = lab.sysctl(HOST, name)
    return state


@pytest.fixture
def host(lab: Lab) -> Iterator[Lab]:
    """relay2 as a host the node has never run on (sysctls at their kernel defaults); put
    back as the next test expects it."""
    lab.run(HOST, "nft", "delete", "table", "ip", "lrkp", check=False)
    for name, value in BEFORE.items():
        lab.set_sysctl(HOST, name, value)
    lab.set_sysctl(HOST, RESERVED, "")
    try:
        yield lab
    finally:
        clear_host(lab, HOST)


def run_to_exit(lab: Lab, *args: str, state: Path | None = None) -> tuple[int, str]:
    """`lrkp-tsl run` in relay2 until it exits by itself (a start that fails)."""
    node = Node(lab, HOST, *args, state=state)
    try:
        code = node.proc.wait(30)
    except subprocess.TimeoutExpired:
        node.stop()
        raise AssertionError(f"the node started:\n{node.output()}") from None
    node.stop()
    return code, node.output()


def test_an_idle_timeout_the_kernel_would_wrap_is_refused_before_the_kernel(host: Lab) -> None:
    """1e12 s once wrapped the conntrack timeout policy to 11354406 and ended a live call
    after a second: now refused at run, naming the key, with nothing changed."""
    before = kernel(host)
    code, output = run_to_exit(host, *ARGS, "--idle-timeout", "1e12")
    assert code == 2, output
    assert "sessions.idle_timeout = 1000000000000.0: expected a whole number" in output
    assert "Traceback" not in output
    assert kernel(host) == before


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_and_inf_are_refused_at_run(host: Lab, value: str) -> None:
    before = kernel(host)
    for flag, key in (("--idle-timeout", "sessions.idle_timeout"),
                      ("--max-lifetime", "sessions.max_lifetime")):  # fmt: skip
        code, output = run_to_exit(host, *ARGS, flag, value)
        assert code == 2, output
        assert f"{key} = {value}: not a finite number" in output and "Traceback" not in output
    assert kernel(host) == before


@contextlib.contextmanager
def held_udp(lab: Lab, ip: str, port: int) -> Iterator[socket.socket]:
    sock = lab.udp_socket(HOST, ip, port)
    try:
        yield sock
    finally:
        sock.close()


def test_a_control_address_in_use_exits_2_and_takes_the_start_back(host: Lab) -> None:
    before = kernel(host)
    with held_udp(host, RELAY_IP, 22333):
        code, output = run_to_exit(host, *ARGS)
    assert code == 2, output
    assert f"control = 'udp:{RELAY_IP}:22333': cannot listen: Address already in use" in output
    assert "another process holds it" in output
    # It had got as far as the table and the queue rule, and took both back.
    assert "table ip lrkp loaded" in output and "first packets: marked" in output
    assert "table ip lrkp, created by this start, removed" in output
    assert "took back reserved ports" in output
    assert kernel(host) == before


def test_a_queue_number_bound_by_another_process_exits_2_and_takes_the_start_back(
    host: Lab,
) -> None:
    holder = subprocess.Popen(
        ["ip", "netns", "exec", host.ns(HOST), *LRKP_TSL[:1], "-c",
         "import sys, time\nfrom netfilterqueue import NetfilterQueue\nq = NetfilterQueue()\n"
         "q.bind(4711, lambda p: p.accept())\nprint('bound', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        before = kernel(host)
        code, output = run_to_exit(host, *ARGS)
    finally:
        holder.kill()
        holder.communicate()
    assert code == 2, output
    assert "kernel.queue_num = 4711: cannot bind NFQUEUE 4711" in output
    assert kernel(host) == before


def test_a_rules_file_the_kernel_refuses_exits_2_and_takes_the_sysctls_back(
    host: Lab, tmp_path: Path
) -> None:
    rules = tmp_path / "broken.nft"
    # Valid syntax, refused by the kernel itself: a jump to a chain that does not exist.
    rules.write_text(
        DEFAULT_RULES.read_text() + "table ip lrkp {\n\tchain broken {\n\t\tjump nothere\n\t}\n}\n"
    )
    before = kernel(host)
    code, output = run_to_exit(host, *ARGS, "--rules", str(rules))
    assert code == 2, output
    assert f"kernel.rules = '{rules}': the kernel refuses the table" in output
    assert "No such file or directory" in output
    assert "sysctl net.ipv4.ip_forward=0 restored" in output
    assert kernel(host) == before
    # check-config finds the same before anything is started (the kernel's dry run).
    result = host.run(HOST, *LRKP_TSL, "check-config", "--config", "/dev/null", *ARGS,
                      "--rules", str(rules), check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"kernel.rules = '{rules}': the kernel refuses it" in result.stderr
    assert kernel(host) == before


def test_a_failed_start_leaves_a_previous_runs_table_and_its_call_flowing(
    host: Lab, peers: Peers
) -> None:
    node = Node(host, HOST, *ARGS)
    kamailio = Controller(host, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, kamailio)
        caller, callee = peers("a", 4500), peers("b", 6500)
        body = set_command(
            "S", str(caller.endpoint.ip), RELAY_IP, RELAY_IP, str(callee.endpoint.ip),
            4500, 30000, 30002, 6500, "kept@lab",
        )  # fmt: skip
        assert kamailio.command(body, CONTROL) == body + b"OK"
        assert node.stop() == 0  # the default: live calls stay in the kernel
        before = kernel(host)
        assert "kept@lab" in before["ruleset"]
        with held_udp(host, RELAY_IP, 22333):
            code, output = run_to_exit(host, *ARGS, state=node.state)
        assert code == 2, output
        assert "the previous run's table and its calls are left as they were" in output
        assert kernel(host) == before
        # The call still flows through the kernel.
        caller.send(Endpoint.parse(RELAY_IP, 30002), b"still here")
        assert callee.expect(b"still here") == Endpoint.parse(RELAY_IP, 30000)
    finally:
        kamailio.close()
        node.stop()


def test_a_relay_ip_on_no_interface_is_refused_unless_it_may_appear_later(host: Lab) -> None:
    vip = "10.201.1.99"
    args = ("--internal-ip", vip, "--ports", "30000-30999", "--control", f"udp:{vip}:22333",
            "--allow", KAMAILIO_IP)  # fmt: skip
    before = kernel(host)
    code, output = run_to_exit(host, *args)
    assert code == 2, output
    assert f"internal_ip = '{vip}': no interface of this host has this address" in output
    assert "relay_ips_may_appear_later" in output
    assert kernel(host) == before
    checked = host.run(HOST, *LRKP_TSL, "check-config", "--config", "/dev/null", *args,
                       check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert f"warning: internal_ip = '{vip}': no interface" in checked.stderr
    # Said to come later: the node starts, and answers once the address arrives.
    node = Node(host, HOST, *args, "--relay-ips-may-appear-later", "--flush-on-exit")
    kamailio = Controller(host, "sip", KAMAILIO_IP)
    try:
        node.wait_log("node up", 15)
        host.run(HOST, "ip", "addr", "add", f"{vip}/24", "dev", "int0")
        node.wait_ready((vip, 22333), kamailio)
        assert node.stop() == 0
    finally:
        kamailio.close()
        node.stop()
        host.run(HOST, "ip", "addr", "del", f"{vip}/24", "dev", "int0", check=False)


def test_the_banner_names_version_files_range_and_sockets(host: Lab, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'internal_ip = "{RELAY_IP}"\n')
    node = Node(host, HOST, "--config", str(config), *ARGS[2:], "--flush-on-exit")
    kamailio = Controller(host, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, kamailio)
    finally:
        kamailio.close()
        node.stop()
    first = node.output().splitlines()[0]
    for part in (
        f"lrkp-tsl {__version__} starting",
        f"config {config}",
        f"rules {DEFAULT_RULES}",
        f"relay {RELAY_IP}/{RELAY_IP} ports 30000-30999",
        f"control udp:{RELAY_IP}:22333",
        "lrkp-ctl @lrkp-tsl",
        "metrics off",
    ):
        assert part in first, first
