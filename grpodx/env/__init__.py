"""The diagnosis environment: patient, judge, reward, and one episode."""

from __future__ import annotations

from grpodx.config import Config, ConfigError
from grpodx.env.judge import IcdJudge, Judge
from grpodx.env.patient import Patient, ScriptedPatient
from grpodx.medical.knowledge import load_knowledge_base


def make_patient(config: Config) -> Patient:
    if config.patient.kind == "scripted":
        return ScriptedPatient(load_knowledge_base())
    raise ConfigError(f"patient.kind={config.patient.kind!r} is not available yet; use patient.kind=scripted")


def make_judge(config: Config) -> Judge:
    if config.judge.kind == "icd":
        return IcdJudge(load_knowledge_base())
    raise ConfigError(f"judge.kind={config.judge.kind!r} is not available yet; use judge.kind=icd")
