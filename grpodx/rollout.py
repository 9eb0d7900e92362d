"""The rollout worker: one generation engine, many concurrent episodes, groups of G on one case.

Every episode of a group shares the case card (and so the patient's answers); only the doctor's
sampling differs, through a per-episode seed. A group's episodes all start on the adapter version the
scheduler assigned to the group. The Ray actor in :mod:`grpodx.actors.rollout` is a thin shell over
this class, which tests drive directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from grpodx.config import Config
from grpodx.data.trajectory import EpisodeTag, to_record_batch
from grpodx.dialogue import ChatCodec
from grpodx.engines import create_engine
from grpodx.engines.base import AdapterWeights, GenerationEngine
from grpodx.env.episode import EpisodeResult, EpisodeRunner
from grpodx.env.judge import Judge
from grpodx.env.patient import Patient
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase, load_knowledge_base
from grpodx.staleness import StalenessGate

if TYPE_CHECKING:  # only for annotations: a simulated rollout worker never imports torch
    import torch


@dataclass(frozen=True)
class Scenario:
    """One GRPO group to roll out: G episodes of one case.

    ``min_adapter_version`` is the oldest version the group may start on: the worker starts it on the
    newest version it serves, waiting for ``min_adapter_version`` if that has not arrived yet.
    """

    step: int
    group_id: str
    case: CaseCard
    num_generations: int
    min_adapter_version: int
    seed: int


def episode_seed(base_seed: int, group_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{group_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RolloutWorker:
    def __init__(
        self,
        worker_id: str,
        config: Config,
        model_source: str,
        patient: Patient,
        judge: Judge,
        *,
        engine: GenerationEngine | None = None,
        device: str | torch.device = "cpu",
        chat: ChatCodec | None = None,
        kb: KnowledgeBase | None = None,
    ):
        self.worker_id = worker_id
        self.config = config
        self.engine = engine or create_engine(config, model_source, device, seed=config.train.seed)
        if chat is None:
            from transformers import AutoTokenizer

            chat = ChatCodec(AutoTokenizer.from_pretrained(model_source))
        self.chat = chat
        self.runner = EpisodeRunner(
            engine=self.engine,
            chat=self.chat,
            patient=patient,
            judge=judge,
            kb=kb or load_knowledge_base(),
            episode_config=config.episode,
            reward_config=config.reward,
        )
        self._slots = asyncio.Semaphore(config.ray.episodes_per_worker)
        self._gate = StalenessGate(config.train.max_staleness, config.train.batch_size)
        self._version_arrived: asyncio.Condition | None = None
        # Busy time (at least one episode in flight), for the generators' idle share.
        self._active = 0
        self._busy_since = 0.0
        self._busy_s = 0.0

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, adapter: AdapterWeights) -> int:
        """Serve ``adapter`` as the newest version; forget versions beyond the staleness window."""
        self.engine.load_adapter(adapter)
        oldest_in_use = self._gate.oldest_version_in_use(adapter.version)
        for version in self.engine.loaded_versions():
            if 0 < version < oldest_in_use:
                self.engine.unload_adapter(version)
        if self._version_arrived is not None:
            asyncio.get_running_loop().create_task(self._announce_version())
        return self.engine.latest_version

    async def _announce_version(self) -> None:
        async with self._version_arrived:
            self._version_arrived.notify_all()

    async def _wait_for_version(self, version: int, timeout_s: float = 600.0) -> None:
        if self.engine.latest_version >= version:
            return
        if self._version_arrived is None:
            self._version_arrived = asyncio.Condition()
        async with self._version_arrived:
            await asyncio.wait_for(
                self._version_arrived.wait_for(lambda: self.engine.latest_version >= version), timeout_s
            )

    def adapter_versions(self) -> list[int]:
        return self.engine.loaded_versions()

    # ---- rollouts -------------------------------------------------------------------------------
    async def _episode(
        self,
        case: CaseCard,
        version: int,
        seed: int | None,
        temperature: float | None,
        follow_new_versions: bool = False,
    ):
        async with self._slots:
            self._on_episode_started()
            try:
                newest = (lambda: self.engine.latest_version) if follow_new_versions else None
                return await self.runner.run(case, version, self.runner.sampling(seed, temperature), newest)
            finally:
                self._on_episode_finished()

    async def run_group(self, scenario: Scenario) -> pa.RecordBatch:
        """Roll out one group: G episodes of one case, all starting on the same (newest) version."""
        await self._wait_for_version(scenario.min_adapter_version)
        version = self.engine.latest_version
        follow = self.config.train.refresh_version_per_turn
        jobs, tags = [], []
        for index in range(scenario.num_generations):
            seed = episode_seed(scenario.seed, scenario.group_id, index)
            jobs.append(self._episode(scenario.case, version, seed, None, follow))
            tags.append(EpisodeTag(scenario.step, scenario.group_id, index, self.worker_id))
        results: list[EpisodeResult] = await asyncio.gather(*jobs)
        return to_record_batch(list(zip(tags, results, strict=True)))

    async def run_groups(self, scenarios: Sequence[Scenario]) -> pa.RecordBatch:
        """Roll out several groups concurrently; one Arrow row per episode, in scenario order."""
        batches = await asyncio.gather(*(self.run_group(scenario) for scenario in scenarios))
        if not batches:
            return to_record_batch([])
        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]

    # ---- utilisation ----------------------------------------------------------------------------
    def _on_episode_started(self) -> None:
        if self._active == 0:
            self._busy_since = time.perf_counter()
        self._active += 1

    def _on_episode_finished(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._busy_s += time.perf_counter() - self._busy_since

    def busy_seconds(self) -> float:
        """Seconds with at least one episode in flight since the worker started."""
        ongoing = time.perf_counter() - self._busy_since if self._active else 0.0
        return self._busy_s + ongoing

    async def evaluate(
        self,
        cases: Sequence[CaseCard],
        adapter_version: int | None = None,
        temperature: float = 0.0,
        step: int = 0,
    ) -> pa.RecordBatch:
        """One episode per case, as the same record as a training episode (group ``eval-<case>``,
        ``step`` the training step it evaluates); :func:`grpodx.evaluation.summarize` reads it."""
        version = self.engine.latest_version if adapter_version is None else adapter_version
        seeds = [episode_seed(0, case.case_id, 0) for case in cases]
        results = await asyncio.gather(
            *(
                self._episode(case, version, seed, temperature)
                for case, seed in zip(cases, seeds, strict=True)
            )
        )
        tags = [EpisodeTag(step, f"eval-{case.case_id}", 0, self.worker_id) for case in cases]
        return to_record_batch(list(zip(tags, results, strict=True)))

    async def close(self) -> None:
        """Release the engine (vLLM's workers, adapter files)."""
        await self.engine.close()
