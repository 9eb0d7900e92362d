"""Patient and judge workers: async Ray actors shared by every rollout worker.

Each serves many conversations at once, up to ``max_concurrency`` calls in flight (an API's rate
limit is a property of the whole run, so it belongs here, not in each rollout worker). Rollout
workers talk to them through :class:`RemotePatient` / :class:`RemoteJudge`, which implement the
same interfaces as the in-process patient and judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray

from grpodx.config import Config
from grpodx.env import make_judge, make_patient
from grpodx.env.judge import Judge, Verdict
from grpodx.env.patient import Message, Patient
from grpodx.medical.cases import CaseCard


@ray.remote(num_cpus=0)
class PatientWorker:
    def __init__(self, config: Config):
        self.patient = make_patient(config)

    async def opening(self, case: CaseCard) -> str:
        return await self.patient.opening(case)

    async def reply(self, case: CaseCard, history: list[Message]) -> str:
        return await self.patient.reply(case, history)


@ray.remote(num_cpus=0)
class JudgeWorker:
    def __init__(self, config: Config):
        self.judge = make_judge(config)

    async def score(self, case: CaseCard, diagnosis: str | None, transcript: list[Message]) -> Verdict:
        return await self.judge.score(case, diagnosis, transcript)


class RemotePatient(Patient):
    def __init__(self, handle):
        self.handle = handle

    async def opening(self, case: CaseCard) -> str:
        return await self.handle.opening.remote(case)

    async def reply(self, case: CaseCard, history: Sequence[Message]) -> str:
        return await self.handle.reply.remote(case, list(history))


class RemoteJudge(Judge):
    def __init__(self, handle):
        self.handle = handle

    async def score(self, case: CaseCard, diagnosis: str | None, transcript: Sequence[Message]) -> Verdict:
        return await self.handle.score.remote(case, diagnosis, list(transcript))


def start_sim_workers(config: Config):
    patient = PatientWorker.options(max_concurrency=config.patient.max_concurrency).remote(config)
    judge = JudgeWorker.options(max_concurrency=config.judge.max_concurrency).remote(config)
    return patient, judge
