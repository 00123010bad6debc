"""The operator's side of the engine without root: call summaries from conntrack counters
(traffic.py), operator deletes, drain, the JSON log format and the ctl socket config key."""

from __future__ import annotations

import json
import logging

import pytest

from lrkp_tsl import config
from lrkp_tsl.errors import ConfigError
from lrkp_tsl.kernel import Counters, StreamChange, StreamEvent
from lrkp_tsl.latching import Policy
from lrkp_tsl.logfmt import JsonFormatter
from lrkp_tsl.traffic import Traffic, caller_sent
from tests.unit.test_engine import IDLE, RTCP_KEY, RTP_KEY, ep, make, ok, s_command, send

CALLEE_RTP_KEY = (ep("10.0.1.31:6000"), ep("10.0.0.10:20000"))


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if hasattr(r, "call_summary")]


def test_idle_call_summary_adds_what_its_expired_entries_carried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, kernel, _store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    engine.on_stream_events(
        [StreamEvent(StreamChange.STARTED, RTP_KEY), StreamEvent(StreamChange.STARTED, RTCP_KEY)],
        1.0,
    )
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    engine.on_stream_events(
        [
            StreamEvent(StreamChange.EXPIRED, RTP_KEY, Counters(100, 17200, 90, 15480)),
            StreamEvent(StreamChange.EXPIRED, RTCP_KEY, Counters(3, 300, 2, 200)),
        ],
        500.0,
    )
    engine.on_timer(500.0)
    assert "c1" not in engine.table
    (record,) = summaries(caplog)
    fields = record.call_summary  # type: ignore[attr-defined]
    assert fields["reason"] == "idle"
    assert fields["duration"] == 500.0
    assert fields["caller_to_callee_packets"] == 103
    assert fields["caller_to_callee_bytes"] == 17500
    assert fields["callee_to_caller_packets"] == 92
    assert fields["callee_to_caller_bytes"] == 15680
    assert fields["caller_learned"] == ["10.0.0.21:4000", "10.0.0.21:4001"]
    text = record.getMessage()
    assert text.startswith(f"[c1] removed: no media for {IDLE:g} s; lasted 500.0 s; ")
    assert "caller->callee 103 packets 17500 bytes, callee->caller 92 packets 15680 bytes" in text
    assert kernel.calls["streams"] == 0  # an idle call has no live entry left to read


def test_deleted_call_summary_reads_live_entries_before_they_are_deleted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, kernel, _store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    # The callee sent first: the entry's original direction is the callee's.
    engine.on_stream_events([StreamEvent(StreamChange.STARTED, CALLEE_RTP_KEY)], 1.0)
    kernel.counted[CALLEE_RTP_KEY] = Counters(40, 4000, 50, 5000)
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    ok(engine, s_command("c1", verb="D"), 30.0)
    (record,) = summaries(caplog)
    fields = record.call_summary  # type: ignore[attr-defined]
    assert fields["reason"] == "deleted"
    assert (fields["caller_to_callee_packets"], fields["caller_to_callee_bytes"]) == (50, 5000)
    assert (fields["callee_to_caller_packets"], fields["callee_to_caller_bytes"]) == (40, 4000)


def test_operator_delete_ends_the_call_with_its_own_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, kernel, store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    assert engine.delete("c1", 5.0) is True
    assert "c1" not in engine.table and "c1" not in store.records
    assert not kernel.flows
    assert engine.stats["calls.removed.operator"] == 1
    (record,) = summaries(caplog)
    assert record.getMessage().startswith("[c1] removed: deleted by an operator (lrkp-ctl delete)")
    assert engine.delete("c1", 6.0) is False


def test_draining_answers_p_with_an_empty_datagram_and_serves_s_and_d() -> None:
    engine, _kernel, _store = make(Policy.STRICT)
    engine.draining = True
    assert send(engine, b"1_1 P") == b""
    assert send(engine, b"1_1 P") == b""  # never cached: undrain answers the next one
    ok(engine, s_command("c2", cookie="1_2"))  # a call Kamailio bound here before the drain
    ok(engine, s_command("c2", verb="D", cookie="1_3"))
    engine.draining = False
    assert send(engine, b"1_4 P") == b"1_4 P PONG"
    assert engine.stats["drain.ping_refused"] == 2


def test_entries_of_a_call_that_had_the_ports_before_are_not_counted() -> None:
    engine, _kernel, _store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    call = engine.table.get("c1")
    assert call is not None
    traffic = Traffic()
    stranger = (ep("10.0.0.99:4000"), RTP_KEY[1])
    traffic.on_ended(call, stranger, Counters(10, 1000, 10, 1000))  # never started here
    traffic.on_started("c1", RTP_KEY)
    traffic.on_ended(call, RTP_KEY, Counters(1, 100, 2, 200))
    tally = traffic.total(call, [])
    assert (tally.caller_packets, tally.callee_packets) == (1, 2)
    assert caller_sent(call, RTP_KEY) and not caller_sent(call, CALLEE_RTP_KEY)


