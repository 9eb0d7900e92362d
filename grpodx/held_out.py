"""The held-out evaluation of a training run: before, every ``train.eval_every`` steps, and after.

The same ``train.eval_cases`` held-out cases with the same per-case seeds each time, at the training
temperature (``train.eval_temperature``) and, with ``train.eval_greedy``, greedily too, where a gain
cannot come from sharpening the sampling alone. Before and after are compared case by case
(:func:`grpodx.evaluation.paired_difference`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pyarrow as pa

from grpodx.config import Config
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.evaluation import format_paired, format_summary, paired_difference, summarize
from grpodx.medical.cases import CaseSampler
from grpodx.metrics import MetricsLogger
from grpodx.storage import RunStorage
from grpodx.worker_pool import RolloutPool


class HeldOutEvaluation:
    def __init__(
        self,
        config: Config,
        sampler: CaseSampler,
        num_conditions: int,
        storage: RunStorage,
        log: Callable[[str], None],
    ):
        self.count = config.train.eval_cases
        self.every = config.train.eval_every
        # (metrics prefix, temperature) of each evaluation mode
        self.modes = [("eval", config.train.eval_temperature)]
        if config.train.eval_greedy and config.train.eval_temperature > 0:
            self.modes.append(("eval_greedy", 0.0))
        self._sampler = sampler
        self._num_conditions = num_conditions
        self._storage = storage
        self._log = log
        self._before: dict[str, pa.Table] = {}  # episodes per mode, for the paired differences
        # {mode}_before, {mode}_after, {mode}_paired: the summary.json of the run
        self.results: dict[str, dict] = {}

    async def episodes(self, pool: RolloutPool, step: int, temperature: float) -> pa.Table:
        """Episodes of the adapter the workers serve on the held-out cases (fixed seeds), as trajectory
        records; the cases are split over the ready workers."""
        cases = self._sampler.held_out(self.count)
        slots = pool.ready_slots()
        parts = await asyncio.gather(
            *(
                slot.handle.evaluate.remote(cases[i :: len(slots)], None, temperature, step)
                for i, slot in enumerate(slots)
                if cases[i :: len(slots)]
            )
        )
        return pa.Table.from_batches(parts, schema=TRAJECTORY_SCHEMA)

    async def before(self, pool: RolloutPool, logger: MetricsLogger, step: int) -> None:
        for prefix, temperature in self.modes if self.count else []:
            self._before[prefix] = await self.episodes(pool, step, temperature)
            self.results[f"{prefix}_before"] = self._record(
                logger, step, prefix, temperature, self._before[prefix], "before"
            )

    async def during(self, pool: RolloutPool, logger: MetricsLogger, step: int) -> None:
        """After step ``step`` when ``train.eval_every`` says so."""
        if not (self.every and self.count and step % self.every == 0):
            return
        for prefix, temperature in self.modes:
            episodes = await self.episodes(pool, step, temperature)
            self._record(logger, step, prefix, temperature, episodes, f"step-{step:06d}")

    async def after(self, pool: RolloutPool, logger: MetricsLogger, step: int) -> None:
        for prefix, temperature in self.modes if self.count else []:
            after = await self.episodes(pool, step, temperature)
            self.results[f"{prefix}_after"] = self._record(logger, step, prefix, temperature, after, "after")
            if prefix in self._before:
                paired = paired_difference(after, self._before[prefix])
                logger.log(step, {f"{prefix}_paired/{k}": v for k, v in paired.items()})
                self._log(format_paired(paired, f"after minus before (T = {temperature:g})"))
                self.results[f"{prefix}_paired"] = paired

    def _record(
        self, logger: MetricsLogger, step: int, prefix: str, temperature: float, episodes: pa.Table, when: str
    ) -> dict:
        """Summary of an evaluation in the metrics (and on the console unless mid-run); its episodes in
        ``evaluation/<when>[-greedy].parquet`` (``when``: before, after, or step-N)."""
        summary = summarize(episodes, num_conditions=self._num_conditions)
        logger.log(step, {f"{prefix}/{k}": v for k, v in summary.items()})
        suffix = "-greedy" if prefix == "eval_greedy" else ""
        self._storage.write_parquet(f"evaluation/{when}{suffix}.parquet", episodes)
        if not when.startswith("step-"):
            self._log(format_summary(summary, f"{when} training (T = {temperature:g})"))
        return summary
