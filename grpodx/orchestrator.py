"""The training loop: the step, from a complete batch to a published adapter.

The loop streams. Groups (one case, G episodes) are dispatched to rollout workers as soon as the
staleness gate (:mod:`grpodx.staleness`) admits them and a worker has room (:mod:`grpodx.scheduler`);
each finished group goes straight to the learner, which accumulates its gradient; when every group of
batch ``s`` is in, the learner steps, publishes its adapter once (``ray.put``) and every rollout worker
loads it as version ``s + 1`` (:mod:`grpodx.adapter_broadcast`). With ``train.max_staleness = 0`` this
is the synchronous on-policy loop; with ``k > 0`` the workers generate up to ``k`` batches ahead while
the learner trains. Groups whose worker dies are re-dispatched, and none is trained twice
(:mod:`grpodx.batches`); ``ray.num_rollout_workers: auto`` follows rollout nodes that join and leave
(:mod:`grpodx.worker_pool`). Why a run stops early: :mod:`grpodx.stopping`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from pydantic import SecretStr
from tqdm import tqdm

from grpodx.actors.run_actors import RunActors
from grpodx.actors.sim import api_usage, ask_api_usage
from grpodx.adapter_broadcast import AdapterBroadcast
from grpodx.config import Config, dump_config
from grpodx.held_out import HeldOutEvaluation
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.metrics import MetricsLogger, StepTimer
from grpodx.preflight import CHECKPOINT_STATE, adapter_shapes, check_api_backends, resolve_model
from grpodx.ray_cluster import init_ray
from grpodx.report import write_run_figures
from grpodx.run_directory import new_run_dir, open_checkpoint
from grpodx.scheduler import Scheduler, episodes_lost
from grpodx.stopping import CtrlC, FailureBreaker, TrainingInterrupted, cannot_write, checkpoint_dir
from grpodx.storage import RunLock


def _shown(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


@dataclass
class TrainResult:
    run_dir: Path | str
    steps: int
    eval_before: dict | None
    eval_after: dict | None
    # After minus before on the same held-out cases and seeds (see evaluation.paired_difference).
    eval_paired: dict | None = None


class Orchestrator:
    def __init__(
        self,
        config: Config,
        *,
        load_checkpoint: str | None = None,
        progress: bool = True,
        api_key: SecretStr | None = None,
        on_step_end: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.config = config
        self.progress = progress
        self._api_key = api_key
        # Called after every step with (step, metrics); tests use it to change the cluster mid-run.
        self._on_step_end = on_step_end
        kb = load_knowledge_base()
        self.sampler = CaseSampler.for_config(kb, config)
        # Everything that can be wrong with the settings is found here, before Ray starts or a run
        # directory is made (see grpodx.preflight).
        self.model_source, model_config = resolve_model(config, progress=progress)
        expected_adapter = adapter_shapes(config, model_config)
        if "openai" in (config.patient.kind, config.judge.kind):
            asyncio.run(check_api_backends(config, api_key))
        # The step is also the learner's adapter version: step N's adapter is version N.
        self.step = 0
        self.checkpoint: str | None = None  # the checkpoint this run resumes from
        self._resume_state: dict | None = None
        if load_checkpoint:
            self.storage, self.checkpoint, self._resume_state = open_checkpoint(
                load_checkpoint, config, expected_adapter
            )
        else:
            self.storage = new_run_dir(config)
        self.evaluation = HeldOutEvaluation(config, self.sampler, len(kb.conditions), self.storage, self._log)
        self.breaker = FailureBreaker(config.train.max_failed_share, config.train.max_failed_steps)
        self.ctrl_c = CtrlC(self._log)
        self._saved: str | None = None  # the newest checkpoint this run wrote
        self._lock: RunLock | None = None
        # Started by train(): the actors, then the adapter broadcast and the scheduler over their pool.
        self.actors: RunActors | None = None
        self.adapter: AdapterBroadcast | None = None
        self.scheduler: Scheduler | None = None
        self._timer: StepTimer | None = None
        # The batch being accumulated: its groups go to the learner as they finish; (ticket, the
        # learner's answer) of those sent and not yet checked.
        self._accumulating = 0
        self._accumulate_refs: list[tuple[int, ray.ObjectRef]] = []

    def train(self) -> TrainResult:
        return asyncio.run(self._train())

    async def _train(self) -> TrainResult:
        config = self.config
        self.storage.makedirs()
        self._lock = RunLock(self.storage)
        if self._resume_state is None:
            config_file = "config.yaml"
        else:  # a resumed run keeps the first run's config.yaml and records its own beside it
            config_file = f"config-resumed-at-step-{self._resume_state['step']:06d}.yaml"
        init_ray(config)
        self.storage.write_text(config_file, dump_config(config))
        self._log(f"run directory: {self.storage.display()}")
        self.actors = RunActors.start(config, self.model_source, self._api_key)
        pool = self.actors.pool
        self.adapter = AdapterBroadcast(pool, self._log)
        if self.checkpoint is not None:
            await self._restore()
            self._log(f"resumed from {self.checkpoint} at step {self.step}")
        wanted = config.ray.num_rollout_workers
        await pool.wait_ready(
            1 if wanted == "auto" else int(wanted),
            config.ray.worker_start_timeout_s,
            self.adapter.on_worker_ready,
        )
        logger = MetricsLogger(self.storage, resumed_at=self.step if self.checkpoint else None)
        if self.step == 0:
            await self.evaluation.before(pool, logger, self.step)
        bar = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc="GRPO",
            unit="step",
            disable=not self.progress,
        )
        try:
            with self.ctrl_c:
                await self._train_loop(logger, bar)
        finally:
            bar.close()
        if self.ctrl_c.requested:
            await self._stop_interrupted(logger)
        await self.evaluation.after(pool, logger, self.step)
        logger.close()
        results = self.evaluation.results
        # The sampled evaluation's keys are always there (null when not run); the greedy ones when run.
        main = {key: results.get(key) for key in ("eval_before", "eval_after", "eval_paired")}
        self.storage.write_text("summary.json", json.dumps({"steps": self.step, **main, **results}, indent=2))
        write_run_figures(self.storage, self._log)
        self._log(f"run directory: {self.storage.display()}")
        return TrainResult(
            self.run_dir, self.step, main["eval_before"], main["eval_after"], main["eval_paired"]
        )

    async def _restore(self) -> None:
        state = self._resume_state
        version = await self.actors.learner.load_checkpoint.remote(self.storage, self.checkpoint)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if version != self.step:
            raise RuntimeError(
                f"checkpoint {self.checkpoint} holds adapter version {version} at step {self.step}"
            )
        self.adapter.restore(version, await self.actors.learner.publish.remote() if version > 0 else None)
        self._saved = self.checkpoint

    # ---- the loop -------------------------------------------------------------------------------
    async def _train_loop(self, logger: MetricsLogger, bar: tqdm) -> None:
        config, pool = self.config, self.actors.pool
        self.scheduler = scheduler = Scheduler(config, pool, self.sampler, self.step, self._log)
        self._accumulating = self.step
        step_task: asyncio.Task | None = None
        self._timer = StepTimer(time.perf_counter(), await pool.busy_seconds())
        while self.step < config.train.max_steps or step_task is not None:
            if self.ctrl_c.requested and step_task is None:
                break  # a step being finished is finished; groups in flight are redone on resume
            pool.rescale(self.adapter.on_worker_ready)
            if not self.ctrl_c.requested:
                scheduler.dispatch(self.adapter.served_version)
            batch_complete = (
                not self.ctrl_c.requested
                and self.step < config.train.max_steps
                and scheduler.book.is_batch_complete(self._accumulating)
            )
            if step_task is None and batch_complete:
                step_task = asyncio.get_running_loop().create_task(self._finish_step(logger, bar))
                continue
            waiting = set(scheduler.in_flight) | ({step_task} if step_task else set())
            scheduler.check_workers_alive()
            scheduler.replace_hung_workers()
            if not waiting:
                await asyncio.sleep(0.05)
                continue
            done, _ = await asyncio.wait(
                waiting, timeout=config.ray.rescale_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is step_task:
                    step_task = None
                    task.result()  # re-raise a failed step here
                    continue
                if scheduler.on_group_done(task) == self._accumulating:
                    self._send_to_learner(self._accumulating)
        scheduler.cancel()

    def _send_to_learner(self, batch: int) -> None:
        for ticket, episodes in self.scheduler.groups_of(batch):
            self._accumulate_refs.append((ticket, self.actors.learner.accumulate.remote(episodes)))

    async def _all_accumulated(self) -> bool:
        """Wait for the learner to take every group sent; False when some group's episodes were lost on
        the way (the node holding them left): those groups go out again, and the batch waits for them."""
        sent, self._accumulate_refs = self._accumulate_refs, []
        answers = await asyncio.gather(*(ref for _, ref in sent), return_exceptions=True)
        lost = [ticket for (ticket, _), answer in zip(sent, answers, strict=True) if episodes_lost(answer)]
        for answer in answers:
            if isinstance(answer, BaseException) and not episodes_lost(answer):
                raise answer
        for ticket in lost:
            self.scheduler.on_episodes_lost(ticket)
        return not lost

    async def _finish_step(self, logger: MetricsLogger, bar: tqdm) -> None:
        """Batch ``self._accumulating`` is complete: step, publish, push, log, checkpoint."""
        config, batch, learner = self.config, self._accumulating, self.actors.learner
        self._send_to_learner(batch)
        if not await self._all_accumulated():
            return  # the loop finishes the step once the lost groups are redone
        # The step's API usage is what was spent until now: the next batch's calls, which may start
        # right after the push below, belong to the next step (exactly so with max_staleness 0).
        usage = ask_api_usage(self.actors.patient, self.actors.judge)
        # The learner runs its calls in the order sent: the publish goes before the next batch's groups,
        # which would otherwise hold the new adapter back behind their backward passes.
        step_ref, publish_ref = learner.step.remote(), learner.publish.remote()
        self._accumulating = batch + 1
        self._send_to_learner(batch + 1)
        learner_metrics = await step_ref
        push_started = time.perf_counter()
        await self.adapter.publish(batch + 1, await publish_ref)
        push_s = time.perf_counter() - push_started
        self.step = batch + 1
        if not self.ctrl_c.requested:  # the groups the new version admits start now, not after the logging
            self.scheduler.dispatch(self.adapter.served_version)

        # The learner writes the episodes it trained on to Parquet and summarises them.
        rollout_metrics, failures = await self._writing(
            f"the trajectories of step {self.step}", learner.close_step.remote(self.storage, self.step)
        )
        metrics = {**rollout_metrics, **learner_metrics, **self.scheduler.close_batch(batch)}
        metrics.update(await api_usage(usage))
        busy = await self.actors.pool.busy_seconds()
        metrics.update(self._timer.lap(time.perf_counter(), busy, learner_metrics["learner/seconds"], push_s))
        metrics["policy/version"] = float(self.step)
        try:
            logger.log(self.step, metrics)
        except OSError as exc:
            raise self._cannot_write(f"the metrics of step {self.step}", exc) from None
        bar.update(1)
        bar.set_postfix(reward=_shown(metrics["reward/mean"], 3), acc=_shown(metrics["reward/accuracy"], 2))
        if failures:
            self._log(f"step {self.step}: {failures}")
        saved = None
        if self.step % config.train.save_steps == 0 or self.step == config.train.max_steps:
            saved = await self._save_checkpoint(logger)
        if self.breaker.on_step(metrics.get("episodes/failed_share", 0.0)):
            saved = saved or await self._save_checkpoint(logger)
            logger.close()
            raise self.breaker.halted(self.step, failures, self.storage.display(saved))
        await self.evaluation.during(self.actors.pool, logger, self.step)
        if self._on_step_end is not None:
            self._on_step_end(self.step, metrics)

    # ---- checkpoints and the end of a run ---------------------------------------------------------
    async def _save_checkpoint(self, logger: MetricsLogger) -> str:
        rel = checkpoint_dir(self.step)
        # The next run starts at the first group of batch `step`: its case is this sampler position.
        position = self.scheduler.case_position(self.step * self.config.train.batch_size)
        sampler = {**self.sampler.state_dict(), "position": position}
        state = {"step": self.step, "sampler": sampler, "adapter_version": self.step}
        # The learner writes the checkpoint where it runs, straight to the run's storage.
        files = {CHECKPOINT_STATE: json.dumps(state, indent=2)}

        async def save() -> None:
            await self.actors.learner.save_checkpoint.remote(self.storage, rel, files)
            logger.sync()

        await self._writing(f"checkpoint {rel}", save())
        self._saved = rel
        return rel

    async def _stop_interrupted(self, logger: MetricsLogger) -> None:
        if self._saved != checkpoint_dir(self.step):
            await self._save_checkpoint(logger)
        logger.close()
        checkpoint = self.storage.display(self._saved)
        raise TrainingInterrupted(
            f"interrupted at step {self.step}; resume with --load-checkpoint {checkpoint}"
        )

    def _cannot_write(self, what: str, error: OSError) -> Exception:
        return cannot_write(self.storage, self.step, self._saved, what, error)

    async def _writing(self, what: str, work: Awaitable):
        """``work``'s result; an OSError while it writes to the run storage, here or inside an actor (the
        learner writes checkpoints and trajectories where it runs), stops the run (see cannot_write)."""
        try:
            return await work
        except (OSError, ray.exceptions.RayTaskError) as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            if not isinstance(cause, OSError):
                raise
            raise self._cannot_write(what, cause) from None

    @property
    def run_dir(self) -> Path | str:
        """The run directory: a Path when local, else its (credential-free) URI."""
        return self.storage.local_path if self.storage.is_local else self.storage.display()

    def _log(self, message: str) -> None:
        tqdm.write(message)

    def shutdown(self) -> None:
        if self.actors is not None:
            self.actors.shutdown()
        if self._lock is not None:
            self._lock.release()
