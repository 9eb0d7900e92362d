"""The actors of one training run: the learner, the patient and judge workers, the rollout pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from pydantic import SecretStr

from grpodx.config import Config
from grpodx.worker_pool import RolloutPool, rollout_bundle


def start_learner(config: Config, model_source: str):
    """The learner actor on the resources ``ray.learner_*`` asks for (not waited for)."""
    from grpodx.actors.learner import LearnerActor

    return LearnerActor.options(
        num_cpus=config.ray.learner_num_cpus,
        num_gpus=config.ray.learner_num_gpus,
        resources=config.ray.learner_resources or None,
    ).remote(config, model_source)


def start_rollout_worker(config: Config, model_source: str, worker_id: str, patient, judge):
    """One rollout actor on the resources ``ray.rollout_*`` asks for (not waited for)."""
    from grpodx.actors.rollout import RolloutActor

    return RolloutActor.options(
        num_cpus=config.ray.rollout_num_cpus,
        num_gpus=config.ray.rollout_num_gpus,
        resources=config.ray.rollout_resources or None,
    ).remote(worker_id, config, model_source, patient, judge)


@dataclass
class RunActors:
    learner: Any
    patient: Any
    judge: Any
    pool: RolloutPool

    @classmethod
    def start(cls, config: Config, model_source: str, api_key: SecretStr | None) -> RunActors:
        """Start the learner and the patient/judge workers and wait for the learner's model; rollout
        workers are started by the pool (``RolloutPool.rescale``) on the resources they ask for."""
        from grpodx.actors.sim import start_sim_workers

        patient, judge = start_sim_workers(config, api_key)
        learner = start_learner(config, model_source)

        def make_worker(worker_id: str):
            return start_rollout_worker(config, model_source, worker_id, patient, judge)

        if config.ray.request_rollout_workers:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[rollout_bundle(config)] * config.ray.request_rollout_workers)
        try:
            ray.get(learner.version.remote())
        except BaseException:
            for actor in (learner, patient, judge):
                ray.kill(actor)
            raise
        return cls(learner, patient, judge, RolloutPool(config, make_worker))

    def shutdown(self) -> None:
        """Close every actor (30 s for API clients to finish), then kill it."""
        workers = self.pool.shutdown_handles()
        sims = [self.patient, self.judge]
        closing = [actor.close.remote() for actor in [*workers, *sims]]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in [*workers, self.learner, *sims]:
            ray.kill(actor)
