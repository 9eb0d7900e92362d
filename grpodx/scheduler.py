"""Which group runs where, and when.

The scheduler owns the staleness gate (:mod:`grpodx.staleness`), the group ledger
(:mod:`grpodx.batches`), the groups in flight and the position of each group's case in the case
stream. It hands groups to the rollout pool's workers as the gate admits them, takes their results
back, re-dispatches the groups of a worker that is lost or hangs, and gives the orchestrator each
batch's groups in ticket order. It knows nothing of the learner: the orchestrator keeps the step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from grpodx.batches import BatchBook
from grpodx.config import Config
from grpodx.medical.cases import CaseSampler
from grpodx.rollout import Scenario
from grpodx.staleness import StalenessGate
from grpodx.worker_pool import WORKER_LOST_ERRORS, RolloutPool, WorkerSlot, rollout_bundle


def episodes_lost(answer) -> bool:
    """The learner could not read a group's episodes: the object (owned by the rollout worker that put it)
    died with its worker or node, directly or as the cause of the learner's task error."""
    cause = answer.cause if isinstance(answer, ray.exceptions.RayTaskError) else answer
    return isinstance(cause, ray.exceptions.ObjectLostError)


def group_id(step: int, index: int) -> str:
    """The id of the ``index``-th group of a step, as it appears in the trajectories."""
    return f"s{step:06d}-g{index:03d}"


@dataclass(frozen=True)
class GroupOutcome:
    """What came back for one dispatched group: a reference to its episodes (an Arrow RecordBatch in
    Ray's object store, which the driver never reads: the learner does), or the error that lost its
    worker."""

    ticket: int
    worker_id: str
    episodes: Any = None
    lost: BaseException | None = None


