"""Group commit: commands that arrive together share one kernel transaction, and each is
still answered as if it had been applied alone (engine.on_datagrams, with the fake kernel).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.engine import RETRY_INTERVAL, Engine
from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import Counters, KernelView, StreamKey
from lrkp_tsl.latching import Policy
from tests.fakes import FakeKernel, MemoryStore
from tests.unit.test_engine import PEER, agree, lrkproxy, make, s_command, stored_agree

CALLS = [f"c{n}" for n in range(4)]


def batch(engine: Engine, datagrams: list[bytes], now: float = 0.0) -> list[bytes | None]:
    """Datagrams read together from one socket (several Kamailio workers' commands)."""
    datagrams_ = [(d, PEER, "10.0.0.5:5060", True) for d in datagrams]
    return lrkproxy(engine).on_datagrams(datagrams_, now)


def four_calls(verb: str = "S", first_cookie: int = 1) -> list[bytes]:
    return [
        s_command(call_id, 20000 + 100 * n, verb=verb, cookie=f"{n}_{first_cookie}")
        for n, call_id in enumerate(CALLS)
    ]


def test_concurrent_sets_are_committed_together_and_each_relayed_after_its_ok() -> None:
    engine, kernel, store = make(Policy.STRICT)
    datagrams = four_calls()
    replies = batch(engine, datagrams)
    assert replies == [d + b"OK" for d in datagrams]
    assert kernel.batches == [CALLS]  # one transaction for all four
    assert engine.stats["kernel.group_commits"] == 1
    for call_id in CALLS:  # each OK'd call is in the kernel
        call = engine.table.get(call_id)
        assert call is not None and call.view().flows <= kernel.holds().flows
    agree(engine, kernel)
    stored_agree(engine, store)
    # ... and the deletions, together too.
    deletes = four_calls("D", 2)
    assert batch(engine, deletes, 1.0) == [d + b"OK" for d in deletes]
    assert kernel.batches[-1] == CALLS and kernel.holds() == KernelView()


def test_a_kernel_refusal_in_a_batch_refuses_only_its_command() -> None:
    engine, kernel, store = make(Policy.STRICT)
    kernel.fail_call("c2")
    datagrams = four_calls()
    replies = batch(engine, datagrams)
    for n, (datagram, reply) in enumerate(zip(datagrams, replies, strict=True)):
        if n == 2:
            assert reply is not None and reply.startswith(b"2_1 E kernel ")
        else:
            assert reply == datagram + b"OK"
    assert kernel.batches == [CALLS]  # the others were not delayed into a second batch
    assert set(engine.table.get(c) is not None for c in ("c0", "c1", "c3")) == {True}
    assert "c2" not in engine.table and "c2" not in store.records
    assert "c2" in engine.suspect  # resynchronised on the retry timer
    agree(engine, kernel)
    stored_agree(engine, store)
    # The refusal is not cached: Kamailio's retransmission applies it once the kernel takes it.
    kernel.clear_failures()
    assert batch(engine, [datagrams[2]], 2.0) == [datagrams[2] + b"OK"]
    engine.on_timer(2.0 + RETRY_INTERVAL)
    assert not engine.suspect
    agree(engine, kernel)
    stored_agree(engine, store)


def test_an_admission_refusal_or_a_store_failure_in_a_batch_refuses_only_its_command() -> None:
    engine, kernel, store = make(Policy.STRICT)
    foreign = s_command("bad", 20400, cookie="9_1").replace(b"10.0.0.10", b"10.9.9.9")
    datagrams = four_calls()
    datagrams.insert(1, foreign)
    store.fail_next("put")  # the first write of the group: c0's
    replies = batch(engine, datagrams)
    assert replies[0] is not None and replies[0].startswith(b"0_1 E store ")
    assert replies[1] is not None and b" E " in replies[1]  # not one of this node's IPs
    assert replies[2:] == [d + b"OK" for d in datagrams[2:]]
    assert kernel.batches == [["c1", "c2", "c3"]]
    agree(engine, kernel)
    stored_agree(engine, store)


def test_commands_on_the_same_call_or_ports_in_one_batch_apply_in_order() -> None:
    engine, kernel, _store = make(Policy.STRICT)
    s1 = s_command("c1", 20000, cookie="1_1")
    d1 = s_command("c1", 20000, verb="D", cookie="1_2")
    s2 = s_command("c2", 20100, cookie="2_1")
    taker = s_command("c3", 20100, cookie="3_1")  # takes c2's ports: newest wins
    replies = batch(engine, [s1, d1, s2, taker])
    assert replies == [s1 + b"OK", d1 + b"OK", s2 + b"OK", taker + b"OK"]
    assert "c1" not in engine.table and "c2" not in engine.table and "c3" in engine.table
    agree(engine, kernel)


# -- a batch answers and ends exactly as the same commands one by one ---------------------------

command = st.tuples(
    st.sampled_from(["S", "D"]),
    st.integers(0, 3),  # which call
    st.integers(0, 2),  # which variant of its addresses
    st.integers(0, 3),  # which relay ports (calls may take each other's)
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(command, min_size=1, max_size=8), max_size=6),
    st.sets(st.sampled_from(CALLS), max_size=2),
)
def test_a_batch_is_equivalent_to_its_commands_one_by_one(
    batches: list[list[tuple[str, int, int, int]]], failing: set[str]
) -> None:
    together, kernel_t, store_t = make()
    alone, kernel_a, store_a = make()
    for call_id in failing:  # the kernel refuses these calls, in a batch or not
        kernel_t.fail_call(call_id)
        kernel_a.fail_call(call_id)
    now = 0.0
    cookie = 0
    for group in batches:
        now += 0.1
        datagrams = []
        for verb, which, variant, ports in group:
            cookie += 1
            datagrams.append(s_command(f"c{which}", 20000 + 100 * ports,
                                       f"192.168.1.{20 + variant}:4000", verb=verb,
                                       cookie=f"1_{cookie}"))  # fmt: skip
        replies = batch(together, datagrams, now)
        assert replies == [
            lrkproxy(alone).on_datagram(d, PEER, "10.0.0.5:5060", now) for d in datagrams
        ]
        assert kernel_t.holds() == kernel_a.holds()
        assert store_t.records == store_a.records
        assert set(together.suspect) == set(alone.suspect)
    for engine, kernel, store in ((together, kernel_t, store_t), (alone, kernel_a, store_a)):
        kernel.clear_failures()
        engine.on_timer(now + RETRY_INTERVAL)
        assert not engine.suspect
        agree(engine, kernel)
        stored_agree(engine, store)


