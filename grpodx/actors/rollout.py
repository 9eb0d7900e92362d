"""The rollout worker as a Ray actor: a thin async shell over :class:`grpodx.rollout.RolloutWorker`."""

from __future__ import annotations

import pyarrow as pa
import ray
import torch

from grpodx.actors.sim import RemoteJudge, RemotePatient
from grpodx.config import Config
from grpodx.engines.base import AdapterWeights
from grpodx.models import best_device
from grpodx.rollout import RolloutWorker, Scenario


@ray.remote
class RolloutActor:
    def __init__(self, worker_id: str, config: Config, model_source: str, patient_handle, judge_handle):
        if config.ray.rollout_threads:
            torch.set_num_threads(config.ray.rollout_threads)
        self.worker = RolloutWorker(
            worker_id,
            config,
            model_source,
            RemotePatient(patient_handle),
            RemoteJudge(judge_handle),
            device=best_device(config.ray.rollout_num_gpus),
        )

    async def run_group(self, scenario: Scenario):
        return await self.worker.run_group(scenario)

    async def run_groups(self, scenarios: list[Scenario]):
        return await self.worker.run_groups(scenarios)

    def busy_seconds(self) -> float:
        return self.worker.busy_seconds()

    async def evaluate(
        self, cases, adapter_version=None, temperature: float = 0.0, step: int = 0
    ) -> pa.RecordBatch:
        return await self.worker.evaluate(cases, adapter_version, temperature, step)

    def load_adapter(self, adapter: AdapterWeights) -> int:
        return self.worker.load_adapter(adapter)

    def adapter_versions(self) -> list[int]:
        return self.worker.adapter_versions()

    def node_id(self) -> str:
        """The Ray node this worker runs on (logs name it when a node leaves)."""
        return ray.get_runtime_context().get_node_id()

    async def close(self) -> None:
        """Release the engine (vLLM's workers, adapter files) before the actor is killed."""
        await self.worker.engine.close()