class Scheduler:
    def __init__(
        self,
        config: Config,
        pool: RolloutPool,
        sampler: CaseSampler,
        first_step: int,
        log: Callable[[str], None] = print,
    ):
        self.config = config
        self.pool = pool
        self.sampler = sampler
        self.gate = StalenessGate(config.train.max_staleness, config.train.batch_size)
        self.book = BatchBook(config.train.batch_size, first_step * config.train.batch_size)
        self.in_flight: dict[asyncio.Task, tuple[str, float]] = {}  # task -> (worker, dispatched at)
        self._log = log
        # The case stream position of the first ticket this run schedules (a resumed run starts
        # mid-stream); every later ticket's case is at the same offset from it.
        self._first_ticket, self._first_position = self.book.first_ticket, sampler.position
        self._last_ticket = config.train.max_steps * config.train.batch_size
        self._no_worker_since: float | None = None

    # ---- the case stream --------------------------------------------------------------------------
    def case_position(self, ticket: int) -> int:
        """Where ticket ``ticket``'s case sits in the case stream (a checkpoint stores it to resume)."""
        return self._first_position + ticket - self._first_ticket

    def scenario(self, ticket: int, published_version: int) -> Scenario:
        batch = self.gate.batch_of(ticket)
        index = ticket - batch * self.config.train.batch_size
        return Scenario(
            step=batch + 1,
            group_id=group_id(batch + 1, index),
            case=self.sampler.case_at(self.case_position(ticket)),
            num_generations=self.config.grpo.num_generations,
            min_adapter_version=published_version,
            seed=self.config.train.seed,
        )

    # ---- groups out and back ----------------------------------------------------------------------
    def dispatch(self, published_version: int) -> None:
        """Start every group the staleness gate admits while a ready worker has room; retries first."""
        while True:
            slot = self.pool.pick()
            if slot is None:
                return
            ticket = self.book.next_retry()
            if ticket is None:
                ticket = self.book.next_ticket
                if ticket >= self._last_ticket or not self.gate.may_start(ticket, published_version):
                    return
                self.book.on_new_ticket()
            scenario = self.scenario(ticket, published_version)
            self.book.on_group_dispatched(ticket, slot.worker_id)
            slot.groups_in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run_group(slot, ticket, scenario))
            self.in_flight[task] = (slot.worker_id, time.monotonic())

    async def _run_group(self, slot: WorkerSlot, ticket: int, scenario: Scenario) -> GroupOutcome:
        try:
            # A reference to the episodes, which the worker put in the object store: it goes to the
            # learner unread, so their bytes go from the worker's node to the learner's, not through here.
            episodes = await slot.handle.run_group.remote(scenario)
        except WORKER_LOST_ERRORS as exc:
            return GroupOutcome(ticket, slot.worker_id, lost=exc)
        finally:
            slot.groups_in_flight -= 1
        return GroupOutcome(ticket, slot.worker_id, episodes=episodes)

    def on_group_done(self, task: asyncio.Task) -> int | None:
        """Take one finished task back; returns the batch of a group that newly finished (None for a
        duplicate, or a group whose worker was lost and which goes out again)."""
        self.in_flight.pop(task)
        outcome: GroupOutcome = task.result()
        if outcome.lost is not None:
            self._log(
                f"rollout worker {outcome.worker_id} is gone ({type(outcome.lost).__name__}); re-dispatching"
            )
            self.pool.on_worker_lost(outcome.worker_id)
            self.book.on_group_failed(outcome.ticket)
            return None
        if self.book.on_group_finished(outcome.ticket, outcome.episodes):
            return self.gate.batch_of(outcome.ticket)
        return None

    def groups_of(self, batch: int) -> list[tuple[int, Any]]:
        """(ticket, episodes reference) of the finished groups of ``batch`` not handed over yet, in ticket
        order (see BatchBook)."""
        return self.book.hand_over(batch)

    def on_episodes_lost(self, ticket: int) -> None:
        """The learner could not read a group's episodes (their node left): the group goes out again."""
        self._log(f"the episodes of group {ticket} were lost before the learner read them; re-dispatching")
        self.book.on_result_lost(ticket)

    def close_batch(self, batch: int) -> dict[str, float]:
        """The ledger's and the pool's counts of a trained ``batch`` for the step's metrics; the ledger
        then forgets the batch."""
        book = self.book
        metrics = {
            "groups/lost": float(len(book.lost_in(batch))),
            "groups/retried_total": float(book.retried),
            "groups/duplicates_total": float(book.duplicates),
            "workers/ready": float(len(self.pool.ready_slots())),
            "workers/desired": float(self.pool.desired_count()),
        }
        book.forget(batch)
        return metrics

    def cancel(self) -> None:
        for task in self.in_flight:
            task.cancel()

    # ---- workers that stop answering --------------------------------------------------------------
    def replace_hung_workers(self) -> None:
        """A worker alive but silent (stopped, deadlocked) would hold its groups, and the run, forever.
        Past ``ray.group_timeout_s`` it is killed like a lost one: its calls then fail, its groups are
        re-dispatched once (grpodx.batches), and the pool starts a replacement."""
        timeout, now = self.config.ray.group_timeout_s, time.monotonic()
        hung = {worker for worker, started in self.in_flight.values() if now - started > timeout}
        for worker_id in sorted(hung & set(self.pool.slots)):
            self._log(f"rollout worker {worker_id} returned no group within {timeout:g} s; replacing it")
            self.pool.on_worker_lost(worker_id)

    def check_workers_alive(self) -> None:
        """Stop with a clear error when no rollout worker has been ready for too long."""
        if self.pool.ready_slots():
            self._no_worker_since = None
            return
        if self._no_worker_since is None:
            self._no_worker_since = time.monotonic()
        if time.monotonic() - self._no_worker_since > self.config.ray.worker_start_timeout_s:
            raise RuntimeError(
                f"no rollout worker has been ready for {self.config.ray.worker_start_timeout_s:.0f} s; "
                f"the cluster offers no {rollout_bundle(self.config)} bundle"
            )
