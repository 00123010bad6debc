"""Conntrack capacity: the arithmetic, what is logged and how often, and /proc parsed."""

from __future__ import annotations

import logging
from pathlib import Path

from lrkp_tsl.ctcapacity import (
    DROPS_WARN_EVERY,
    WARN_EVERY,
    Capacity,
    Fill,
    range_calls,
    read_failures,
    read_fill,
    shortfall,
)
from lrkp_tsl.media import PortRange

RANGE = PortRange(30000, 39999)  # 10,000 ports: 2,500 calls, up to 5,000 entries
NONE = {"insert_failed": 0, "drop": 0, "early_drop": 0}
# As a 6.x kernel writes it: a header, then one line per CPU (hexadecimal).
STAT = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop "
    "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
    "00000010  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 "
    "00000002 0000000a 00000001 00000000  00000000 00000000 00000000 00000000\n"
    "00000010  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000010 00000000 00000000  00000000 00000000 00000000 00000000\n"
)


def fill(count: int, limit: int, **failures: int) -> Fill:
    return Fill(count, limit, NONE | failures)


def test_a_call_needs_up_to_two_entries_and_the_range_holds_a_call_per_four_ports() -> None:
    assert range_calls(RANGE) == 2500
    assert range_calls(PortRange(30000, 30002)) == 0
    assert shortfall(fill(0, 5000), 2500, 0) == 0  # exactly enough
    assert shortfall(fill(1, 5000), 2500, 0) == 1
    assert shortfall(fill(4000, 5000), 2500, 0) == 4000
    # 2,000 live calls hold 4,000 of the entries in use: the 500 calls left need 1,000.
    assert shortfall(fill(4000, 5000), 2500, 2000) == 0
    assert shortfall(fill(4500, 5000), 2500, 2000) == 500
    assert shortfall(fill(10**6, 0), 2500, 0) == 0  # 0: the kernel sets no limit
    assert shortfall(fill(6000, 5000), 2500, 2500) == 0  # the range is full anyway


def test_a_shortfall_is_warned_with_the_sysctl_and_by_how_much_then_rate_limited() -> None:
    capacity = Capacity(RANGE)
    (found,) = capacity.check(fill(4500, 5000), 100, now=0.0)
    level, text = found
    assert level == logging.WARNING
    assert "500 of net.netfilter.nf_conntrack_max=5000 entries are free (4500 in use)" in text
    assert "can take 2400 more calls, which need up to 4800" in text
    assert "Raise it by at least 4300" in text
    assert "sysctl -w net.netfilter.nf_conntrack_max=10240" in text  # 9,300, rounded up
    assert capacity.check(fill(4500, 5000), 100, now=WARN_EVERY - 1) == []
    assert capacity.check(fill(4500, 5000), 100, now=WARN_EVERY)[0][0] == logging.WARNING
    (cleared,) = capacity.check(fill(100, 262144), 100, now=WARN_EVERY + 1)
    assert cleared[0] == logging.INFO and "room again" in cleared[1]
    assert capacity.check(fill(100, 262144), 100, now=WARN_EVERY + 2) == []


def test_entries_the_kernel_could_not_keep_are_logged_as_errors_at_a_bounded_rate() -> None:
    capacity = Capacity(RANGE)
    assert capacity.check(fill(10, 262144, drop=7), 0, now=0.0) == []  # before the node
    (found,) = capacity.check(fill(10, 262144, drop=9, insert_failed=1), 0, now=10.0)
    assert found[0] == logging.ERROR
    assert "could not keep 3 new entries" in found[1]
    assert capacity.check(fill(10, 262144, drop=20, insert_failed=1), 0, now=20.0) == []
    (later,) = capacity.check(fill(10, 262144, drop=20, early_drop=4), 0, now=10 + DROPS_WARN_EVERY)
    assert "could not keep 15 new entries" in later[1]  # 11 drops + 4 early drops meanwhile


def test_proc_stat_columns_are_summed_over_cpus() -> None:
    assert read_failures(STAT) == {"insert_failed": 2, "drop": 26, "early_drop": 1}


def test_read_fill_from_proc(tmp_path: Path) -> None:
    assert read_fill(tmp_path) is None  # no conntrack in this namespace
    netfilter = tmp_path / "sys" / "net" / "netfilter"
    netfilter.mkdir(parents=True)
    (netfilter / "nf_conntrack_count").write_text("42\n")
    (netfilter / "nf_conntrack_max").write_text("262144\n")
    (tmp_path / "net" / "stat").mkdir(parents=True)
    (tmp_path / "net" / "stat" / "nf_conntrack").write_text(STAT)
    assert read_fill(tmp_path) == Fill(
        42, 262144, {"insert_failed": 2, "drop": 26, "early_drop": 1}
    )
