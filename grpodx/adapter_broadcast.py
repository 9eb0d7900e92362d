"""The adapter every rollout worker serves: the learner publishes a version once, the workers load it.

``served_version`` is what the staleness gate reads: a group may start once the version it needs is
served by every ready worker. A worker that joins mid-run loads the newest version before it takes a
group; one that fails or hangs during a push is dropped, and the pool replaces it.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from grpodx.worker_pool import WORKER_LOST_ERRORS, RolloutPool, WorkerSlot


class AdapterBroadcast:
    def __init__(self, pool: RolloutPool, log: Callable[[str], None]):
        self._pool = pool
        self._log = log
        self.newest: tuple[int, ray.ObjectRef | None] = (0, None)  # (version, the learner's published ref)
        self.served_version = 0

    def restore(self, version: int, adapter_ref: ray.ObjectRef | None) -> None:
        """A resumed run: the workers start serving ``version`` as they come up."""
        self.newest = (version, adapter_ref)
        self.served_version = version

    async def on_worker_ready(self, slot: WorkerSlot) -> None:
        """A new worker serves the newest adapter before it takes a group (a push may land meanwhile)."""
        while True:
            version, adapter_ref = self.newest
            if adapter_ref is not None:
                await slot.handle.load_adapter.remote(adapter_ref)
            if self.newest[0] == version:
                return

    async def publish(self, version: int, adapter_ref: ray.ObjectRef) -> None:
        """Every ready worker loads ``version``; then groups that need it may start."""
        self.newest = (version, adapter_ref)
        for slot, answer in await self._pool.ask_all(lambda handle: handle.load_adapter.remote(adapter_ref)):
            if isinstance(answer, (*WORKER_LOST_ERRORS, TimeoutError)):
                if isinstance(answer, TimeoutError):
                    self._log(f"rollout worker {slot.worker_id} did not take the new adapter; replacing it")
                self._pool.on_worker_lost(slot.worker_id)
            elif isinstance(answer, BaseException):
                raise answer
            elif answer != version:
                raise RuntimeError(
                    f"adapter push failed: {slot.worker_id} serves version {answer}, learner is at {version}"
                )
        self.served_version = version
