"""An ng call as the engine stores and replicates it (ng/record.py), and the ng table and
pool following calls it did not decide (callmodel.adopt/forget, allocator.hold)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lrkp_tsl.ng.record import RecordError, from_json, to_json
from tests.unit.test_ng_callmodel import World, body


def answered(world: World) -> None:
    world.offer(direction=["internal", "external"], **{"received-from": ["IP4", "203.0.113.7"]})
    world.answer(**{"to-tag": "B1"})
    world.answer(**{"to-tag": "B2"})  # a fork: a former tag to remember


def test_a_call_comes_back_exactly_with_wall_clock_times() -> None:
    world = World()
    answered(world)
    call = world.calls.get("call-1")
    assert call is not None
    text = to_json(call, 1_000_000.0)
    assert '"created":1000100.0' in text  # wall-clock: it outlives the monotonic clock
    back = from_json(text, 1_000_000.0)
    assert back == call
    assert from_json(to_json(call, 1_000_000.0), 2_000_000.0, 5.0) == replace(
        call, created=call.created - 1_000_000, last_signal=call.last_signal - 1_000_000,
        delete_at=5.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["", "[]", '{"v": 2}', '{"v": 1, "sides": []}', '{"v": 1, "call_id": "x"}', "{"],
)
def test_what_is_no_record_is_a_record_error(text: str) -> None:
    with pytest.raises(RecordError):
        from_json(text, 0.0)


def test_adopt_holds_exactly_the_calls_pairs_and_forget_gives_them_back() -> None:
    source = World()
    answered(source)
    call = source.calls.get("call-1")
    assert call is not None
    mirror = World()  # a standby, or this node after a restart
    mirror.calls.adopt(call)
    assert sorted(mirror.pool.held()) == sorted(call.pairs()) and len(mirror.use) == 4
    mirror.calls.adopt(call)  # the same again: nothing more held
    assert len(mirror.use) == 4
    # A re-offer on the active node added a stream: its pairs are held too.
    source.offer(body("192.0.2.10", "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 96"))
    bigger = source.calls.get("call-1")
    assert bigger is not None
    mirror.calls.adopt(bigger)
    assert sorted(mirror.pool.held()) == sorted(bigger.pairs()) and len(mirror.use) == 8
    assert mirror.calls.forget("call-1") == bigger
    assert len(mirror.use) == 0 and len(mirror.pool) == 0
    assert mirror.calls.forget("call-1") is None


def test_a_pair_is_held_once() -> None:
    world = World()
    world.pool.hold(30000)
    with pytest.raises(ValueError, match="held by an ng call already"):
        world.pool.hold(30000)
    assert world.pool.allocate() != 30000  # and never allocated to another call


def test_an_adoption_whose_pairs_another_ng_call_holds_holds_none_of_them() -> None:
    """A replay can show a standby, for a moment, an ended call and the call that took one
    of its pairs (port numbers are shared by both relay addresses): the adoption that
    fails holds nothing, so no pair is left held by no call once the ended call goes."""
    source = World()
    answered(source)
    first = source.calls.get("call-1")
    assert first is not None
    mirror = World()
    mirror.calls.adopt(first)
    taken, free = first.sides[0].relay[0], min(first.pairs()) - 2
    assert taken is not None and free not in mirror.pool.held()
    other = replace(
        first,
        call_id="call-2",
        sides=(replace(first.sides[0], relay=(taken,)), replace(first.sides[1], relay=(free,))),
    )
    with pytest.raises(ValueError, match="held by an ng call already"):
        mirror.calls.adopt(other)
    assert sorted(mirror.pool.held()) == sorted(first.pairs()) and len(mirror.use) == 4
    assert mirror.calls.get("call-2") is None
    mirror.calls.forget("call-1")
    assert len(mirror.use) == 0 and len(mirror.pool) == 0
