"""The streaming pipeline's rules, without Ray: the staleness gate, the ticket book, worker counts.

A simulation drives the gate and the book the way the orchestrator does, with groups finishing in a
random order, and checks the one property that matters: no group is trained more than
``max_staleness`` versions after the version it started on, and every group is trained exactly once.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from grpodx.batches import BatchBook
from grpodx.metrics import staleness_metrics
from grpodx.staleness import StalenessGate
from grpodx.worker_pool import bundles_available


def test_gate_formula_by_hand():
    gate = StalenessGate(max_staleness=1, batch_size=4)
    assert gate.batch_of(0) == 0 and gate.batch_of(7) == 1 and gate.batch_of(8) == 2
    # Version 0 published: batches 0 and 1 may start (tickets 0..7), not batch 2.
    assert gate.may_start(7, 0) and not gate.may_start(8, 0)
    assert gate.may_start(11, 1) and not gate.may_start(12, 1)
    assert gate.staleness(gate.batch_of(7), 0) == 1 and gate.staleness(gate.batch_of(3), 0) == 0
    # Once version 5 is out, groups may still run on 4 (started one batch ahead), not on 3.
    assert gate.oldest_version_in_use(5) == 4


def test_on_policy_gate_admits_exactly_one_batch_per_version():
    gate = StalenessGate(max_staleness=0, batch_size=3)
    assert [t for t in range(12) if gate.may_start(t, 2)] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert not gate.may_start(9, 2)


def test_gate_rejects_bad_settings():
    with pytest.raises(ValueError):
        StalenessGate(max_staleness=-1, batch_size=2)
    with pytest.raises(ValueError):
        StalenessGate(max_staleness=0, batch_size=0)


def _simulate(max_staleness: int, batch_size: int, steps: int, seed: int, fail_rate: float = 0.0):
    """Drive gate + book like the orchestrator: dispatch what the gate admits, finish groups in random
    order (some fail and are retried), step when a batch is complete. Returns the trained groups."""
    rng = random.Random(seed)
    gate = StalenessGate(max_staleness, batch_size)
    book = BatchBook(batch_size, max_attempts=3)
    published, running, trained = 0, {}, []
    last_ticket = steps * batch_size
    while published < steps:
        # Dispatch: retries first, then new tickets while the gate admits them.
        while (ticket := book.next_retry()) is not None:
            book.on_group_dispatched(ticket, "w")
            running[ticket] = published
        while book.next_ticket < last_ticket and gate.may_start(book.next_ticket, published):
            ticket = book.on_new_ticket()
            book.on_group_dispatched(ticket, "w")
            running[ticket] = published
        if book.is_batch_complete(published):
            for ticket, start_version in book.hand_over(published):
                trained.append((ticket, start_version, published))
            book.forget(published)
            published += 1
            continue
        ticket = rng.choice(sorted(running))
        start_version = running.pop(ticket)
        if rng.random() < fail_rate:
            book.on_group_failed(ticket)
        else:
            book.on_group_finished(ticket, start_version)
            if rng.random() < fail_rate:  # a "dead" worker answers after all: a duplicate
                book.on_group_finished(ticket, start_version)
    return trained, book


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
@pytest.mark.parametrize("seed", range(5))
def test_no_group_is_trained_beyond_the_bound(max_staleness, seed):
    trained, book = _simulate(max_staleness, batch_size=4, steps=30, seed=seed, fail_rate=0.1)
    lags = [learner_version - start for _, start, learner_version in trained]
    assert all(0 <= lag <= max_staleness for lag in lags)
    tickets = [ticket for ticket, _, _ in trained]
    assert len(tickets) == len(set(tickets))  # none trained twice
    lost = 30 * 4 - len(tickets)
    assert lost >= 0
    if max_staleness:
        # The pipeline really runs ahead: some groups start before the version that trains them.
        assert max(lags) == max_staleness


def test_on_policy_simulation_trains_every_group_on_its_own_version():
    trained, _ = _simulate(0, batch_size=3, steps=10, seed=1)
    assert sorted(t for t, _, _ in trained) == list(range(30))
    assert all(start == version for _, start, version in trained)


def test_book_retries_then_loses_and_drops_duplicates():
    book = BatchBook(batch_size=2, max_attempts=2)
    first, second = book.on_new_ticket(), book.on_new_ticket()
    book.on_group_dispatched(first, "a")
    assert book.on_group_failed(first) is True  # back in the queue
    assert book.next_retry() == first
    book.on_group_dispatched(first, "b")
    assert book.on_group_failed(first) is False  # second attempt failed: lost
    assert book.lost_in(0) == [first]
    book.on_group_dispatched(second, "a")
    assert book.on_group_finished(second, "result") is True
    assert book.on_group_finished(second, "again") is False
    assert book.duplicates == 1
    assert book.is_batch_complete(0)
    assert book.hand_over(0) == [(second, "result")]
    assert book.hand_over(0) == []  # handed over once
    book.forget(0)
    assert book.on_group_finished(second, "late") is False  # a result after training is dropped
    assert book.duplicates == 2


def test_a_retried_group_that_answers_late_is_not_dispatched_again():
    book = BatchBook(batch_size=1)
    ticket = book.on_new_ticket()
    book.on_group_dispatched(ticket, "a")
    book.on_group_failed(ticket)
    book.on_group_finished(ticket, "late but fine")
    assert book.next_retry() is None
    assert book.is_batch_complete(0)


def test_book_must_start_at_a_batch_boundary():
    with pytest.raises(ValueError):
        BatchBook(batch_size=4, first_ticket=6)
    assert BatchBook(batch_size=4, first_ticket=8).on_new_ticket() == 8


def test_bundles_available():
    assert bundles_available({"CPU": 8, "rollout": 3}, {"rollout": 1}) == 3
    assert bundles_available({"CPU": 8, "rollout": 3}, {"rollout": 1, "CPU": 4}) == 2
    assert bundles_available({"CPU": 8}, {"rollout": 1}) == 0
    assert bundles_available({"GPU": 2.0, "rollout": 4}, {"rollout": 1, "GPU": 0.5}) == 4
    with pytest.raises(ValueError):
        bundles_available({"CPU": 1}, {})


def test_staleness_metrics_by_hand():
    table = pa.table({"policy_version": [3, 2, 2, 3], "turn_versions": [[3, 3], [2, 3], [2], [3]]})
    metrics = staleness_metrics(table, StalenessGate(max_staleness=2, batch_size=4), batch=3)
    assert metrics["staleness/mean"] == pytest.approx(0.5)
    assert metrics["staleness/max"] == 1
    assert metrics["staleness/share_0"] == 0.5 and metrics["staleness/share_1"] == 0.5
    assert metrics["staleness/share_2"] == 0.0
    assert metrics["staleness/turn_mean"] == pytest.approx(2 / 6)
