"""The pair's health: when a standby is in sync, how far behind it is, and the alarms."""

from __future__ import annotations

import logging

import pytest

from lrkp_tsl.pairhealth import (
    ALARM_AFTER,
    CATCH_UP_ALARM,
    LAG_ALARM,
    NO_STANDBY_ALARM,
    REMIND_EVERY,
    FollowState,
    PairHealth,
    Probe,
    PublishState,
    replicas,
)

PEER = "redis://10.0.0.1:6379"
REPLID = "a" * 40
FOLLOWING = FollowState(loaded=True, error=None)
PUBLISHING = PublishState(True, True, None, 0, 10, 1, 0)
DENIED = (
    "Redis redis://10.0.0.1:6379: INFO replication failed (ResponseError: DENIED Redis is "
    "running in protected mode because protected mode is enabled and no password is set)"
)


def replica(offset: int, link: str = "up", **more: str) -> dict[str, str]:
    return {
        "role": "slave",
        "master_host": "10.0.0.1",
        "master_port": "6379",
        "master_link_status": link,
        "master_sync_in_progress": "0",
        "loading": "0",
        "slave_repl_offset": str(offset),
        "master_replid": REPLID,
        "master_link_down_since_seconds": "-1" if link == "up" else "3",
        **more,
    }


def master(offset: int, *followers: str) -> dict[str, str]:
    info = {
        "role": "master",
        "master_replid": REPLID,
        "master_repl_offset": str(offset),
        "connected_slaves": str(len(followers)),
    }
    for index, line in enumerate(followers):
        info[f"slave{index}"] = line
    return info


def standby(
    health: PairHealth, at: float, offset: int, follow: FollowState = FOLLOWING, **probe: object
) -> None:
    """One probe at `at`, seen on the loop 10 ms later."""
    fields: dict[str, object] = {
        "local": replica(offset),
        "last_change": "5-0",
        "peer": master(offset),
        "peer_calls": 3,
    }
    fields.update(probe)
    health.probed_standby(Probe(at, **fields), follow, 3, at + 0.01)  # type: ignore[arg-type]


def in_sync_standby() -> PairHealth:
    health = PairHealth(PEER)
    health.became("standby", 0.0)
    health.table_loaded("5-0")
    return health


def test_a_standby_that_holds_what_the_active_has_is_in_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = in_sync_standby()
    with caplog.at_level(logging.INFO, "lrkp_tsl.pair"):
        standby(health, 1.0, 100)
    status = health.status()
    assert status["in_sync"] and status["state"] == "in sync" and status["link"] == "up"
    assert status["lag"] == pytest.approx(0.01) and status["active_calls"] == 3
    assert "standby: in sync with the active node" in caplog.text
    assert health.report()["in_sync"]


def test_lag_is_the_age_of_the_newest_state_known_to_be_here() -> None:
    health = in_sync_standby()
    standby(health, 1.0, 100)
    # The active moved on (offset 200) and this Redis has not: the standby holds what the
    # active had at 1.0, nothing newer; lag grows with the clock until it catches up.
    standby(health, 2.0, 150, peer=master(200))
    standby(health, 3.0, 150, peer=master(200))
    assert health.status()["lag"] == pytest.approx(2.01)
    standby(health, 3.0 + LAG_ALARM, 150, peer=master(200))
    status = health.status()
    assert not status["in_sync"] and status["state"] == "not following"
    assert "holds nothing newer than" in status["problems"][0]
    standby(health, 10.0, 200)
    assert health.status()["in_sync"]


def test_changes_not_applied_yet_are_lag_too() -> None:
    health = in_sync_standby()
    standby(health, 1.0, 100)
    standby(health, 2.0, 110, last_change="9-0")  # in this Redis, not yet in the engine
    standby(health, 2.5, 110, last_change="9-0")
    assert health.status()["lag"] == pytest.approx(1.51)
    health.changes_applied("9-0", 4, 2.6)
    standby(health, 3.0, 110, last_change="9-0")
    assert health.status()["lag"] == pytest.approx(0.01)
    assert health.status()["applied"] == 4


def test_a_refused_replica_alarms_once_reminds_and_says_when_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = in_sync_standby()
    standby(health, 1.0, 100)
    caplog.clear()
    with caplog.at_level(logging.INFO, "lrkp_tsl.pair"):
        standby(health, 2.0, 100, local=replica(100, link="down"), peer=None, peer_error=DENIED)
        assert not health.status()["in_sync"]
        assert caplog.records == []  # not before it lasted ALARM_AFTER
        standby(health, 2.0 + ALARM_AFTER, 100, local=replica(100, "down"), peer=None,
                peer_error=DENIED)  # fmt: skip
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        text = warnings[0].getMessage()
        assert "standby: NOT following the active node" in text
        assert "a takeover now would lose calls" in text and "protected mode" in text
        assert "set `protected-mode no` there" in text  # what to do about it
        assert "the replication link to 10.0.0.1:6379 is down" in text
        standby(health, 30.0, 100, local=replica(100, "down"), peer=None, peer_error=DENIED)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        standby(health, 2.0 + ALARM_AFTER + REMIND_EVERY, 100, local=replica(100, "down"),
                peer=None, peer_error=DENIED)  # fmt: skip
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "still NOT following" in warnings[1].getMessage()
        standby(health, 100.0, 300, peer=master(300))
    assert health.status()["in_sync"]
    assert "standby: following the active node again, after 98 s" in caplog.text


