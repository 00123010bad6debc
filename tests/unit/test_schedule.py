"""The engine's one schedule: deadlines by key, due in order, memory bounded under churn."""

from __future__ import annotations

from lrkp_tsl.schedule import COMPACT_RATIO, COMPACT_SLACK, Schedule


def test_keys_come_due_in_order_and_once() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("b", 2.0)
    schedule.set("a", 1.0)
    schedule.set("c", 3.0)
    assert schedule.next() == 1.0
    assert schedule.pop_due(2.5, limit=10) == ["a", "b"]
    assert schedule.pop_due(2.5, limit=10) == []
    assert schedule.next() == 3.0 and len(schedule) == 1


def test_rescheduling_replaces_and_clearing_removes() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("a", 1.0)
    schedule.set("a", 5.0)
    assert schedule.next() == 5.0
    assert schedule.pop_due(4.0, limit=10) == []
    schedule.set_earlier("a", 9.0)
    assert schedule.get("a") == 5.0
    schedule.set_earlier("a", 2.0)
    assert schedule.get("a") == 2.0
    schedule.clear("a")
    assert schedule.next() is None and "a" not in schedule


def test_the_limit_bounds_one_run() -> None:
    schedule: Schedule[int] = Schedule()
    for key in range(10):
        schedule.set(key, float(key))
    assert schedule.pop_due(100.0, limit=4) == [0, 1, 2, 3]
    assert schedule.next() == 4.0


def test_churn_does_not_grow_the_heap_without_bound() -> None:
    schedule: Schedule[int] = Schedule()
    for round_ in range(200):
        for key in range(100):
            schedule.set(key, float(round_ * 100 + key))
    assert len(schedule) == 100
    assert len(schedule._heap) <= COMPACT_RATIO * 100 + COMPACT_SLACK + 1
    assert schedule.pop_due(1e9, limit=1000) == [key for key in range(100)]