def test_json_log_lines_carry_the_summary_fields() -> None:
    record = logging.LogRecord("lrkp_tsl.calls", logging.INFO, "", 0, "[c1] removed", (), None)
    record.call_summary = {"call_id": "c1", "caller_to_callee_packets": 3}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "[c1] removed" and line["level"] == "info"
    assert line["call_id"] == "c1" and line["caller_to_callee_packets"] == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ctl_socket": "lrkp"}, "expected @NAME"),
        ({"log_format": "yaml"}, "expected one of text, json"),
    ],
)
def test_operator_keys_are_checked(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_mapping({"internal_ip": "10.0.0.1", **values})


def test_operator_keys_defaults() -> None:
    loaded = config.from_mapping({"internal_ip": "10.0.0.1"})
    assert (loaded.ctl_socket, loaded.log_format) == ("@lrkp-tsl", "text")
    loaded = config.from_mapping(
        {"internal_ip": "10.0.0.1", "ctl_socket": "/run/lrkp.sock", "log_format": "JSON"}
    )
    assert (loaded.ctl_socket, loaded.log_format) == ("/run/lrkp.sock", "json")


def test_conntrack_counters_and_raw_keys_read_pyroute2_encoded_entries() -> None:
    """Bytes as well as packets, each way; the raw key is the original tuple's."""
    import socket

    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

    from lrkp_tsl.dataplane.conntrack import (
        _NLMSGHDR,
        CTA_TUPLE_ORIG,
        _attrs,
        _decode_stream,
        _raw_tuple,
        raw_key,
    )

    message = nfct_msg()
    message["nfgen_family"] = socket.AF_INET
    message["header"]["type"] = NFNL_SUBSYS_CTNETLINK << 8
    orig = NFCTAttrTuple(saddr="10.0.0.21", daddr="10.0.0.10", sport=4000, dport=20002, proto=17)
    message["attrs"] = [
        ["CTA_TUPLE_ORIG", {"attrs": orig.attrs()}],
        ["CTA_COUNTERS_ORIG", {"attrs": [["CTA_COUNTERS_PACKETS", 3], ["CTA_COUNTERS_BYTES", 99]]}],
        [
            "CTA_COUNTERS_REPLY",
            {"attrs": [["CTA_COUNTERS_PACKETS", 5], ["CTA_COUNTERS_BYTES", 190]]},
        ],
        ["CTA_TIMEOUT", 42],
    ]
    message.encode()
    data = bytes(message.data)
    key = (ep("10.0.0.21:4000"), ep("10.0.0.10:20002"))
    decoded = _decode_stream(data, 0, len(data))
    assert decoded == (key, Counters(3, 99, 5, 190), 42.0)
    span = _attrs(data, _NLMSGHDR.size + 4, len(data))[CTA_TUPLE_ORIG]
    assert _raw_tuple(data, span) == raw_key(key)


def test_a_party_that_never_sent_rtcp_is_not_reported_as_learned_on_rtcp(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both parties are reachable (auto): the node relays to their SDP addresses from the
    start. The caller sent RTP, the callee answered on RTP, neither sent RTCP: RTCP is not
    "learned" at the SDP port + 1, in `show`, `sessions` or the summary."""
    from lrkp_tsl.mgmt import session_row

    engine, kernel, _store = make(Policy.AUTO)
    ok(engine, s_command("c1"))
    call = engine.table.get("c1")
    assert call is not None
    row = session_row(engine, call, {RTP_KEY: (Counters(10, 1000, 0, 0), 50.0)}, 1.0)
    assert (row["caller"]["learned"], row["caller"]["latching"]) == ("10.0.0.21:4000", "trusted")
    assert (row["caller"]["learned_rtcp"], row["caller"]["latching_rtcp"]) == (None, "trusted")
    # The callee has sent nothing yet: trusted at its SDP address, not heard.
    assert (row["callee"]["learned"], row["callee"]["latching"]) == (None, "trusted")
    row = session_row(engine, call, {RTP_KEY: (Counters(10, 1000, 8, 800), 50.0)}, 1.0)
    assert row["callee"]["learned"] == "10.0.1.31:6000"  # its answers on the entry count
    assert row["callee"]["learned_rtcp"] is None

    engine.on_stream_events([StreamEvent(StreamChange.STARTED, RTP_KEY)], 1.0)
    kernel.counted[RTP_KEY] = Counters(100, 17200, 90, 15480)
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    ok(engine, s_command("c1", verb="D"), 30.0)
    (record,) = summaries(caplog)
    fields = record.call_summary  # type: ignore[attr-defined]
    assert fields["caller_learned"] == ["10.0.0.21:4000", None]
    assert fields["callee_learned"] == ["10.0.1.31:6000", None]
    assert "learned caller 10.0.0.21:4000/-, callee 10.0.1.31:6000/-" in record.getMessage()


def test_rtcp_heard_on_an_entry_that_ended_stays_heard() -> None:
    from lrkp_tsl.mgmt import session_row

    engine, _kernel, _store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    engine.on_stream_events([StreamEvent(StreamChange.STARTED, RTCP_KEY)], 1.0)
    engine.on_stream_events(
        [StreamEvent(StreamChange.EXPIRED, RTCP_KEY, Counters(3, 300, 0, 0))], 2.0
    )
    call = engine.table.get("c1")
    assert call is not None
    row = session_row(engine, call, {}, 3.0)
    assert row["caller"]["learned_rtcp"] == "10.0.0.21:4001"  # it did send RTCP, once
    assert row["callee"]["learned_rtcp"] is None  # strict: fixed, and never heard
    assert row["callee"]["latching_rtcp"] == "fixed"
