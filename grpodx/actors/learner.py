"""The learner as a Ray actor: a thin shell over :class:`grpodx.learner.Learner`."""

from __future__ import annotations

import tempfile
from pathlib import Path

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

    def accumulate(self, *batches) -> dict[str, float]:
        return self.learner.accumulate(list(batches))

    def step(self) -> dict[str, float]:
        return self.learner.step()

    def publish(self):
        """The current adapter, put in the object store once for every rollout worker to fetch."""
        return ray.put(self.learner.adapter())

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
