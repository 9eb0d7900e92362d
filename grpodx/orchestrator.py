"""The training loop: actors, scheduling, weight sync, checkpoints, metrics.

The loop streams. Groups (one case, G episodes) are dispatched to rollout workers as soon as the
staleness gate (:mod:`grpodx.staleness`) admits them and a worker has room; each finished group goes
straight to the learner, which accumulates its gradient; when every group of batch ``s`` is in, the
learner steps, publishes its adapter once (``ray.put``) and every rollout worker loads it as version
``s + 1``. With ``train.max_staleness = 0`` this is the synchronous on-policy loop; with ``k > 0`` the
workers generate up to ``k`` batches ahead while the learner trains. Groups whose worker dies are
re-dispatched, and none is trained twice (:mod:`grpodx.batches`); ``ray.num_rollout_workers: auto``
follows rollout nodes that join and leave (:mod:`grpodx.worker_pool`).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
from pydantic import SecretStr
from tqdm import tqdm

from grpodx.config import Config, ConfigError, dump_config
from grpodx.data.sink import ParquetSink
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.evaluation import format_paired, format_summary, paired_difference, summarize
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.metrics import MetricsLogger, failure_report, rollout_metrics
from grpodx.preflight import (
    CHECKPOINT_STATE,
    adapter_shapes,
    check_api_backends,
    check_checkpoint,
    open_run_root,
    resolve_model,
)
from grpodx.ray_cluster import init_ray
from grpodx.scheduler import Scheduler
from grpodx.storage import RunLock, RunStorage
from grpodx.worker_pool import WORKER_LOST_ERRORS, RolloutPool, WorkerSlot, rollout_bundle


class TrainingHalted(RuntimeError):
    """The run stopped itself (its circuit breaker) after saving a checkpoint; the message says why."""


class TrainingInterrupted(TrainingHalted):
    """Ctrl-C stopped the run after a step, with a checkpoint."""


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


def new_run_dir(config: Config) -> RunStorage:
    """A fresh run directory under ``train.run_dir`` (a local path or a URI such as s3://bucket/runs)."""
    root = open_run_root(config.train.run_dir)
    name = config.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    candidate, suffix = name, 1
    while root.exists(candidate):
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return root.child(candidate)


def checkpoint_location(checkpoint: str) -> tuple[RunStorage, str]:
    """``<run>/checkpoints/step-N`` (a path or URI) as (the run's storage, the path below it)."""
    text = str(checkpoint).rstrip("/")
    if "://" in text:
        parts = text.rsplit("/", 2)
        run_root, rel = parts[0], "/".join(parts[1:])
    else:
        path = Path(text).resolve()
        if len(path.parents) < 2:  # "/" or "/x": no run directory above it
            raise ConfigError(
                f"--load-checkpoint {checkpoint}: not a checkpoint directory; pass one such as "
                "runs/<run>/checkpoints/step-000100"
            )
        run_root, rel = str(path.parents[1]), f"{path.parent.name}/{path.name}"
    try:
        return RunStorage(run_root), rel
    except ValueError as exc:  # a URI pyarrow cannot open
        raise ConfigError(f"--load-checkpoint {checkpoint}: {exc}") from None


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
        self.kb = load_knowledge_base()
        self.sampler = CaseSampler.for_config(self.kb, config)
        self.step = 0
        self.checkpoint: str | None = None
        # Everything that can be wrong with the settings is found here, before Ray starts or a run
        # directory is made (see grpodx.preflight).
        self.model_source, model_config = resolve_model(config, progress=progress)
        expected_adapter = adapter_shapes(config, model_config)
        if "openai" in (config.patient.kind, config.judge.kind):
            asyncio.run(check_api_backends(config, api_key))
        self._resume_state: dict | None = None
        if load_checkpoint:
            self.storage, self.checkpoint = checkpoint_location(load_checkpoint)
            complete = self.storage.exists(f"{self.checkpoint}/{CHECKPOINT_STATE}") and (
                self.storage.is_local or self.storage.is_complete_dir(self.checkpoint)
            )
            if not complete:
                raise ConfigError(
                    f"--load-checkpoint {load_checkpoint}: no complete checkpoint there; "
                    "pass a directory such as runs/<run>/checkpoints/step-000100"
                )
            self._resume_state = check_checkpoint(self.storage, self.checkpoint, config, expected_adapter)
        else:
            self.storage = new_run_dir(config)
        self.published_version = 0
        self._adapter: tuple[int, ray.ObjectRef | None] = (0, None)  # newest (version, adapter ref)
        self._lock: RunLock | None = None
        self._stop_requested = False  # by Ctrl-C
        self._watching_ctrl_c = False
        self._saved: str | None = None  # the newest checkpoint this run wrote
        # Started by train(): the actors, the worker pool and the scheduler.
        self.learner = self.patient_worker = self.judge_worker = None
        self.pool: RolloutPool | None = None
        self.scheduler: Scheduler | None = None
        # The step being accumulated: its groups go to the learner as they finish.
        self._accumulating = 0
        self._accumulate_refs: list[ray.ObjectRef] = []
        self._mark: tuple[float, dict[str, float]] = (
            0.0,
            {},
        )  # (time, workers' busy seconds) of the last step
        self._failing_steps = 0  # consecutive steps over train.max_failed_share

    # ---- setup ----------------------------------------------------------------------------------
    def _start_actors(self) -> None:
        from grpodx.actors.learner import LearnerActor
        from grpodx.actors.rollout import RolloutActor
        from grpodx.actors.sim import start_sim_workers

        config = self.config
        self.patient_worker, self.judge_worker = start_sim_workers(config, self._api_key)
        self.learner = LearnerActor.options(
            num_cpus=config.ray.learner_num_cpus,
            num_gpus=config.ray.learner_num_gpus,
            resources=config.ray.learner_resources or None,
        ).remote(config, self.model_source)
        rollout_options = {
            "num_cpus": config.ray.rollout_num_cpus,
            "num_gpus": config.ray.rollout_num_gpus,
            "resources": config.ray.rollout_resources or None,
        }
        source, patient, judge = self.model_source, self.patient_worker, self.judge_worker

        def make_worker(worker_id: str):
            return RolloutActor.options(**rollout_options).remote(worker_id, config, source, patient, judge)

        self.pool = RolloutPool(config, make_worker)
        if config.ray.request_rollout_workers:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[rollout_bundle(config)] * config.ray.request_rollout_workers)
        ray.get(self.learner.version.remote())

    async def _start_workers(self) -> None:
        wanted = self.config.ray.num_rollout_workers
        count = 1 if wanted == "auto" else int(wanted)
        await self.pool.wait_ready(count, self.config.ray.worker_start_timeout_s, self._on_worker_ready)

    async def _on_worker_ready(self, slot: WorkerSlot) -> None:
        """A new worker serves the newest adapter before it takes a group."""
        while True:
            version, adapter_ref = self._adapter
            if adapter_ref is not None:
                await slot.handle.load_adapter.remote(adapter_ref)
            if self._adapter[0] == version:
                return

    def _restore(self) -> None:
        state = self._resume_state
        version = ray.get(self.learner.load_checkpoint.remote(self.storage, self.checkpoint))
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        if version != self.step:
            raise RuntimeError(
                f"checkpoint {self.checkpoint} holds adapter version {version} at step {self.step}"
            )
        if version > 0:
            self._adapter = (version, ray.get(self.learner.publish.remote()))
        self.published_version = version
        self._saved = self.checkpoint

    def _send_to_learner(self, batch: int) -> None:
        for record_batch in self.scheduler.groups_of(batch):
            self._accumulate_refs.append(self.learner.accumulate.remote(record_batch))

    # ---- the loop -------------------------------------------------------------------------------
    async def _train_loop(self, sink: ParquetSink, logger: MetricsLogger, bar: tqdm) -> None:
        config = self.config
        self.scheduler = Scheduler(config, self.pool, self.sampler, self.step, self._log)
        scheduler = self.scheduler
        self._accumulating = self.step
        step_task: asyncio.Task | None = None
        self._mark = (time.perf_counter(), await self._busy_seconds())
        while self.step < config.train.max_steps or step_task is not None:
            if self._stop_requested and step_task is None:
                break  # a step being finished is finished; groups in flight are redone on resume
            self.pool.rescale(self._on_worker_ready)
            if not self._stop_requested:
                scheduler.dispatch(self.published_version)
            batch_complete = (
                not self._stop_requested
                and self.step < config.train.max_steps
                and scheduler.book.is_batch_complete(self._accumulating)
            )
            if step_task is None and batch_complete:
                step_task = asyncio.get_running_loop().create_task(self._finish_step(sink, logger, bar))
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

    async def _finish_step(self, sink: ParquetSink, logger: MetricsLogger, bar: tqdm) -> None:
        """Batch ``self._accumulating`` is complete: step, publish, push, log, checkpoint."""
        config, batch = self.config, self._accumulating
        self._send_to_learner(batch)
        accumulated = await asyncio.gather(*self._accumulate_refs)
        step_ref = self.learner.step.remote()
        # Groups of the next batch may now go to the learner: its calls run in the order sent.
        self._accumulate_refs, self._accumulating = [], batch + 1
        self._send_to_learner(batch + 1)
        learner_metrics = await step_ref
        push_started = time.perf_counter()
        version = batch + 1
        adapter_ref = await self.learner.publish.remote()
        self._adapter = (version, adapter_ref)
        await self._push(adapter_ref, version)
        self.published_version = version
        push_s = time.perf_counter() - push_started
        self.step = version

        book = self.scheduler.book
        records = [book.tickets.get(t) for t in book.batch_tickets(batch)]
        finished = [r.result for r in records if r is not None and r.finished]
        table = pa.Table.from_batches(finished, schema=TRAJECTORY_SCHEMA)
        lost = len(book.lost_in(batch))
        book.forget(batch)
        try:
            sink.write(self.step, table)
        except OSError as exc:
            raise self._cannot_write(f"the trajectories of step {self.step}", exc) from None
        metrics = rollout_metrics(table)
        metrics.update(learner_metrics)
        metrics.update(staleness_metrics(table, trained_by=batch, max_staleness=config.train.max_staleness))
        metrics.update(await self._api_usage())
        metrics.update(await self._timing_metrics(accumulated, learner_metrics, push_s))
        metrics.update(
            {
                "policy/version": float(self.step),
                "groups/lost": float(lost),
                "groups/retried_total": float(book.retried),
                "groups/duplicates_total": float(book.duplicates),
                "workers/ready": float(len(self.pool.ready_slots())),
                "workers/desired": float(self.pool.desired_count()),
            }
        )
        try:
            logger.log(self.step, metrics)
        except OSError as exc:
            raise self._cannot_write(f"the metrics of step {self.step}", exc) from None
        bar.update(1)
        bar.set_postfix(reward=_shown(metrics["reward/mean"], 3), acc=_shown(metrics["reward/accuracy"], 2))
        failures = failure_report(table)
        if failures:
            self._log(f"step {self.step}: {failures}")
        saved = None
        if self.step % config.train.save_steps == 0 or self.step == config.train.max_steps:
            saved = await self._save_checkpoint(logger)
        await self._circuit_breaker(metrics.get("episodes/failed_share", 0.0), failures, logger, saved)
        if config.train.eval_every and self.step % config.train.eval_every == 0:
            for prefix, temperature in self._evaluation_modes():
                episodes = await self.evaluate(config.train.eval_cases, temperature)
                self._log_evaluation(logger, prefix, temperature, episodes, f"step-{self.step:06d}")
        if self._on_step_end is not None:
            self._on_step_end(self.step, metrics)

    async def _circuit_breaker(
        self, failed_share: float, failures: str | None, logger: MetricsLogger, saved: str | None
    ) -> None:
        """Stop, with a checkpoint, once too many episodes failed for too many steps in a row: a dead
        API or simulator would otherwise have the run "train" on nothing, and pay for failed calls."""
        limit, steps = self.config.train.max_failed_share, self.config.train.max_failed_steps
        self._failing_steps = self._failing_steps + 1 if failed_share > limit else 0
        if self._failing_steps < steps:
            return
        saved = saved or await self._save_checkpoint(logger)
        logger.close()
        raise TrainingHalted(
            f"stopped at step {self.step}: more than {limit:.0%} of the episodes failed in {steps} steps "
            f"in a row (last step: {failures}). Fix the cause, then resume with --load-checkpoint "
            f"{self.storage.display(saved)} (or raise train.max_failed_share / train.max_failed_steps)"
        )

    async def _push(self, adapter_ref: ray.ObjectRef, version: int) -> None:
        slots = self.pool.ready_slots()
        results = await self._ask_workers(slots, lambda handle: handle.load_adapter.remote(adapter_ref))
        for slot, result in zip(slots, results, strict=True):
            if isinstance(result, (*WORKER_LOST_ERRORS, TimeoutError)):
                if isinstance(result, TimeoutError):
                    self._log(f"rollout worker {slot.worker_id} did not take the new adapter; replacing it")
                self.pool.on_worker_lost(slot.worker_id)
            elif isinstance(result, BaseException):
                raise result
            elif result != version:
                raise RuntimeError(
                    f"adapter push failed: {slot.worker_id} serves version {result}, learner is at {version}"
                )

    async def _busy_seconds(self) -> dict[str, float]:
        slots = self.pool.ready_slots()
        values = await self._ask_workers(slots, lambda handle: handle.busy_seconds.remote())
        return {s.worker_id: v for s, v in zip(slots, values, strict=True) if isinstance(v, float)}

    async def _ask_workers(self, slots: list[WorkerSlot], call: Callable) -> list:
        """``call(handle)`` on every worker at once: each answer, or the exception it raised, or a
        TimeoutError after ``ray.group_timeout_s`` (a hung worker must not hold the step)."""

        async def ask(slot: WorkerSlot):
            return await asyncio.wait_for(call(slot.handle), self.config.ray.group_timeout_s)

        return await asyncio.gather(*(ask(slot) for slot in slots), return_exceptions=True)

    async def _timing_metrics(self, accumulated: list[dict], learner_metrics: dict, push_s: float) -> dict:
        """Wall time of the step and the idle shares of the learner and of the generators."""
        now, busy = time.perf_counter(), await self._busy_seconds()
        then, busy_before = self._mark
        self._mark = (now, busy)
        wall = max(1e-9, now - then)
        learner_busy = learner_metrics["learner/seconds"]
        deltas = [busy[w] - busy_before[w] for w in busy if w in busy_before]
        generator_idle = 1.0 - sum(deltas) / (wall * len(deltas)) if deltas else float("nan")
        return {
            "time/step": wall,
            "time/learner": learner_busy,
            "time/weight_push": push_s,
            "time/learner_idle_share": max(0.0, 1.0 - learner_busy / wall),
            "time/generator_idle_share": max(0.0, generator_idle),
        }

    async def evaluate(self, count: int, temperature: float | None = None) -> pa.Table:
        """Episodes of the current adapter on the first ``count`` held-out cases (fixed seeds), at
        ``temperature`` (default ``train.eval_temperature``), as trajectory records."""
        if temperature is None:
            temperature = self.config.train.eval_temperature
        cases = self.sampler.held_out(count)
        slots = self.pool.ready_slots()
        parts = await asyncio.gather(
            *(
                slot.handle.evaluate.remote(cases[i :: len(slots)], None, temperature, self.step)
                for i, slot in enumerate(slots)
                if cases[i :: len(slots)]
            )
        )
        return pa.Table.from_batches(parts, schema=TRAJECTORY_SCHEMA)

    def _evaluation_modes(self) -> list[tuple[str, float]]:
        """(metrics prefix, temperature) of the held-out evaluations before and after training."""
        modes = [("eval", self.config.train.eval_temperature)]
        if self.config.train.eval_greedy and self.config.train.eval_temperature > 0:
            modes.append(("eval_greedy", 0.0))
        return modes

    def _log_evaluation(
        self, logger: MetricsLogger, prefix: str, temperature: float, episodes: pa.Table, when: str
    ) -> dict:
        """Summary of an evaluation in the metrics (and on the console unless mid-run); its episodes in
        ``evaluation/<when>[-greedy].parquet`` (``when``: before, after, or step-N)."""
        summary = summarize(episodes, num_conditions=len(self.kb.conditions))
        logger.log(self.step, {f"{prefix}/{k}": v for k, v in summary.items()})
        suffix = "-greedy" if prefix == "eval_greedy" else ""
        self.storage.write_parquet(f"evaluation/{when}{suffix}.parquet", episodes)
        if not when.startswith("step-"):
            self._log(format_summary(summary, f"{when} training (T = {temperature:g})"))
        return summary

    def _write_figures(self) -> None:
        """The learning curve and the HTML report; a failure is reported, never fatal to a finished run."""
        from grpodx.plots import write_learning_curve
        from grpodx.report import write_report

        for what, write in (("learning curve", write_learning_curve), ("report", write_report)):
            try:
                self._log(f"{what}: {write(self.storage)}")
            except Exception as exc:  # noqa: BLE001
                self._log(f"could not write the {what} ({type(exc).__name__}: {exc})")

    async def _save_checkpoint(self, logger: MetricsLogger) -> str:
        rel = f"checkpoints/step-{self.step:06d}"
        # The next run starts at the first group of batch `step`: its case is this sampler position.
        position = self.scheduler.case_position(self.step * self.config.train.batch_size)
        sampler = {**self.sampler.state_dict(), "position": position}
        state = {"step": self.step, "sampler": sampler, "adapter_version": self.step}
        # The learner writes the checkpoint where it runs, straight to the run's storage.
        files = {CHECKPOINT_STATE: json.dumps(state, indent=2)}
        try:
            await self.learner.save_checkpoint.remote(self.storage, rel, files)
            logger.sync()
        except (OSError, ray.exceptions.RayTaskError) as exc:
            cause = getattr(exc, "cause", exc)
            if not isinstance(cause, OSError):
                raise
            raise self._cannot_write(f"checkpoint {rel}", cause) from None
        self._saved = rel
        return rel

    def train(self) -> TrainResult:
        return asyncio.run(self._train())

    def _cannot_write(self, what: str, error: OSError) -> TrainingHalted:
        """The run stops when its outputs cannot be written (a full disk, a lost mount): training on
        without them would lose what it learns. Every write is atomic, so the last checkpoint is whole."""
        reason = error.strerror or str(error) or type(error).__name__
        message = f"stopped at step {self.step}: cannot write {what} to {self.storage.display()} ({reason}); "
        if self._saved is None:
            return TrainingHalted(message + "no checkpoint was written yet")
        checkpoint = self.storage.display(self._saved)
        return TrainingHalted(
            message
            + f"the last checkpoint is intact: free space, then resume with --load-checkpoint {checkpoint}"
        )

    # ---- Ctrl-C ---------------------------------------------------------------------------------
    def _watch_for_ctrl_c(self) -> None:
        """The first Ctrl-C stops the run after the step in progress, with a checkpoint; a second one
        stops it at once (every file is written atomically, so the last checkpoint stays whole)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_ctrl_c)
        except (RuntimeError, ValueError):  # not the main thread: Ctrl-C keeps its default meaning
            return
        self._watching_ctrl_c = True

    def _stop_watching_ctrl_c(self) -> None:
        if self._watching_ctrl_c:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            self._watching_ctrl_c = False

    def _on_ctrl_c(self) -> None:
        if self._stop_requested:
            self._stop_watching_ctrl_c()
            raise KeyboardInterrupt
        self._stop_requested = True
        self._log("Ctrl-C: stopping after the step in progress, with a checkpoint (Ctrl-C again: at once)")

    async def _stop_interrupted(self, logger: MetricsLogger) -> None:
        if self._saved != f"checkpoints/step-{self.step:06d}":
            await self._save_checkpoint(logger)
        logger.close()
        checkpoint = self.storage.display(self._saved)
        raise TrainingInterrupted(
            f"interrupted at step {self.step}; resume with --load-checkpoint {checkpoint}"
        )

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
        self._start_actors()
        if self.checkpoint is not None:
            self._restore()
            self._log(f"resumed from {self.checkpoint} at step {self.step}")
        await self._start_workers()
        sink = ParquetSink(self.storage)
        logger = MetricsLogger(self.storage, resumed_at=self.step if self.checkpoint else None)
        before: dict[str, pa.Table] = {}  # episodes per evaluation mode, for the paired differences
        result: dict = {}  # {mode}_before, {mode}_after, {mode}_paired for summary.json
        if config.train.eval_cases and self.step == 0:
            for prefix, temperature in self._evaluation_modes():
                before[prefix] = await self.evaluate(config.train.eval_cases, temperature)
                result[f"{prefix}_before"] = self._log_evaluation(
                    logger, prefix, temperature, before[prefix], "before"
                )
        bar = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc="GRPO",
            unit="step",
            disable=not self.progress,
        )
        self._watch_for_ctrl_c()
        try:
            await self._train_loop(sink, logger, bar)
        finally:
            bar.close()
            self._stop_watching_ctrl_c()
        if self._stop_requested:
            await self._stop_interrupted(logger)
        if config.train.eval_cases:
            for prefix, temperature in self._evaluation_modes():
                after = await self.evaluate(config.train.eval_cases, temperature)
                result[f"{prefix}_after"] = self._log_evaluation(logger, prefix, temperature, after, "after")
                if prefix in before:
                    paired = paired_difference(after, before[prefix])
                    logger.log(self.step, {f"{prefix}_paired/{k}": v for k, v in paired.items()})
                    self._log(format_paired(paired, f"after minus before (T = {temperature:g})"))
                    result[f"{prefix}_paired"] = paired
        logger.close()
        # The sampled evaluation's keys are always there (null when not run); the greedy ones when run.
        main = {key: result.get(key) for key in ("eval_before", "eval_after", "eval_paired")}
        summary = {"steps": self.step, **main, **result}
        self.storage.write_text("summary.json", json.dumps(summary, indent=2))
        self._write_figures()
        self._log(f"run directory: {self.storage.display()}")
        return TrainResult(
            self.run_dir, self.step, main["eval_before"], main["eval_after"], main["eval_paired"]
        )

    @property
    def workers(self) -> list:
        """Handles of the rollout workers (ready or starting)."""
        return [slot.handle for slot in self.pool.slots.values()] if self.pool is not None else []

    @property
    def run_dir(self) -> Path | str:
        """The run directory: a Path when local, else its (credential-free) URI."""
        return self.storage.local_path if self.storage.is_local else self.storage.display()

    async def _api_usage(self) -> dict[str, float]:
        """Token usage, failures and cost estimate of an API-backed patient/judge: this step and in total."""
        metrics: dict[str, float] = {}
        for role, worker in (("patient", self.patient_worker), ("judge", self.judge_worker)):
            try:
                step, total = await asyncio.gather(worker.usage_delta.remote(), worker.usage_total.remote())
            except WORKER_LOST_ERRORS:  # restarting (grpodx.actors.sim): its counters died with it
                continue
            metrics.update({f"api/{role}/{key}": value for key, value in step.items()})
            if total:
                metrics[f"api/{role}/total_cost_usd"] = total["cost_usd"]
                metrics[f"api/{role}/total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        return metrics

    def _log(self, message: str) -> None:
        tqdm.write(message)

    def shutdown(self) -> None:
        workers = self.pool.shutdown_handles() if self.pool is not None else []
        sims = [self.patient_worker, self.judge_worker]
        closing = [w.close.remote() for w in [*workers, *sims] if w is not None]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in [*workers, self.learner, *sims]:
            if actor is not None:
                ray.kill(actor)
        if self._lock is not None:
            self._lock.release()


def staleness_metrics(table: pa.Table, *, trained_by: int, max_staleness: int) -> dict[str, float]:
    """How many versions behind the training adapter each episode started, and its turns sampled."""
    starts = [trained_by - v for v in table.column("policy_version").to_pylist()]
    turns = [trained_by - v for versions in table.column("turn_versions").to_pylist() for v in versions]
    if not starts:
        return {}
    metrics = {
        "staleness/mean": sum(starts) / len(starts),
        "staleness/max": float(max(starts)),
        "staleness/turn_mean": sum(turns) / len(turns) if turns else 0.0,
    }
    for lag in range(max_staleness + 1):
        metrics[f"staleness/share_{lag}"] = sum(s == lag for s in starts) / len(starts)
    return metrics
