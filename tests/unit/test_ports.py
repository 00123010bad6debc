"""Where the node tells Kamailio to allocate next (`G`), given the ports live calls hold."""

from __future__ import annotations

from lrkp_tsl.media import PortRange
from lrkp_tsl.ports import PortUse


def block(start: int) -> list[int]:
    return [start, start + 1, start + 2, start + 3]


def test_an_empty_node_starts_at_the_start_and_ends_where_a_block_fits() -> None:
    ports = PortUse(PortRange(20000, 20010))
    assert ports.next_block() == 20000
    assert ports.last_block() == 20004  # 20004-20007 fits; 20008-20011 would not


def test_current_port_points_past_the_highest_port_in_use() -> None:
    ports = PortUse(PortRange(20000, 40000))
    for start in range(20000, 24000, 4):  # 1,000 calls
        ports.take(block(start))
    assert ports.next_block() == 24000
    ports.release(block(23996))
    assert ports.next_block() == 23996


def test_past_the_end_it_wraps_to_the_first_free_block() -> None:
    ports = PortUse(PortRange(20000, 20019))
    for start in (20000, 20004, 20016):
        ports.take(block(start))
    assert ports.last_block() == 20016
    assert ports.next_block() == 20008


def test_a_gt1_call_taking_two_ports_keeps_its_block_busy() -> None:
    ports = PortUse(PortRange(20000, 20019))
    ports.take([20016, 20017])
    ports.take([20000, 20001])
    assert ports.next_block() == 20004


def test_shared_ports_are_counted_until_the_last_holder_goes() -> None:
    ports = PortUse(PortRange(20000, 40000))
    ports.take([30000])  # internal IP
    ports.take([30000])  # external IP, same port
    ports.release([30000])
    assert ports.highest() == 30000
    ports.release([30000])
    assert ports.highest() is None and ports.next_block() == 20000
