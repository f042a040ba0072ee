"""The copy queue's lazy re-prioritisation, where a stale heap entry could surface ahead of the live one:
a prefetch moved to a later need step, one moved earlier, one promoted to demand, one cancelled. Hand cases
whose answer is known, and a property with many moves against a queue re-sorted from scratch."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from offload.copy_queue import CANCELLED, CopyQueue


def drain(q: CopyQueue) -> list[int]:
    order = []
    while (job := q.peek()) is not None:
        q.pop(job)
        job.state = "running"
        order.append(job.key)
    return order


def test_a_prefetch_moved_later_goes_behind_the_ones_it_now_follows():
    q = CopyQueue()
    a = q.push(1, False, need_step=1, now_ns=0)
    q.push(2, False, need_step=5, now_ns=0)
    q.reprioritise(a, False, 9, 0)
    assert a.need_step == 9
    assert drain(q) == [2, 1]


def test_a_prefetch_moved_earlier_goes_ahead():
    q = CopyQueue()
    q.push(1, False, need_step=3, now_ns=0)
    b = q.push(2, False, need_step=7, now_ns=0)
    q.reprioritise(b, False, 2, 0)
    assert drain(q) == [2, 1]


def test_a_promoted_prefetch_goes_ahead_of_every_prefetch_and_keeps_its_arrival_among_demands():
    q = CopyQueue()
    q.push(1, False, need_step=0, now_ns=0)
    late = q.push(2, False, need_step=9, now_ns=0)
    q.push(3, True, need_step=4, now_ns=5)
    q.reprioritise(late, True, 4, now_ns=7)
    assert late.demand and late.used and late.demand_since_ns == 7 and late.queued_ns == 0
    assert drain(q) == [2, 3, 1]          # demand first; among demands of one step, the earlier arrival


def test_a_cancelled_job_never_surfaces_and_its_key_can_be_queued_again():
    q = CopyQueue()
    a = q.push(1, False, need_step=0, now_ns=0)
    q.push(2, False, need_step=4, now_ns=0)
    q.cancel(a)
    assert a.state == CANCELLED and len(q) == 1
    again = q.push(1, False, need_step=6, now_ns=0)
    assert drain(q) == [2, 1] and again.state == "running"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["push", "push", "move", "move", "move", "promote", "cancel", "pop"]),
                          st.integers(0, 5), st.integers(0, 12)), max_size=80))
def test_every_pop_is_the_most_urgent_live_job(ops):
    q = CopyQueue()
    for op, key, step in ops:
        job = q.queued.get(key)
        if op == "push" and job is None:
            q.push(key, demand=step % 4 == 0, need_step=step, now_ns=0)
        elif op == "move" and job is not None and not job.demand:
            q.reprioritise(job, False, step, 0)
        elif op == "promote" and job is not None:
            q.reprioritise(job, True, step, 0)
        elif op == "cancel" and job is not None:
            q.cancel(job)
        elif op == "pop":
            live = list(q.queued.values())
            got = q.peek()
            if not live:
                assert got is None
                continue
            assert got is min(live, key=lambda j: (not j.demand, j.need_step, j.seq))
            q.pop(got)
            got.state = "running"
    rest = sorted(q.queued.values(), key=lambda j: (not j.demand, j.need_step, j.seq))
    assert drain(q) == [j.key for j in rest]
