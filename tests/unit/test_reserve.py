"""Keeping the relay range out of automatic port allocation: the decision, without I/O."""

from __future__ import annotations

import pytest

from lrkp_tsl.dataplane.reserve import (
    MIN_EPHEMERAL,
    count,
    difference,
    parse,
    plan,
    render,
    union,
)
from lrkp_tsl.media import PortRange

DEBIAN = (32768, 60999)  # Linux's default ip_local_port_range


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("", ()),
        ("\n", ()),
        ("8080", ((8080, 8080),)),
        ("8080,20000-40000\n", ((8080, 8080), (20000, 40000))),
        ("30000-30010,8080,30005-30020,30021", ((8080, 8080), (30000, 30021))),
    ],
)
def test_the_kernels_list_parses_to_merged_ranges(text: str, ranges: tuple[object, ...]) -> None:
    assert parse(text) == ranges


@pytest.mark.parametrize("text", ["abc", "5-", "70000", "9-3", "-1"])
def test_a_list_the_node_cannot_read_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="not a port or port range"):
        parse(text)


def test_render_writes_what_the_kernel_reads_back() -> None:
    ranges = ((8080, 8080), (20000, 40000))
    assert render(ranges) == "8080,20000-40000"
    assert parse(render(ranges)) == ranges
    assert render(()) == ""


def test_set_arithmetic() -> None:
    a = ((10, 20), (30, 40))
    assert union(a, ((21, 29),)) == ((10, 40),)
    assert difference(a, ((15, 35),)) == ((10, 14), (36, 40))
    assert difference(a, ((0, 100),)) == ()
    assert difference(a, ()) == a
    assert difference(((10, 40),), ((12, 12), (20, 22))) == ((10, 11), (13, 19), (23, 40))
    assert count(a) == 22


def test_the_default_relay_range_is_reserved_beside_the_operators_ports() -> None:
    found = plan(((8080, 8080), (35000, 35000)), DEBIAN, PortRange(30000, 40000))
    assert found.after == ((8080, 8080), (30000, 40000))
    assert found.added == ((30000, 34999), (35001, 40000))  # 35000 stays the operator's
    assert found.reserved
    assert found.ephemeral_left == 60999 - 40000  # 20,999 of Linux's 28,232


def test_a_range_already_reserved_adds_nothing() -> None:
    found = plan(((1000, 50000),), DEBIAN, PortRange(20000, 40000))
    assert found.after == found.before and found.added == () and found.reserved


def test_never_leaves_the_host_too_few_ephemeral_ports() -> None:
    # The whole ephemeral range inside the relay range: reserving would leave none.
    found = plan((), (20000, 21999), PortRange(20000, 21999))
    assert found.after == () and not found.reserved and found.left_if_reserved == 0
    # Just enough left, and one port short of it.
    enough = plan((), (20000, 22000 + MIN_EPHEMERAL - 1), PortRange(20000, 21999))
    assert enough.reserved and enough.ephemeral_left == MIN_EPHEMERAL
    short = plan((), (20000, 22000 + MIN_EPHEMERAL - 2), PortRange(20000, 21999))
    assert not short.reserved and short.left_if_reserved == MIN_EPHEMERAL - 1
