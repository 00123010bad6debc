"""The publisher's RESP2, packed and parsed by hand (replication.py): the same bytes as the
generic packing, and replies parsed whole or not at all."""

from __future__ import annotations

import pytest

from lrkp_tsl.replication import (
    Delete,
    Put,
    Quiet,
    ReplyError,
    change_bytes,
    change_commands,
    pack,
    parse,
    transaction_failure,
    trim,
)

RECORD = {"call_id": "1-5@10.0.0.1", "caller": "10.0.0.2:4000", "quiet_since": 1.7e9}


@pytest.mark.parametrize(
    "op", [Put(RECORD), Delete("c1"), Quiet("c1", 1700000000.25), Quiet("c1", None)]
)
def test_a_change_packs_as_its_commands_would(op: Put | Delete | Quiet) -> None:
    trimmed = trim(1000)
    assert change_bytes(op, trimmed) == b"".join(pack(c) for c in change_commands(op, trimmed))


def test_replies_parse_whole_or_not_at_all() -> None:
    data = b"+OK\r\n+QUEUED\r\n*3\r\n:1\r\n$15\r\n1700000000000-0\r\n$-1\r\n-ERR no\r\n"
    replies, at = [], 0
    while (parsed := parse(data, at)) is not None:
        reply, at = parsed
        replies.append(reply)
    assert replies[:3] == ["OK", "QUEUED", [1, "1700000000000-0", None]]
    assert isinstance(replies[3], ReplyError) and str(replies[3]) == "ERR no"
    for cut in range(1, len(data) - 1):  # a reply cut anywhere is not there yet
        head = data[:cut]
        at, whole = 0, 0
        while (parsed := parse(head, at)) is not None:
            _reply, at = parsed
            whole += 1
        assert whole <= 4


def test_a_transaction_fails_on_any_error_inside() -> None:
    assert transaction_failure(["OK", "QUEUED", [1]]) is None
    assert str(transaction_failure(["OK", ReplyError("ERR x"), ReplyError("EXECABORT")])) == "ERR x"
    assert str(transaction_failure(["OK", "QUEUED", [ReplyError("WRONGTYPE")]])) == "WRONGTYPE"
    assert transaction_failure(["OK", "QUEUED", None]) is not None
