"""The training loop: actors, scheduling, weight sync, checkpoints, metrics.

One step:
  1. draw ``batch_size`` cases; each becomes a group of ``num_generations`` episodes on the current
     adapter version, spread over the rollout workers;
  2. the workers return Arrow record batches; they go to Parquet and to the learner;
  3. the learner makes one GRPO update and publishes its adapter once to the object store;
  4. every rollout worker loads it as version N+1 before the next step starts (on-policy).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
from pydantic import SecretStr
from tqdm import tqdm

from grpodx.config import Config, ConfigError, dump_config
from grpodx.data.sink import ParquetSink
from grpodx.evaluation import format_summary, summarize
from grpodx.medical.cases import CaseSampler, eval_cases
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.metrics import MetricsLogger, rollout_metrics
from grpodx.models import doctor_source
from grpodx.rollout import Scenario

CHECKPOINT_STATE = "orchestrator.json"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict | None
    eval_after: dict | None


def new_run_dir(config: Config) -> Path:
    name = config.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.train.run_dir) / name
    suffix = 1
    while run_dir.exists():
        run_dir = Path(config.train.run_dir) / f"{name}-{suffix}"
        suffix += 1
    return run_dir


def init_ray(config: Config) -> None:
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    needed = config.ray.num_rollout_workers * config.ray.rollout_num_cpus + config.ray.learner_num_cpus + 1
    # Logical CPUs only schedule actors; the tiny run's actors mostly wait on each other, so a local
    # run may declare more than the machine has.
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=config.ray.dashboard,
        log_to_driver=True,
        configure_logging=False,
    )


class Orchestrator:
    def __init__(
        self,
        config: Config,
        *,
        load_checkpoint: str | None = None,
        progress: bool = True,
        api_key: SecretStr | None = None,
    ):
        self.config = config
        self.progress = progress
        self._api_key = api_key
        self.kb = load_knowledge_base()
        self.sampler = CaseSampler(self.kb, "train", config.train.seed)
        self.step = 0
        self.checkpoint = Path(load_checkpoint) if load_checkpoint else None
        if self.checkpoint is not None:
            if not (self.checkpoint / CHECKPOINT_STATE).is_file():
                raise ConfigError(
                    f"--load-checkpoint {self.checkpoint}: no {CHECKPOINT_STATE} there; "
                    "pass a directory such as runs/<run>/checkpoints/step-000100"
                )
            self.run_dir = self.checkpoint.parents[1]
        else:
            self.run_dir = new_run_dir(config)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup ----------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        from grpodx.actors.learner import LearnerActor
        from grpodx.actors.rollout import RolloutActor
        from grpodx.actors.sim import start_sim_workers

        config = self.config
        # Build (or find) the doctor before any actor starts, so the actors only load it.
        self.model_source = doctor_source(config, progress=self.progress)
        self.patient_worker, self.judge_worker = start_sim_workers(config, self._api_key)
        self.learner = LearnerActor.options(
            num_cpus=config.ray.learner_num_cpus, num_gpus=config.ray.learner_num_gpus
        ).remote(config, self.model_source)
        self.workers = [
            RolloutActor.options(
                num_cpus=config.ray.rollout_num_cpus, num_gpus=config.ray.rollout_num_gpus
            ).remote(f"rollout-{i}", config, self.model_source, self.patient_worker, self.judge_worker)
            for i in range(config.ray.num_rollout_workers)
        ]
        ray.get([w.adapter_versions.remote() for w in self.workers] + [self.learner.version.remote()])

    def _restore(self) -> None:
        state = json.loads((self.checkpoint / CHECKPOINT_STATE).read_text())
        version = ray.get(self.learner.load.remote(str(self.checkpoint)))
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if version != self.step:
            raise RuntimeError(
                f"checkpoint {self.checkpoint} holds adapter version {version} at step {self.step}"
            )
        if version > 0:
            self._push_adapter()

    # ---- the loop -------------------------------------------------------------------------------
    def _push_adapter(self) -> float:
        started = time.perf_counter()
        adapter_ref = ray.get(self.learner.publish.remote())
        versions = ray.get([w.load_adapter.remote(adapter_ref) for w in self.workers])
        expected = ray.get(self.learner.version.remote())
        if any(v != expected for v in versions):
            raise RuntimeError(
                f"adapter push failed: workers serve versions {versions}, learner is at {expected}"
            )
        return time.perf_counter() - started

    def _scenarios(self, version: int) -> list[Scenario]:
        config = self.config
        return [
            Scenario(
                step=self.step,
                group_id=f"s{self.step:06d}-g{index:03d}",
                case=self.sampler.sample(),
                num_generations=config.grpo.num_generations,
                adapter_version=version,
                seed=config.train.seed,
            )
            for index in range(config.train.batch_size)
        ]

    def _rollout(self, scenarios: list[Scenario]) -> pa.Table:
        workers = self.workers
        chunks = [scenarios[i :: len(workers)] for i in range(len(workers))]
        refs = [w.run_groups.remote(chunk) for w, chunk in zip(workers, chunks, strict=True) if chunk]
        return pa.Table.from_batches(ray.get(refs))

    def evaluate(self, count: int) -> dict:
        cases = eval_cases(self.kb, count)
        workers = self.workers
        refs = [
            w.evaluate.remote(cases[i :: len(workers)], None, self.config.train.eval_temperature)
            for i, w in enumerate(workers)
            if cases[i :: len(workers)]
        ]
        episodes = [e for part in ray.get(refs) for e in part]
        return summarize(episodes, num_conditions=len(self.kb.conditions))

    def _save_checkpoint(self) -> Path:
        directory = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        staging = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        ray.get(self.learner.save.remote(str(staging)))
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "adapter_version": self.step}
        (staging / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        return directory

    def train(self) -> TrainResult:
        config = self.config
        init_ray(config)
        (self.run_dir / "config.yaml").write_text(dump_config(config))
        self._log(f"run directory: {self.run_dir}")
        self._start_actors()
        if self.checkpoint is not None:
            self._restore()
            self._log(f"resumed from {self.checkpoint} at step {self.step}")
        sink = ParquetSink(self.run_dir)
        logger = MetricsLogger(self.run_dir)
        eval_before = None
        if config.train.eval_cases and self.step == 0:
            eval_before = self.evaluate(config.train.eval_cases)
            logger.log(0, {f"eval/{k}": v for k, v in eval_before.items()})
            self._log(format_summary(eval_before, "before training"))
        bar = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc="GRPO",
            unit="step",
            disable=not self.progress,
        )
        try:
            while self.step < config.train.max_steps:
                metrics = self._train_one_step(sink)
                logger.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}"
                )
                if self.step % config.train.save_steps == 0 or self.step == config.train.max_steps:
                    self._save_checkpoint()
                if config.train.eval_every and self.step % config.train.eval_every == 0:
                    summary = self.evaluate(config.train.eval_cases)
                    logger.log(self.step, {f"eval/{k}": v for k, v in summary.items()})
        finally:
            bar.close()
        eval_after = None
        if config.train.eval_cases:
            eval_after = self.evaluate(config.train.eval_cases)
            logger.log(self.step, {f"eval/{k}": v for k, v in eval_after.items()})
            self._log(format_summary(eval_after, "after training"))
        logger.close()
        result = {"steps": self.step, "eval_before": eval_before, "eval_after": eval_after}
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=2))
        self._log(f"run directory: {self.run_dir}")
        return TrainResult(self.run_dir, self.step, eval_before, eval_after)

    def _train_one_step(self, sink: ParquetSink) -> dict[str, float]:
        started = time.perf_counter()
        version = self.step  # on-policy: the workers serve the adapter of the last step
        scenarios = self._scenarios(version)
        table = self._rollout(scenarios)
        rollout_s = time.perf_counter() - started
        sink.write(self.step + 1, table)
        learner_metrics = ray.get(self.learner.train_step.remote(*table.to_batches()))
        self.step += 1
        push_s = self._push_adapter()
        metrics = rollout_metrics(table)
        metrics.update(learner_metrics)
        metrics.update(self._api_usage())
        metrics.update(
            {
                "time/rollout": rollout_s,
                "time/weight_push": push_s,
                "time/step": time.perf_counter() - started,
                "policy/version": float(self.step),
            }
        )
        return metrics

    def _api_usage(self) -> dict[str, float]:
        """Token usage, failures and cost estimate of an API-backed patient/judge: this step and in total."""
        metrics: dict[str, float] = {}
        for role, worker in (("patient", self.patient_worker), ("judge", self.judge_worker)):
            step, total = ray.get([worker.usage_delta.remote(), worker.usage_total.remote()])
            metrics.update({f"api/{role}/{key}": value for key, value in step.items()})
            if total:
                metrics[f"api/{role}/total_cost_usd"] = total["cost_usd"]
                metrics[f"api/{role}/total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        return metrics

    def _log(self, message: str) -> None:
        tqdm.write(message)

    def shutdown(self) -> None:
        sims = [getattr(self, "patient_worker", None), getattr(self, "judge_worker", None)]
        closing = [w.close.remote() for w in [*getattr(self, "workers", []), *sims] if w is not None]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in [*getattr(self, "workers", []), getattr(self, "learner", None), *sims]:
            if actor is not None:
                ray.kill(actor)
