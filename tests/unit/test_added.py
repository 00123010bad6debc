"""The record of what a node added besides its table (dataplane/added.py), and the reserved
ports it lets a flush take back. The sysctls are a dict here; tests/netns/test_flush.py and
test_colocate.py run the same for real."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lrkp_tsl.dataplane import reserve, sysctl
from lrkp_tsl.dataplane.added import Added, AddedRecord
from lrkp_tsl.dataplane.reserve import PortReservation, parse
from lrkp_tsl.media import PortRange

COOKIE = 4711
RELAY = PortRange(20000, 21999)


def test_the_record_is_read_back_by_the_same_namespace_only(tmp_path: Path) -> None:
    path = tmp_path / "netns-1.added"
    record = AddedRecord(path, COOKIE)
    assert record.added == Added() and not path.exists()
    record.update(reserved=parse("20000-21999"), queue_num=0, created_raw=True)
    assert AddedRecord(path, COOKIE).added == Added(((20000, 21999),), 0, True)
    # The inode of a namespace that is gone, reused: another namespace's record is ignored,
    # and replaced by the first change (an empty record is no file at all).
    other = AddedRecord(path, COOKIE + 1)
    assert other.added == Added()
    other.update(queue_num=5)
    assert AddedRecord(path, COOKIE).added == Added()
    assert AddedRecord(path, COOKIE + 1).added == Added(queue_num=5)
    other.update(queue_num=None)
    assert not path.exists()


def test_an_unreadable_record_is_ignored_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "netns-1.added"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        record = AddedRecord(path, COOKIE)
    assert record.added == Added()
    assert "unreadable" in caplog.text and "leaves the reserved ports" in caplog.text
    record.save()
    assert not path.exists()


@pytest.fixture
def sysctls(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {reserve.RESERVED: "8080,21000-21010", reserve.EPHEMERAL: "32768 60999"}
    monkeypatch.setattr(sysctl, "read", lambda name: values[name])
    monkeypatch.setattr(sysctl, "write", values.__setitem__)
    return values


def test_a_flush_takes_back_what_any_node_added_never_the_operators(
    tmp_path: Path, sysctls: dict[str, str]
) -> None:
    path = tmp_path / "netns-1.added"
    first = PortReservation(AddedRecord(path, COOKIE))
    first.apply(RELAY)
    assert sysctls[reserve.RESERVED] == "8080,20000-21999"
    # Stopped without a flush, then restarted: the range is there, this run adds nothing,
    # and a start that fails takes back only what it added itself (nothing).
    restarted = PortReservation(AddedRecord(path, COOKIE))
    restarted.apply(RELAY)
    assert restarted.added == () and restarted.release() == ()
    assert sysctls[reserve.RESERVED] == "8080,20000-21999"
    # A flush, by a later process: the ports on record, the operator's stay.
    flush = PortReservation(AddedRecord(path, COOKIE))
    assert flush.release(recorded=True) == parse("20000-20999,21011-21999")
    assert sysctls[reserve.RESERVED] == "8080,21000-21010"
    assert not path.exists()
    assert PortReservation(AddedRecord(path, COOKIE)).release(recorded=True) == ()


def test_ports_removed_from_the_list_meanwhile_are_no_longer_the_nodes(
    tmp_path: Path, sysctls: dict[str, str]
) -> None:
    path = tmp_path / "netns-1.added"
    PortReservation(AddedRecord(path, COOKIE)).apply(RELAY)
    sysctls[reserve.RESERVED] = "8080"  # the operator rewrote the list
    PortReservation(AddedRecord(path, COOKIE)).apply(PortRange(30000, 30999))
    assert AddedRecord(path, COOKIE).added.reserved == parse("30000-30999")
    sysctls[reserve.RESERVED] += ",20000-21999"  # and reserved the old range for himself
    assert PortReservation(AddedRecord(path, COOKIE)).release(recorded=True) == parse("30000-30999")
    assert sysctls[reserve.RESERVED] == "8080,20000-21999"


def test_a_claim_with_a_port_missing_is_dropped_the_list_was_rewritten(
    tmp_path: Path, sysctls: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """systemd-sysctl or `sysctl -w` rewrote the list: what is left of the node's range may be
    the operator's own now, so neither a flush nor a later start counts it as the node's."""
    path = tmp_path / "netns-1.added"
    PortReservation(AddedRecord(path, COOKIE)).apply(RELAY)  # 20000-20999,21011-21999
    sysctls[reserve.RESERVED] = "8080,20000-20999"
    with caplog.at_level(logging.WARNING):
        assert PortReservation(AddedRecord(path, COOKIE)).release(recorded=True) == ()
    assert "not taking back reserved ports 20000-20999,21011-21999" in caplog.text
    assert sysctls[reserve.RESERVED] == "8080,20000-20999" and not path.exists()
    # The same rewrite seen by a restart: the claim goes, the ports the start adds are its.
    PortReservation(AddedRecord(path, COOKIE)).apply(RELAY)
    sysctls[reserve.RESERVED] = "8080,20000-20999"
    PortReservation(AddedRecord(path, COOKIE)).apply(RELAY)
    assert AddedRecord(path, COOKIE).added.reserved == parse("21000-21999")
    assert PortReservation(AddedRecord(path, COOKIE)).release(recorded=True) == parse("21000-21999")
    assert sysctls[reserve.RESERVED] == "8080,20000-20999"
