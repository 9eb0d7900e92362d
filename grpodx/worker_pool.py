"""The rollout workers of a run: how many there should be, which are ready, which are gone.

``ray.num_rollout_workers`` is either a number or ``auto``. With ``auto`` the pool keeps one worker per
``ray.rollout_resources`` bundle that the cluster's alive nodes offer, checked every
``ray.rescale_interval_s``: a rollout node that joins gets a worker (which loads the current adapter,
then takes groups), and a worker whose node leaves is dropped when its calls fail; the scheduler
re-dispatches its unfinished groups (:mod:`grpodx.batches`). With a number, a worker that dies is
replaced, and the replacement takes work once Ray finds it a place. The learner is not part of the
pool and is never moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from grpodx.config import Config

# Errors that mean "this worker is gone", as opposed to a bug inside it, which must stop the run.
WORKER_LOST_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.NodeDiedError,
)


def bundles_available(cluster_resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` the cluster's totals hold (0 when a resource is missing)."""
    wanted = {name: amount for name, amount in bundle.items() if amount > 0}
    if not wanted:
        raise ValueError("a rollout bundle must request at least one resource")
    return min(
        math.floor(cluster_resources.get(name, 0.0) / amount + 1e-9) for name, amount in wanted.items()
    )


def rollout_bundle(config: Config) -> dict[str, float]:
    bundle = dict(config.ray.rollout_resources)
    if config.ray.rollout_num_gpus:
        bundle["GPU"] = config.ray.rollout_num_gpus
    if config.ray.rollout_num_cpus:
        bundle["CPU"] = config.ray.rollout_num_cpus
    return bundle


@dataclass
class WorkerSlot:
    worker_id: str
    handle: Any
    ready: bool = False
    groups_in_flight: int = 0


@dataclass
class RolloutPool:
    """Rollout workers keyed by id; ``make_worker(worker_id)`` creates one actor (not waited for)."""

    config: Config
    make_worker: Callable[[str], Any]
    cluster_resources: Callable[[], dict[str, float]] = ray.cluster_resources
    slots: dict[str, WorkerSlot] = field(default_factory=dict)
    _starting: dict[str, asyncio.Task] = field(default_factory=dict)
    _created: int = 0
    _last_check: float = 0.0
    events: list[str] = field(default_factory=list)

    @property
    def max_groups_per_worker(self) -> int:
        return max(1, self.config.ray.episodes_per_worker // self.config.grpo.num_generations)

    def desired_count(self) -> int:
        wanted = self.config.ray.num_rollout_workers
        if wanted != "auto":
            return int(wanted)
        return bundles_available(self.cluster_resources(), rollout_bundle(self.config))

    def handles(self) -> list[Any]:
        """Every worker's actor handle, ready or starting."""
        return [slot.handle for slot in self.slots.values()]

    def ready_slots(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots.values() if slot.ready]

    def pick(self) -> WorkerSlot | None:
        """The ready worker with the fewest groups in flight, if any has room for one more."""
        candidates = [s for s in self.ready_slots() if s.groups_in_flight < self.max_groups_per_worker]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.groups_in_flight, s.worker_id))

    # ---- lifecycle --------------------------------------------------------------------------------
    def rescale(self, on_ready: Callable[[WorkerSlot], Any], force: bool = False) -> None:
        """Start workers up to the desired count; ``on_ready`` (a coroutine function) runs for each
        new worker once its actor is up, and must leave it serving the current adapter."""
        now = time.monotonic()
        if not force and now - self._last_check < self.config.ray.rescale_interval_s:
            return
        self._last_check = now
        desired = self.desired_count()
        # A node that left may still be counted for a moment after its worker failed; a replacement
        # started then waits for resources that will not come. Drop such waiting workers first.
        for slot in [s for s in self.slots.values() if not s.ready][: max(0, len(self.slots) - desired)]:
            self.on_worker_lost(slot.worker_id)
            self._last_check = now
        missing = desired - len(self.slots)
        for _ in range(max(0, missing)):
            worker_id = f"rollout-{self._created}"
            self._created += 1
            slot = WorkerSlot(worker_id, self.make_worker(worker_id))
            self.slots[worker_id] = slot
            self._starting[worker_id] = asyncio.get_running_loop().create_task(self._start(slot, on_ready))
            self.events.append(f"start {worker_id}")

    async def _start(self, slot: WorkerSlot, on_ready: Callable[[WorkerSlot], Any]) -> None:
        try:
            await slot.handle.adapter_versions.remote()
            await on_ready(slot)
        except WORKER_LOST_ERRORS:
            self.on_worker_lost(slot.worker_id)
            return
        finally:
            self._starting.pop(slot.worker_id, None)
        if slot.worker_id in self.slots:
            slot.ready = True
            self.events.append(f"ready {slot.worker_id}")

    def on_worker_lost(self, worker_id: str) -> None:
        slot = self.slots.pop(worker_id, None)
        if slot is None:
            return
        self.events.append(f"lost {worker_id}")
        task = self._starting.pop(worker_id, None)
        if task is not None:
            task.cancel()
        with contextlib.suppress(Exception):  # it may be gone already
            ray.kill(slot.handle, no_restart=True)
        # Look for a replacement (or a smaller cluster) at the next check, not after the interval.
        self._last_check = 0.0

    async def wait_ready(self, count: int, timeout_s: float, on_ready: Callable[[WorkerSlot], Any]) -> None:
        """Wait until ``count`` workers are ready, starting them as needed."""
        deadline = time.monotonic() + timeout_s
        while len(self.ready_slots()) < count:
            self.rescale(on_ready)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.ready_slots())} of {count} rollout workers started within "
                    f"{timeout_s:.0f} s; does the cluster offer {rollout_bundle(self.config)} per worker? "
                    "Lower ray.num_rollout_workers or add rollout nodes"
                )
            await asyncio.sleep(0.05)

    async def ask_all(self, call: Callable[[Any], Any]) -> list[tuple[WorkerSlot, Any]]:
        """``call(handle)`` on every ready worker at once: each slot with its answer, the exception it
        raised, or a TimeoutError after ``ray.group_timeout_s`` (a hung worker must not hold the step)."""
        slots = self.ready_slots()

        async def ask(slot: WorkerSlot):
            return await asyncio.wait_for(call(slot.handle), self.config.ray.group_timeout_s)

        answers = await asyncio.gather(*(ask(slot) for slot in slots), return_exceptions=True)
        return list(zip(slots, answers, strict=True))

    async def busy_seconds(self) -> dict[str, float]:
        """Seconds each ready worker has had an episode in flight (see RolloutWorker.busy_seconds)."""
        answers = await self.ask_all(lambda handle: handle.busy_seconds.remote())
        return {slot.worker_id: value for slot, value in answers if isinstance(value, float)}

    def shutdown_handles(self) -> list[Any]:
        for task in self._starting.values():
            task.cancel()
        return self.handles()