def test_copying_the_table_is_given_time_before_it_alarms(caplog: pytest.LogCaptureFixture) -> None:
    health = PairHealth(PEER)
    health.became("standby", 0.0)
    loading = FollowState(loaded=False, error=None)
    with caplog.at_level(logging.WARNING, "lrkp_tsl.pair"):
        standby(health, 1.0, 100, follow=loading)
        standby(health, 1.0 + CATCH_UP_ALARM - 1, 100, follow=loading)
        assert health.status()["state"] == "catching up" and caplog.records == []
        standby(health, 1.0 + CATCH_UP_ALARM, 100, follow=loading)
    assert "loading the active's table" in caplog.text


def test_a_redis_that_is_no_replica_or_replicates_elsewhere_is_a_problem() -> None:
    health = in_sync_standby()
    standby(health, 1.0, 100, local={"role": "master", "master_replid": REPLID})
    assert "is not a replica of the active's" in health.status()["problems"][0]
    standby(health, 2.0, 100, local=replica(100, master_host="10.9.9.9"))
    assert "replicates 10.9.9.9:6379, not" in health.status()["problems"][0]
    for url in ("redis://:***@10.0.0.1:6379/0", "redis://10.0.0.1"):  # the same peer
        other = PairHealth(url)
        other.became("standby", 0.0)
        other.table_loaded("5-0")
        standby(other, 1.0, 100)
        assert other.status()["in_sync"], other.status()["problems"]


def test_the_active_is_followed_when_a_replica_acks_and_the_standby_reports_in_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = PairHealth(PEER)
    health.became("active", 0.0)
    line = "ip=10.0.0.2,port=6379,state=online,offset=90,lag=0"
    report = {"in_sync": True, "problems": [], "lag": 0.002, "calls": 3}
    with caplog.at_level(logging.INFO, "lrkp_tsl.pair"):
        health.probed_active(Probe(1.0, master(100, line), standby=report), PUBLISHING, 3, 1.0)
    status = health.status()
    assert status["in_sync"] and status["replica"]["behind_bytes"] == 10
    assert status["standby_calls"] == 3 and status["lag"] == 0.002
    assert "the standby follows this node in sync" in caplog.text


def test_an_active_nobody_follows_alarms_after_a_while(caplog: pytest.LogCaptureFixture) -> None:
    health = PairHealth(PEER)
    health.became("active", 0.0)
    with caplog.at_level(logging.WARNING, "lrkp_tsl.pair"):
        health.probed_active(Probe(1.0, master(100)), PUBLISHING, 3, 1.0)
        health.probed_active(Probe(1.0, master(100)), PUBLISHING, 3, NO_STANDBY_ALARM)
        assert caplog.records == []  # a standby may be restarting
        health.probed_active(Probe(1.0, master(100)), PUBLISHING, 3, 1.0 + NO_STANDBY_ALARM)
    status = health.status()
    assert not status["in_sync"]
    assert "no standby's Redis replicates this node's Redis" in status["problems"]
    assert "active: NOT followed by a standby" in caplog.text


def test_replicas_are_read_from_info() -> None:
    info = master(5, "ip=10.0.0.2,port=6379,state=online,offset=5,lag=1")
    assert replicas(info) == [
        {"ip": "10.0.0.2", "port": "6379", "state": "online", "offset": "5", "lag": "1"}
    ]
    assert replicas({}) == []


def test_the_active_alarms_at_once_when_its_standby_says_it_does_not_follow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = "ip=10.0.0.2,port=6379,state=online,offset=90,lag=0"
    for state, alarm_at in (("not following", ALARM_AFTER), ("catching up", NO_STANDBY_ALARM)):
        health = PairHealth(PEER)
        health.became("active", 0.0)
        report = {"in_sync": False, "state": state, "problems": ["the link is down"]}
        caplog.clear()
        with caplog.at_level(logging.WARNING, "lrkp_tsl.pair"):
            for now in (1.0, 1.0 + alarm_at - 0.1):
                health.probed_active(Probe(now, master(100, line), standby=report), PUBLISHING,
                                     3, now)  # fmt: skip
            assert caplog.records == []
            health.probed_active(Probe(2.0, master(100, line), standby=report), PUBLISHING, 3,
                                 1.0 + alarm_at)  # fmt: skip
        assert "the standby is not in sync: the link is down" in caplog.text


def test_both_nodes_active_is_a_split_brain(caplog: pytest.LogCaptureFixture) -> None:
    health = PairHealth(PEER)
    health.became("active", 0.0)
    with caplog.at_level(logging.WARNING, "lrkp_tsl.pair"):
        for now in (1.0, 1.0 + ALARM_AFTER):
            health.probed_active(Probe(now, master(100), peer_active=True), PUBLISHING, 3, now)
    status = health.status()
    assert status["split_brain"] and status["state"] == "split brain"
    assert "SPLIT BRAIN: the peer node is active too" in caplog.text
