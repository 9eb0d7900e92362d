"""The learner as a Ray actor: a thin shell over :class:`grpodx.learner.Learner`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import torch

from grpodx.adapter_transport import pack
from grpodx.config import Config
from grpodx.data.sink import StepEpisodes
from grpodx.learner import Learner
from grpodx.simulated_learner import SimulatedLearner
from grpodx.staleness import StalenessGate


@ray.remote
class LearnerActor:
    def __init__(self, config: Config, model_source: str):
        # The episodes of the step in progress stay here, where they are trained (the driver only
        # passes references): written to Parquet and summarised at the end of each step.
        self.episodes = StepEpisodes(StalenessGate(config.train.max_staleness, config.train.batch_size))
        if config.engine.kind == "simulated":
            # No model, the time costs of one (benchmarks and tests at cluster scale).
            self.learner = SimulatedLearner(config)
            return
        if config.ray.learner_threads:
            torch.set_num_threads(config.ray.learner_threads)
        self.learner = Learner(config, model_source)

    def train_step(self, *batches) -> dict[str, float]:
        return self.learner.train_step(list(batches))

    def accumulate(self, *batches) -> dict[str, float]:
        for batch in batches:
            self.episodes.add(batch)
        return self.learner.accumulate(list(batches))

    def step(self) -> dict[str, float]:
        self.episodes.on_step()
        return self.learner.step()

    def close_step(self, run_dir, step: int) -> tuple[dict[str, float], str | None]:
        """Write the episodes of the step just taken to ``run_dir`` (trajectories/step-N.parquet); their
        metrics and failure report (see :class:`grpodx.data.sink.StepEpisodes`)."""
        return self.episodes.close(run_dir, step)

    def publish(self):
        """The current adapter, packed and put in the object store once for every rollout worker to
        fetch (see :mod:`grpodx.adapter_transport`): the parameters are copied straight into the buffer."""
        adapter = self.learner.adapter(copy=False)
        # A simulated learner's adapter is numpy bytes already: packed, it would take torch to every
        # simulated rollout worker (to unpack it), which must stay small.
        return ray.put(adapter if isinstance(self.learner, SimulatedLearner) else pack(adapter))

    def version(self) -> int:
        return self.learner.version

    def save_checkpoint(self, storage, rel: str, files: dict[str, str]) -> None:
        """Save locally, add the driver's ``files`` (its state), upload all at once to ``storage/rel``."""
        with tempfile.TemporaryDirectory(prefix="grpodx-checkpoint-") as tmp:
            self.learner.save(tmp)
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            storage.upload_dir(tmp, rel)

    def load_checkpoint(self, storage, rel: str) -> int:
        with tempfile.TemporaryDirectory(prefix="grpodx-checkpoint-") as tmp:
            storage.download_dir(rel, tmp)
            self.learner.load(tmp)
        return self.learner.version
