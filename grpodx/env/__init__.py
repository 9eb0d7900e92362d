"""The diagnosis environment: patient, judge, reward, and one episode."""

from __future__ import annotations

from pydantic import SecretStr

from grpodx.config import Config, ConfigError
from grpodx.env.judge import IcdJudge, Judge
from grpodx.env.patient import Patient, ScriptedPatient
from grpodx.medical.knowledge import load_knowledge_base


def make_patient(config: Config, api_key: SecretStr | None = None) -> Patient:
    """The patient the config names; an API-backed one needs ``api_key`` (and owns a client to close)."""
    if config.patient.kind == "scripted":
        return ScriptedPatient(load_knowledge_base())
    if config.patient.kind == "openai":
        # Imported here so offline runs never import the openai SDK.
        from grpodx.env.api_patient import OpenAIPatient

        key = require_api_key(api_key, "patient")
        return OpenAIPatient.from_config(config.patient, key, load_knowledge_base())
    raise ConfigError(f"patient.kind={config.patient.kind!r} is not available; use scripted or openai")


def make_judge(config: Config, api_key: SecretStr | None = None) -> Judge:
    """The judge the config names; an API-backed one needs ``api_key`` (and owns a client to close)."""
    if config.judge.kind == "icd":
        return IcdJudge(load_knowledge_base())
    if config.judge.kind == "openai":
        from grpodx.env.api_judge import OpenAIJudge

        key = require_api_key(api_key, "judge")
        return OpenAIJudge.from_config(config.judge, key, load_knowledge_base())
    raise ConfigError(f"judge.kind={config.judge.kind!r} is not available; use icd or openai")


def require_api_key(api_key: SecretStr | None, role: str) -> SecretStr:
    if api_key is None or not api_key.get_secret_value():
        raise ConfigError(
            f"{role}.kind=openai needs an API key: set OPENAI_API_KEY or pass --openai-api-key-file FILE "
            "(a local OpenAI-compatible server without auth accepts any non-empty value)"
        )
    return api_key
