"""Patient and judge workers: async Ray actors shared by every rollout worker.

Each serves many conversations at once, up to ``max_concurrency`` calls in flight (an API's rate
limit is a property of the whole run, so it belongs here, not in each rollout worker). Rollout
workers talk to them through :class:`RemotePatient` / :class:`RemoteJudge`, which implement the
same interfaces as the in-process patient and judge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import ray
from pydantic import SecretStr
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from grpodx.config import Config
from grpodx.env import make_judge, make_patient
from grpodx.env.judge import Judge, Verdict
from grpodx.env.patient import Message, Patient
from grpodx.medical.cases import CaseCard
from grpodx.medical.knowledge import KnowledgeBase, load_knowledge_base
from grpodx.worker_pool import WORKER_LOST_ERRORS

SIM_WORKER_RESTARTS = 10
# How long a call waits for a restarting worker before its episode fails.
SIM_WORKER_RESTART_WAIT_S = 120.0


class _UsageReporting:
    """API usage of the worker's patient or judge; offline ones report nothing."""

    def usage_delta(self) -> dict[str, float]:
        usage = getattr(self._inner, "usage", None)
        return usage.delta() if usage is not None else {}

    def usage_total(self) -> dict[str, float]:
        usage = getattr(self._inner, "usage", None)
        return usage.snapshot() if usage is not None else {}

    async def close(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


# The API key arrives as a SecretStr (its repr is masked wherever Ray shows arguments) and is only
# unwrapped inside the client.
@ray.remote(num_cpus=0)
class PatientWorker(_UsageReporting):
    def __init__(self, config: Config, api_key: SecretStr | None = None):
        self._inner = make_patient(config, api_key)

    async def opening(self, case: CaseCard) -> str:
        return await self._inner.opening(case)

    async def reply(self, case: CaseCard, history: list[Message]) -> str:
        return await self._inner.reply(case, history)

    def knowledge_base(self) -> KnowledgeBase:
        """The packaged knowledge base, validated here: a simulated rollout worker takes it from this
        worker rather than load the ICD-10-CM tables (about 170 MB per process) to validate its own."""
        return load_knowledge_base()


@ray.remote(num_cpus=0)
class JudgeWorker(_UsageReporting):
    def __init__(self, config: Config, api_key: SecretStr | None = None):
        self._inner = make_judge(config, api_key)

    async def score(self, case: CaseCard, diagnosis: str | None, transcript: list[Message]) -> Verdict:
        return await self._inner.score(case, diagnosis, transcript)


async def _result_of(call: Callable[[], ray.ObjectRef]):
    """The worker's answer to ``call()``. While the worker restarts (Ray restarts a dead one) the call
    is sent again, for up to ``SIM_WORKER_RESTART_WAIT_S``; a failure comes as the worker's own
    exception (an ``ApiError`` the episode records as such), not Ray's wrapper of a remote traceback."""
    deadline = time.monotonic() + SIM_WORKER_RESTART_WAIT_S
    while True:
        try:
            return await call()
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class RemotePatient(Patient):
    def __init__(self, handle):
        self.handle = handle

    async def opening(self, case: CaseCard) -> str:
        return await _result_of(lambda: self.handle.opening.remote(case))

    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        return await _result_of(lambda: self.handle.reply.remote(case, list(history)))


class RemoteJudge(Judge):
    def __init__(self, handle):
        self.handle = handle

    async def score(self, case: CaseCard, diagnosis: str | None, transcript: Sequence[Message]) -> Verdict:
        return await _result_of(lambda: self.handle.score.remote(case, diagnosis, list(transcript)))


def start_sim_workers(config: Config, api_key: SecretStr | None = None):
    """The patient and judge workers, pinned to the driver's node: rollout nodes come and go with the
    autoscaler, and these two serve every worker for the whole run (a soft preference is not enough:
    Ray placed them on rollout nodes in tests)."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # A worker that dies is restarted by Ray; the calls it had in flight fail, and their episodes are
    # counted as failed, never scored. Not restarted forever: a worker that keeps dying stops the run.
    common = {"scheduling_strategy": here, "max_restarts": SIM_WORKER_RESTARTS}
    patient_options = {"max_concurrency": config.patient.max_concurrency, **common}
    judge_options = {"max_concurrency": config.judge.max_concurrency, **common}
    patient = PatientWorker.options(**patient_options).remote(config, api_key)
    judge = JudgeWorker.options(**judge_options).remote(config, api_key)
    return patient, judge


def ask_api_usage(patient, judge) -> dict[str, tuple[ray.ObjectRef, ray.ObjectRef]]:
    """Ask the patient and judge workers (handles) for their API usage now: the step's window closes
    at this call, whatever they do before :func:`api_usage` reads the answers."""
    return {
        role: (worker.usage_delta.remote(), worker.usage_total.remote())
        for role, worker in (("patient", patient), ("judge", judge))
    }


async def api_usage(asked: dict[str, tuple[ray.ObjectRef, ray.ObjectRef]]) -> dict[str, float]:
    """Token usage, failures and cost estimate of an API-backed patient and judge, from what
    :func:`ask_api_usage` asked: this step's and in total; nothing for offline ones."""
    metrics: dict[str, float] = {}
    for role, (step_ref, total_ref) in asked.items():
        try:
            step, total = await asyncio.gather(step_ref, total_ref)
        except WORKER_LOST_ERRORS:
            continue  # restarting (max_restarts above): its counters died with it
        metrics.update({f"api/{role}/{key}": value for key, value in step.items()})
        if total:
            metrics[f"api/{role}/total_cost_usd"] = total["cost_usd"]
            metrics[f"api/{role}/total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    return metrics
