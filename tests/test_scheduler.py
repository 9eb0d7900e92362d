"""The scheduler on its own, with fake rollout workers: dispatch order, the staleness bound, and a
lost worker's group re-dispatched exactly once."""

from __future__ import annotations

import asyncio

import ray

from grpodx.config import load_config
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.scheduler import Scheduler, group_id
from grpodx.worker_pool import RolloutPool, WorkerSlot

KB = load_knowledge_base()


class FakeWorker:
    """Records the scenarios it gets; each finishes when the test says so, or fails like a lost actor."""

    def __init__(self, lost: bool = False):
        self.scenarios = []
        self.lost = lost
        self.run_group = self  # handle.run_group.remote(scenario)
        self.release = asyncio.Event()

    def remote(self, scenario):
        self.scenarios.append(scenario)

        async def run():
            if self.lost:
                raise ray.exceptions.RayActorError()
            await self.release.wait()
            return f"episodes of {scenario.group_id}"

        return run()


def _scheduler(workers: dict[str, FakeWorker], *overrides: str) -> Scheduler:
    config = load_config(
        None,
        [
            "train.batch_size=2",
            "train.max_steps=5",
            "train.max_staleness=1",
            "ray.num_rollout_workers=2",
            *overrides,
        ],
    )
    pool = RolloutPool(config, make_worker=lambda worker_id: None, cluster_resources=dict)
    for worker_id, worker in workers.items():
        pool.slots[worker_id] = WorkerSlot(worker_id, worker, ready=True)
    sampler = CaseSampler(KB, "train", 0)
    return Scheduler(config, pool, sampler, first_step=0, log=lambda message: None)


async def _settle(scheduler: Scheduler) -> list:
    done, _ = await asyncio.wait(set(scheduler.in_flight), timeout=1.0)
    return list(done)


def test_groups_go_out_in_ticket_order_within_the_staleness_bound():
    async def scenario():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        scheduler = _scheduler(workers)
        scheduler.dispatch(published_version=0)
        await asyncio.sleep(0)  # the group tasks reach their workers
        sent = sorted((s for w in workers.values() for s in w.scenarios), key=lambda s: s.group_id)
        # max_staleness 1: batches 0 and 1 (tickets 0..3) may start on version 0, batch 2 may not.
        assert [s.group_id for s in sent] == [group_id(1, 0), group_id(1, 1), group_id(2, 0), group_id(2, 1)]
        assert {s.min_adapter_version for s in sent} == {0}
        assert [s.case for s in sent] == [scheduler.sampler.case_at(i) for i in range(4)]
        assert len(workers["a"].scenarios) == len(workers["b"].scenarios) == 2  # the least busy first
        scheduler.dispatch(published_version=1)  # version 1 is out: batch 2 may start
        assert len(scheduler.in_flight) == 6
        scheduler.cancel()

    asyncio.run(scenario())


def test_a_lost_workers_group_goes_out_again_once_and_a_late_copy_is_dropped(monkeypatch):
    killed = []
    # The pool kills a lost worker's actor; a fake has none (and ray.kill would start Ray).
    monkeypatch.setattr("grpodx.worker_pool.ray.kill", lambda handle, no_restart: killed.append(handle))

    async def scenario():
        lost, healthy = FakeWorker(lost=True), FakeWorker()
        scheduler = _scheduler(
            {"lost": lost, "healthy": healthy}, "train.max_staleness=0", "train.batch_size=2"
        )
        scheduler.dispatch(published_version=0)
        await asyncio.sleep(0)
        assert len(lost.scenarios) == 1 and len(healthy.scenarios) == 1
        for task in await _settle(scheduler):
            assert scheduler.on_group_done(task) is None  # the lost one comes back as lost
        assert "lost" not in scheduler.pool.slots and killed == [lost]
        scheduler.dispatch(published_version=0)
        await asyncio.sleep(0)
        assert [s.group_id for s in healthy.scenarios] == [group_id(1, 0), group_id(1, 1)]
        healthy.release.set()
        finished = [scheduler.on_group_done(task) for task in await _settle(scheduler)]
        assert finished == [0, 0]
        assert scheduler.book.is_batch_complete(0)
        assert sorted(scheduler.groups_of(0)) == [(i, f"episodes of {group_id(1, i)}") for i in range(2)]
        assert scheduler.groups_of(0) == []  # handed over once
        assert scheduler.book.retried == 1
        # The lost worker's ticket answering late after all is a duplicate, not a second result.
        assert not scheduler.book.on_group_finished(0, "late copy") and scheduler.book.duplicates == 1
        # The episodes of group 1 are lost before the learner reads them (their node left): the group
        # goes out again, the batch waits for it, and its new episodes are handed over once.
        healthy.release.clear()
        scheduler.on_episodes_lost(1)
        assert not scheduler.book.is_batch_complete(0)
        scheduler.dispatch(published_version=0)
        await asyncio.sleep(0)
        assert healthy.scenarios[-1].group_id == group_id(1, 1)
        healthy.release.set()
        assert [scheduler.on_group_done(task) for task in await _settle(scheduler)] == [0]
        assert scheduler.groups_of(0) == [(1, f"episodes of {group_id(1, 1)}")]
        assert scheduler.book.retried == 2

    asyncio.run(scenario())


def test_the_case_stream_continues_where_a_resumed_run_left_off():
    sampler = CaseSampler(KB, "train", 0)
    sampler.load_state_dict({**sampler.state_dict(), "position": 10})
    config = load_config(None, ["train.batch_size=2", "train.max_steps=5"])
    pool = RolloutPool(config, make_worker=lambda worker_id: None, cluster_resources=dict)
    scheduler = Scheduler(config, pool, sampler, first_step=3, log=lambda message: None)
    assert scheduler.case_position(6) == 10 and scheduler.case_position(9) == 13
    assert scheduler.scenario(7, published_version=3).case == sampler.case_at(11)


def test_no_ray_was_started_by_these_tests():
    """Fakes only: a Ray started here would be left running for the next test module."""
    assert not ray.is_initialized()