def test_fake_kernel_batch_refuses_only_the_failing_change() -> None:
    kernel, _store = FakeKernel(), MemoryStore()
    kernel.fail_next("change")
    results = kernel.change_many(
        [("a", KernelView(), KernelView(), ()), ("b", KernelView(), KernelView(), ())]
    )
    assert isinstance(results[0], KernelError) and results[1] is None


def test_ending_calls_are_read_at_once_and_only_entries_that_exist_are_deleted() -> None:
    """The `D`s of a group: one conntrack read for all (their summaries); a call whose keys
    found no entry has nothing to delete (its elements are gone: none can appear)."""
    engine, kernel, _store = make(Policy.STRICT)
    assert batch(engine, four_calls()) == [d + b"OK" for d in four_calls()]
    keys = {}
    for call_id in CALLS:
        call = engine.table.get(call_id)
        assert call is not None
        keys[call_id] = call.view().keys()
    live = sorted(keys["c1"])[0]
    kernel.entries[live] = 50.0
    kernel.counted[live] = Counters(10, 1720, 9, 1548)
    kernel.forgotten.clear()
    reads = kernel.calls["streams"]
    deletes = four_calls("D", 2)
    assert batch(engine, deletes, 1.0) == [d + b"OK" for d in deletes]
    assert kernel.calls["streams"] == reads + 1
    assert kernel.forgotten == [keys["c1"]]  # the whole call whose read found an entry
    assert not kernel.entries


