"""The learner as a Ray actor: a thin shell over :class:`grpodx.learner.Learner`."""

from __future__ import annotations

import ray
import torch

from grpodx.config import Config
from grpodx.learner import Learner


@ray.remote
class LearnerActor:
    def __init__(self, config: Config, model_source: str):
        if config.ray.learner_threads:
            torch.set_num_threads(config.ray.learner_threads)
        self.learner = Learner(config, model_source)

    def train_step(self, *batches) -> dict[str, float]:
        return self.learner.train_step(list(batches))

    def publish(self):
        """The current adapter, put in the object store once for every rollout worker to fetch."""
        return ray.put(self.learner.adapter())

    def version(self) -> int:
        return self.learner.version

    def device(self) -> str:
        return str(self.learner.device)

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> int:
        self.learner.load(directory)
        return self.learner.version
