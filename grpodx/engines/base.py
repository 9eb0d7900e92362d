"""The generation engine contract: token ids in, token ids and their logprobs out.

An engine never sees text. The episode owns the growing token sequence and hands the engine the
prompt ids; the engine returns the sampled ids and, for each, the log-probability under the
distribution it was sampled from (temperature applied, before top-p truncation) so that the learner,
which scores tokens with the same temperature, computes the same quantity.

Adapters are versioned: version 0 is the base model; version N is the LoRA adapter published after
learner step N. A request names its version when it starts and keeps it to the end.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # only for annotations: a simulated rollout worker never imports torch
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


class AdapterVersions:
    """The adapter versions an engine holds (0: the base model, no weights) and the requests using each.

    A version unloaded while requests still run on it stays until the last of them finishes, and takes
    no new request meanwhile: a request keeps the version it started with to its end.
    """

    def __init__(self):
        self.weights: dict[int, Any] = {0: None}
        self._in_use: Counter[int] = Counter()
        self._unloading: set[int] = set()

    @property
    def latest(self) -> int:
        return max(self.weights)

    def versions(self) -> list[int]:
        return sorted(self.weights)

    def add(self, version: int, weights: Any) -> None:
        if version <= 0:
            raise ValueError("adapter versions start at 1; version 0 is the base model")
        self.weights[version] = weights
        self._unloading.discard(version)

    def remove(self, version: int) -> None:
        if version == 0 or version not in self.weights:
            return
        if self._in_use[version]:
            self._unloading.add(version)  # removed when its last request finishes
        else:
            del self.weights[version]

    @contextlib.contextmanager
    def use(self, version: int) -> Iterator[Any]:
        """Hold ``version`` for one request; KeyError when it is not loaded (or being unloaded)."""
        if version not in self.weights or version in self._unloading:
            raise KeyError(f"adapter version {version} is not loaded (loaded: {self.versions()})")
        self._in_use[version] += 1
        try:
            yield self.weights[version]
        finally:
            self._in_use[version] -= 1
            if self._in_use[version] == 0 and version in self._unloading:
                self._unloading.discard(version)
                self.weights.pop(version, None)


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


class InProcessAdapterEngine(GenerationEngine):
    """An engine that keeps its adapters' weights itself, in an :class:`AdapterVersions`
    (``self._versions``), rather than handing them to a server (vLLM)."""

    _versions: AdapterVersions

    @property
    def latest_version(self) -> int:
        return self._versions.latest

    def loaded_versions(self) -> list[int]:
        return self._versions.versions()

    def unload_adapter(self, version: int) -> None:
        self._versions.remove(version)
