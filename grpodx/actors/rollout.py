"""The rollout worker as a Ray actor: a thin async shell over :class:`grpodx.rollout.RolloutWorker`.

With ``engine.kind: simulated`` it holds a :class:`grpodx.simulated_rollout.SimulatedRolloutHost`
instead (same calls), and the process never imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

import pyarrow as pa
import ray

from grpodx.actors.sim import RemoteJudge, RemotePatient
from grpodx.config import Config
from grpodx.rollout import Scenario

if TYPE_CHECKING:  # torch: a simulated rollout worker never imports it
    from grpodx.adapter_transport import PackedAdapter


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@ray.remote
class RolloutActor:
    def __init__(self, worker_id: str, config: Config, model_source: str, patient_handle, judge_handle):
        patient, judge = RemotePatient(patient_handle), RemoteJudge(judge_handle)
        if config.engine.kind == "simulated":
            from grpodx.simulated_rollout import SimulatedRolloutHost

            # Ray warns of any blocking get in an async actor; nothing can run before __init__ returns.
            with _quiet(logging.getLogger("ray._private.worker")):
                kb = ray.get(patient_handle.knowledge_base.remote())
            self.worker = SimulatedRolloutHost(worker_id, config, model_source, patient, judge, kb)
            # A simulated learner publishes its adapter's bytes as they are (grpodx.simulated_learner).
            self._receive = lambda adapter: adapter
            return
        import torch

        from grpodx.adapter_transport import unpack
        from grpodx.models import best_device
        from grpodx.rollout import RolloutWorker

        self._receive = unpack
        if config.ray.rollout_threads:
            torch.set_num_threads(config.ray.rollout_threads)
        self.worker = RolloutWorker(
            worker_id,
            config,
            model_source,
            patient,
            judge,
            device=best_device(config.ray.rollout_num_gpus),
        )

    async def run_group(self, scenario: Scenario) -> ray.ObjectRef:
        """The group's episodes, put in the object store here: the driver passes the reference on to the
        learner without reading the episodes (this worker owns them until the learner has taken them)."""
        return ray.put(await self.worker.run_group(scenario))

    async def run_groups(self, scenarios: list[Scenario]):
        return await self.worker.run_groups(scenarios)

    def busy_seconds(self) -> float:
        return self.worker.busy_seconds()

    async def evaluate(
        self, cases, adapter_version=None, temperature: float = 0.0, step: int = 0
    ) -> pa.RecordBatch:
        return await self.worker.evaluate(cases, adapter_version, temperature, step)

    def load_adapter(self, packed: PackedAdapter) -> int:
        """Serve the learner's published adapter (packed, see :mod:`grpodx.adapter_transport`: unpacked
        to views of the object store's buffer, no copy) as the newest version."""
        return self.worker.load_adapter(self._receive(packed))

    def adapter_versions(self) -> list[int]:
        return self.worker.adapter_versions()

    def node_id(self) -> str:
        """The Ray node this worker runs on (logs name it when a node leaves)."""
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The actor's process id (benchmarks read its memory and CPU time)."""
        return os.getpid()

    async def close(self) -> None:
        """Release the engine (vLLM's workers, adapter files) before the actor is killed."""
        await self.worker.close()