def test_an_unread_ending_call_has_its_entries_deleted_all_the_same() -> None:
    engine, kernel, _store = make(Policy.STRICT)
    batch(engine, four_calls())
    expected: set[StreamKey] = set()
    for call_id in CALLS:
        call = engine.table.get(call_id)
        assert call is not None
        expected |= call.view().keys()
    kernel.forgotten.clear()
    kernel.fail_next("streams")
    deletes = four_calls("D", 2)
    assert batch(engine, deletes, 1.0) == [d + b"OK" for d in deletes]
    assert engine.stats["error.conntrack"] == 1
    assert set().union(*kernel.forgotten) == expected


def test_with_send_each_ok_goes_once_its_change_is_committed_and_a_refusal_with_the_batch() -> None:
    """The server's `send`: each `OK` leaves when the group's store and kernel commit is
    done, before the table takes the calls; a refused command's error comes back with the
    batch; nothing is answered twice; a resend gets the cached `OK`."""
    engine, kernel, store = make(Policy.STRICT)
    kernel.fail_call("c2")
    datagrams = four_calls()
    sent: list[tuple[int, bytes, bool, bool]] = []

    def send(index: int, reply: bytes) -> None:
        call_id = CALLS[index]
        sent.append((index, reply, call_id in store.records, engine.table.get(call_id) is None))

    datagrams_ = [(d, PEER, "10.0.0.5:5060", True) for d in datagrams]
    replies = lrkproxy(engine).on_datagrams(datagrams_, 0.0, send)
    assert [(index, reply) for index, reply, _, _ in sent] == [
        (n, datagrams[n] + b"OK") for n in (0, 1, 3)
    ]
    assert all(stored and not_yet_in_table for _, _, stored, not_yet_in_table in sent)
    assert replies[:2] == [None, None] and replies[3] is None
    assert replies[2] is not None and replies[2].startswith(b"2_1 E kernel ")
    assert batch(engine, [datagrams[0]]) == [datagrams[0] + b"OK"]  # from the cache
    assert engine.stats["retransmissions"] == 1
    agree(engine, kernel)


def test_an_early_ok_follows_the_deletion_of_the_moved_flows_conntrack_entries() -> None:
    """A re-INVITE's `S` moves the callee: conntrack would keep NAT'ing the caller's next
    packet to the old callee while the old entry lives (NAT binds at a flow's first packet),
    so those entries are deleted before the `OK` goes. A `D`'s are deleted after it: the
    call's packets already stop with its elements."""
    engine, kernel, _store = make(Policy.STRICT)
    first = s_command("moved", 20000, callee="10.0.1.31:6000", cookie="1_1")
    assert batch(engine, [first]) == [first + b"OK"]
    forgotten_at_send: list[int] = []

    def send(_index: int, _reply: bytes) -> None:
        forgotten_at_send.append(len(kernel.forgotten))

    before = len(kernel.forgotten)
    moved = s_command("moved", 20000, callee="10.0.1.31:6600", cookie="1_2")
    lrkproxy(engine).on_datagrams([(moved, PEER, "k", True)], 1.0, send)
    assert forgotten_at_send == [before + 1]  # the old entries went before the OK
    moved_keys = kernel.forgotten[before]
    assert moved_keys and len(kernel.forgotten) == before + 1  # and not a second time
    call = engine.table.get("moved")
    assert call is not None
    assert {flow.sender for flow in call.view().flows} & {key[0] for key in moved_keys}
    agree(engine, kernel)
    for flow in call.view().flows:  # its streams have entries in conntrack
        kernel.entries[(flow.sender, flow.relay)] = 1.5
    before = len(kernel.forgotten)
    end = s_command("moved", 20000, callee="10.0.1.31:6600", verb="D", cookie="1_3")
    forgotten_at_send.clear()
    lrkproxy(engine).on_datagrams([(end, PEER, "k", True)], 2.0, send)
    assert forgotten_at_send == [before]  # nothing deleted before the OK ...
    assert len(kernel.forgotten) == before + 1 and kernel.entries == {}  # ... all after it
