"""ng relay pairs come from the PortUse lrkproxy calls use: top down, never a held port."""

from __future__ import annotations

import pytest

from lrkp_tsl.media import PortRange
from lrkp_tsl.ng.allocator import PortsExhausted, SharedPortPool
from lrkp_tsl.ports import PortUse


def test_pairs_are_aligned_top_down_and_skip_held_ports() -> None:
    use = PortUse(PortRange(20000, 20009))
    pool = SharedPortPool(use)
    use.take((20007,))  # an lrkproxy call's RTCP port
    assert pool.pairs == 5
    assert [pool.allocate() for _ in range(4)] == [20008, 20004, 20002, 20000]
    with pytest.raises(PortsExhausted, match="Ran out of ports: every pair of 20000-20009 is held"):
        pool.allocate()
    pool.release(20004)
    assert 20004 not in use and 20005 not in use
    assert pool.allocate() == 20004


def test_odd_range_edges() -> None:
    pool = SharedPortPool(PortUse(PortRange(20001, 20004)))  # pairs 20001-2, 20003-4
    assert [pool.allocate(), pool.allocate()] == [20003, 20001]
    tiny = SharedPortPool(PortUse(PortRange(20000, 20000)))  # no room for a pair
    assert tiny.pairs == 0
    with pytest.raises(PortsExhausted):
        tiny.allocate()


def test_held_ports_count_for_lrkproxys_g() -> None:
    use = PortUse(PortRange(20000, 20099))
    pool = SharedPortPool(use)
    port = pool.allocate()
    assert (port, use.highest()) == (20098, 20099)
    assert use.next_block() == 20000  # G steers Kamailio below the ng pairs


def test_release_of_a_foreign_port_is_a_bug() -> None:
    pool = SharedPortPool(PortUse(PortRange(20000, 20099)))
    with pytest.raises(ValueError, match="was not allocated by this pool"):
        pool.release(20000)


def test_cursor_wraps() -> None:
    pool = SharedPortPool(PortUse(PortRange(20000, 20005)))
    first = [pool.allocate() for _ in range(3)]
    pool.release(first[0])
    assert pool.allocate() == first[0]  # after wrapping from the bottom to the top
