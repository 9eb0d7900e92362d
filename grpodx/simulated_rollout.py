"""The rollout side of a simulated cluster: cheap processes, one or several simulated GPUs each.

A rollout actor with ``engine.kind: simulated`` holds a :class:`SimulatedRolloutHost`: one real
:class:`~grpodx.rollout.RolloutWorker` (episodes, patient and judge calls, reward, Arrow batches) per
simulated engine, ``simulation.engines_per_worker`` of them, behind the calls the orchestrator makes
of one worker. The process stays small so that many fit on one machine: no torch, no transformers
(the tokenizer through ``tokenizers`` alone), and a knowledge base taken from the patient worker,
already validated, instead of loading the ICD-10-CM tables (about 170 MB) to validate its own.

With ``engines_per_worker`` above 1 the orchestrator sees one worker per process, not per engine:
the calls it makes per worker (adapter pushes, busy-time queries, the pool's choice of worker) then
happen once per process, which is less than a cluster of that many GPUs would cost it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pyarrow as pa

from grpodx.config import Config
from grpodx.engines.base import AdapterWeights
from grpodx.engines.simulated import SimulatedEngine, light_chat_codec
from grpodx.env.judge import Judge
from grpodx.env.patient import Patient
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase
from grpodx.rollout import RolloutWorker, Scenario


class SimulatedRolloutHost:
    """``simulation.engines_per_worker`` rollout workers on simulated engines, seen as one worker.

    A group goes to the engine with the fewest groups in flight; an adapter is loaded by every engine
    (each copies its bytes, as each GPU would); busy time is the engines' mean, so the orchestrator's
    generator idle share stays a share.
    """

    def __init__(
        self,
        worker_id: str,
        config: Config,
        model_source: str,
        patient: Patient,
        judge: Judge,
        kb: KnowledgeBase,
    ):
        count = config.simulation.engines_per_worker
        chat = light_chat_codec(model_source)
        # Each engine's share of the worker's episodes (checked in the config to hold a group).
        ray_share = config.ray.model_copy(
            update={"episodes_per_worker": config.ray.episodes_per_worker // count}
        )
        engine_config = config.model_copy(update={"ray": ray_share})
        self.workers: list[RolloutWorker] = []
        for index in range(count):
            engine = SimulatedEngine(
                config.simulation,
                chat,
                max_batch_size=config.engine.max_batch_size,
                seed=config.train.seed + index,
            )
            name = worker_id if count == 1 else f"{worker_id}.{index}"
            self.workers.append(
                RolloutWorker(
                    name, engine_config, model_source, patient, judge, engine=engine, chat=chat, kb=kb
                )
            )
        self._groups = [0] * count

    async def run_group(self, scenario: Scenario) -> pa.RecordBatch:
        index = min(range(len(self.workers)), key=lambda i: self._groups[i])
        self._groups[index] += 1
        try:
            return await self.workers[index].run_group(scenario)
        finally:
            self._groups[index] -= 1

    async def run_groups(self, scenarios: Sequence[Scenario]) -> pa.RecordBatch:
        batches = await asyncio.gather(*(self.run_group(scenario) for scenario in scenarios))
        if not batches:
            return await self.workers[0].run_groups([])
        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]

    def load_adapter(self, adapter: AdapterWeights) -> int:
        versions = {worker.load_adapter(adapter) for worker in self.workers}
        return min(versions)

    def adapter_versions(self) -> list[int]:
        return self.workers[0].adapter_versions()

    def busy_seconds(self) -> float:
        return sum(worker.busy_seconds() for worker in self.workers) / len(self.workers)

    async def evaluate(
        self,
        cases: Sequence[CaseCard],
        adapter_version: int | None = None,
        temperature: float = 0.0,
        step: int = 0,
    ) -> pa.RecordBatch:
        count = len(self.workers)
        parts = await asyncio.gather(
            *(
                worker.evaluate(cases[i::count], adapter_version, temperature, step)
                for i, worker in enumerate(self.workers)
            )
        )
        table = pa.Table.from_batches(parts)
        return table.combine_chunks().to_batches()[0] if table.num_rows else parts[0]

    async def close(self) -> None:
        await asyncio.gather(*(worker.close() for worker in self.workers))
