"""The generation engine contract: token ids in, token ids and their logprobs out.

An engine never sees text. The episode owns the growing token sequence and hands the engine the
prompt ids; the engine returns the sampled ids and, for each, the log-probability under the
distribution it was sampled from (temperature applied, before top-p truncation) so that the learner,
which scores tokens with the same temperature, computes the same quantity.

Adapters are versioned: version 0 is the base model; version N is the LoRA adapter published after
learner step N. A request names its version when it starts and keeps it to the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    adapter_version: int


@dataclass
class AdapterWeights:
    """A LoRA adapter in memory, as the learner publishes it (peft state-dict names, CPU tensors)."""

    version: int
    state_dict: dict[str, torch.Tensor]
    peft_config: dict = field(default_factory=dict)


class GenerationEngine(ABC):
    """One model that serves many concurrent requests; adapters hot-swapped by version."""

    @abstractmethod
    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_version: int | None = None
    ) -> Generation:
        """Sample a continuation of ``prompt_token_ids``; ``None`` means the latest loaded version."""

    @abstractmethod
    def load_adapter(self, adapter: AdapterWeights) -> None:
        """Make ``adapter.version`` available; later requests default to it."""

    @abstractmethod
    def unload_adapter(self, version: int) -> None:
        """Forget a version no request uses any more."""

    @property
    @abstractmethod
    def latest_version(self) -> int:
        """The newest loaded adapter version (0 before any adapter)."""

    @abstractmethod
    def loaded_versions(self) -> list[int]:
        """Versions currently available, base model (0) included."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release the engine's resources."""
