"""Where a run's Ray comes from: the cluster at ``ray.address`` / ``RAY_ADDRESS``, or one of our own."""

from __future__ import annotations

import os

import ray

from grpodx.config import Config


def init_ray(config: Config, *, log_to_driver: bool = True, min_cpus: int = 0) -> bool:
    """Join the configured cluster or start a local one; False when Ray was already up (the caller
    then must not shut it down)."""
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    workers = 1 if config.ray.num_rollout_workers == "auto" else config.ray.num_rollout_workers
    needed = workers * config.ray.rollout_num_cpus + config.ray.learner_num_cpus + 1
    # Logical CPUs only schedule actors; the tiny run's actors mostly wait on each other, so a local
    # run may declare more than the machine has. address="local": a cluster of our own, never the
    # last one `ray start` left on this machine (which ray.init would otherwise join, and which
    # shutting down would stop).
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999), min_cpus),
        include_dashboard=config.ray.dashboard,
        log_to_driver=log_to_driver,
        configure_logging=False,
    )
    return True
