"""Role checks that need no root: is an address local here; a socket bound to one that is not."""

from __future__ import annotations

import errno
import gc
import socket
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_tsl.dataplane import role
from lrkp_tsl.dataplane.role import (
    IP_FREEBIND,
    freebind_udp_socket,
    local_addresses_present,
    local_ipv4_addresses,
    nonlocal_bind_enabled,
)

LOOPBACK = IPv4Address("127.0.0.1")
ABSENT = IPv4Address("192.0.2.1")  # TEST-NET-1: documentation only


@pytest.fixture
def absent() -> IPv4Address:
    if ABSENT in local_ipv4_addresses():
        pytest.skip(f"{ABSENT} is assigned on this machine")
    return ABSENT


def test_loopback_is_present() -> None:
    assert local_addresses_present([LOOPBACK])


def test_an_unassigned_address_is_absent(absent: IPv4Address) -> None:
    assert not local_addresses_present([absent])
    assert not local_addresses_present([LOOPBACK, absent]), "all of them, not any"


def test_no_addresses_are_trivially_present() -> None:
    assert local_addresses_present([])


def test_takes_any_iterable() -> None:
    assert local_addresses_present(ip for ip in [LOOPBACK])


def test_netlink_dump_sees_loopback_and_not_the_absent_address(absent: IPv4Address) -> None:
    assigned = local_ipv4_addresses()
    assert LOOPBACK in assigned
    assert absent not in assigned
    assert all(isinstance(ip, IPv4Address) for ip in assigned)


def test_bind_test_and_netlink_dump_agree(absent: IPv4Address) -> None:
    if nonlocal_bind_enabled() is not False:
        pytest.skip("ip_nonlocal_bind is on here: the bind test cannot be compared")
    for ip in sorted(local_ipv4_addresses()):
        assert role._bindable(ip), ip
    assert not role._bindable(absent)


def test_nonlocal_bind_switches_to_the_netlink_dump(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, absent: IPv4Address
) -> None:
    """With ip_nonlocal_bind=1 every bind succeeds: the answer must not come from bind."""
    sysctl = tmp_path / "ip_nonlocal_bind"
    sysctl.write_text("1\n")
    monkeypatch.setattr(role, "NONLOCAL_BIND", sysctl)

    def lying_bind(ip: IPv4Address) -> bool:
        raise AssertionError("the bind test lies with ip_nonlocal_bind=1")

    monkeypatch.setattr(role, "_bindable", lying_bind)
    assert nonlocal_bind_enabled() is True
    assert local_addresses_present([LOOPBACK])
    assert not local_addresses_present([absent])


def test_unreadable_sysctl_falls_back_to_netlink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(role, "NONLOCAL_BIND", tmp_path / "missing")
    assert nonlocal_bind_enabled() is None
    monkeypatch.setattr(role, "_bindable", lambda ip: pytest.fail("bind test used"))
    assert local_addresses_present([LOOPBACK])


def test_sysctl_zero_uses_the_bind_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_nonlocal_bind"
    sysctl.write_text("0\n")
    monkeypatch.setattr(role, "NONLOCAL_BIND", sysctl)
    asked: list[IPv4Address] = []

    def bindable(ip: IPv4Address) -> bool:
        asked.append(ip)
        return True

    monkeypatch.setattr(role, "_bindable", bindable)
    assert local_addresses_present([LOOPBACK, ABSENT])
    assert asked == [LOOPBACK, ABSENT]


def test_bind_errors_other_than_not_available_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing(socket.socket):
        def bind(self, address: object) -> None:
            raise OSError(errno.EACCES, "nope")

    monkeypatch.setattr(socket, "socket", Refusing)
    with pytest.raises(OSError) as caught:
        role._bindable(LOOPBACK)
    assert caught.value.errno == errno.EACCES


def test_exhausted_ports_still_mean_local(monkeypatch: pytest.MonkeyPatch) -> None:
    class Busy(socket.socket):
        def bind(self, address: object) -> None:
            raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(socket, "socket", Busy)
    assert role._bindable(LOOPBACK)


def test_freebind_binds_an_address_that_is_not_here(absent: IPv4Address) -> None:
    with freebind_udp_socket(str(absent), 0) as sock:
        ip, port = sock.getsockname()
        assert ip == str(absent) and port > 0
        assert not sock.getblocking()
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM
        assert sock.getsockopt(socket.SOL_IP, IP_FREEBIND) == 1
    # Without IP_FREEBIND the same bind is refused: the option is what makes it work.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain, pytest.raises(OSError) as e:
        plain.bind((str(absent), 0))
    assert e.value.errno == errno.EADDRNOTAVAIL


def test_freebind_on_a_local_address_receives() -> None:
    with (
        freebind_udp_socket("127.0.0.1", 0) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        sender.sendto(b"x", sock.getsockname())
        sock.settimeout(2.0)
        assert sock.recv(16) == b"x"


def test_freebind_raises_when_the_port_is_taken() -> None:
    # The half-made socket is closed: an unclosed one would fail the run (ResourceWarning).
    with freebind_udp_socket("127.0.0.1", 0) as taken:
        with pytest.raises(OSError) as caught:
            freebind_udp_socket("127.0.0.1", taken.getsockname()[1])
        assert caught.value.errno == errno.EADDRINUSE
        gc.collect()
