"""Sockets holding relay ports without a peer, read from /proc/net/udp{,6} (parsing only)."""

from __future__ import annotations

from ipaddress import IPv4Address

from lrkp_tsl import hostcheck
from lrkp_tsl.config import from_mapping
from lrkp_tsl.dataplane.localsockets import MOVE, RESTART_LATER, holders, parse
from lrkp_tsl.media import PortRange

# Captured from a network namespace: 127.0.0.1:21000 and 0.0.0.0:21001 without a peer,
# 127.0.0.1:21002 connected to 127.0.0.1:22333; then [::]:21003, [::ffff:127.0.0.1]:21004
# and [::1]:21005, none with a peer.
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14472: 0100007F:5208 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1942700 2 00000000a8b6738d 0
14473: 00000000:5209 00000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 1942701 2 00000000d0116262 0
14474: 0100007F:520A 0100007F:573D 01 00000000:00000000 00:00000000 00000000     0        0 1942702 2 000000000250b057 0
"""  # noqa: E501
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14475: 00000000000000000000000000000000:520B 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1942703 2 00000000cc951a85 0
14476: 0000000000000000FFFF00000100007F:520C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1942704 2 000000004101a2cb 0
14477: 00000000000000000000000001000000:520D 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1942705 2 0000000098c2c0dd 0
"""  # noqa: E501
LOOPBACK = IPv4Address("127.0.0.1")
ANY = IPv4Address("0.0.0.0")


def test_proc_net_udp_parses_addresses_ports_peers_and_owners() -> None:
    found = parse(UDP, "udp")
    assert [(s.ip, s.port, s.connected) for s in found] == [
        (LOOPBACK, 21000, False),
        (ANY, 21001, False),
        (LOOPBACK, 21002, True),
    ]
    assert (found[1].uid, found[1].inode) == (104, 1942701)


def test_ipv6_sockets_count_by_the_ipv4_packets_they_receive() -> None:
    found = parse(UDP6, "udp6")
    # [::] receives IPv4 as 0.0.0.0 does, a mapped address as its IPv4; [::1] never does.
    assert [(s.ip, s.port, s.family) for s in found] == [
        (ANY, 21003, "udp6"),
        (LOOPBACK, 21004, "udp6"),
    ]
    assert found[0].describe(None) == (
        "udp6 [::]:21003 (uid 0, inode 1942703; `ss -uanp` names its process)"
    )
    assert found[1].describe("kamailio, pid 7") == "udp6 127.0.0.1:21004 (kamailio, pid 7)"


def test_holders_are_sockets_without_peer_on_a_relay_port() -> None:
    sockets = parse(UDP, "udp") + parse(UDP6, "udp6")
    found = holders(sockets, [LOOPBACK], PortRange(21000, 21003))
    assert [(s.ip, s.port) for s in found.bound] == [(LOOPBACK, 21000)]
    assert [(s.ip, s.port) for s in found.wildcard] == [(ANY, 21001), (ANY, 21003)]
    # Another relay IP, or outside the relay range: nobody's business.
    assert holders(sockets, [IPv4Address("10.0.0.1")], PortRange(21000, 21003)).bound == ()
    assert holders(sockets, [LOOPBACK], PortRange(30000, 40000)) == holders([], [], PortRange(1, 2))


def test_check_config_reports_them_as_run_would() -> None:
    """A socket bound to the relay IP is a problem (run refuses it), one on the wildcard
    address a warning, whose advice depends on whether the node would reserve the range."""
    config = from_mapping({"internal_ip": "127.0.0.1", "ports": "21000-21999"})
    sockets = parse(UDP, "udp") + parse(UDP6, "udp6")
    asked: list[set[int]] = []

    def owners(inodes: set[int]) -> dict[int, str]:
        asked.append(inodes)
        return {1942700: "kamailio, pid 7"}

    found = hostcheck.socket_findings(config, sockets, owners, reserves=True)
    assert asked == [{1942700, 1942701, 1942703, 1942704}]
    assert found.problems[1].startswith("udp6 127.0.0.1:21004 (uid 0, inode 1942704; ")
    assert found.problems[:1] == [
        "udp 127.0.0.1:21000 (kamailio, pid 7) is bound to relay IP 127.0.0.1 on a relay port "
        "(ports = 21000-21999) and has no peer: it would take the first packets of every call "
        "Kamailio puts on that port, so those calls could never learn where their parties "
        "are. Move that socket off the relay IP or out of the relay range, or change `ports`; "
        "`run` refuses to start while it is there"
    ]
    assert [w.split(" holds relay port ")[0] for w in found.warnings] == [
        "udp 0.0.0.0:21001 (uid 104, inode 1942701; `ss -uanp` names its process)",
        "udp6 [::]:21003 (uid 0, inode 1942703; `ss -uanp` names its process)",
    ]
    assert all(w.endswith(f"(ports = 21000-21999); {RESTART_LATER}") for w in found.warnings)
    kept = hostcheck.socket_findings(config, sockets, owners, reserves=False)
    assert all(w.endswith(f"; {MOVE}") for w in kept.warnings)
    # Nothing on the relay range: no finding, and no walk of /proc for owners.
    asked.clear()
    other = from_mapping({"internal_ip": "127.0.0.1", "ports": "30000-39999"})
    assert hostcheck.socket_findings(other, sockets, owners, reserves=True) == hostcheck.Findings()
    assert asked == []
