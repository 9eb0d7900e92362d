"""A generation engine with no model: a scripted doctor, decoded in the time a GPU would take.

For benchmarks and tests of the orchestrator at cluster scale (``engine.kind: simulated``): one small
machine runs the scheduling, Ray calls, Arrow batches, weight pushes and staleness gating of many
GPUs, because this engine computes nothing and *sleeps* (``asyncio.sleep``) for the modelled time, so
that many requests overlap as they do in a GPU's batch.

The time model is continuous batching, as in vLLM: requests join the running batch (up to
``max_batch_size``) as they arrive; one decode step of the batch takes ``step_s + token_s * b`` for
``b`` sequences and gives each of them one token; a request leaves when its tokens are done. Between
arrivals and departures the batch is constant, so the engine wakes only then (a fluid model of the
steps: a request that arrives mid-step starts at once, where a real engine would wait for the step's
end, at most one step). Prompts cost nothing (prefix caching). Adapters cost their bytes: a loaded
adapter is copied in, as a real engine copies its weights to the GPU.

The doctor is a script the episode code accepts as it is: each turn is exactly ``tokens_per_turn``
tokens, a ``<reason>`` block (padded to length) and a question, and on turn ``doctor_turns`` a
``Final diagnosis: ... Next steps: ...`` line, closed by ``<|im_end|>``. Which question and which
diagnosis is drawn from the request's seed, so a group's episodes differ in reward. Logprobs are
seeded draws in (-3, 0): numbers of the right type and shape, not of any model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grpodx.config import ConfigError, SimulationConfig
from grpodx.dialogue import ChatCodec
from grpodx.engines.base import (
    AdapterVersions,
    AdapterWeights,
    Generation,
    InProcessAdapterEngine,
    SamplingParams,
)

QUESTIONS = (
    "Do you have a fever?",
    "Do you have a cough?",
    "Do you have a headache?",
    "Do you have nausea?",
    "Are you short of breath?",
    "Do you have chest pain?",
)
DIAGNOSES = (
    ("Influenza", "rapid influenza test, fluids and rest"),
    ("Acute cystitis", "urinalysis and urine culture"),
    ("Migraine", "headache diary and analgesia"),
    ("Community-acquired pneumonia", "chest X-ray and antibiotics"),
)
FILLER = " so far"
# A request's logprobs lie in (-LOGPROB_RANGE, 0).
LOGPROB_RANGE = 3.0


class JsonTokenizer:
    """A model directory's ``tokenizer.json`` through the ``tokenizers`` library alone.

    The three calls :class:`~grpodx.dialogue.ChatCodec` makes, with the ids transformers' fast
    tokenizer gives (tested): a simulated rollout worker needs no transformers import (seconds of CPU
    and tens of MB in each of many processes).
    """

    def __init__(self, model_source: str | Path):
        from tokenizers import Tokenizer

        path = Path(model_source) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"engine.kind=simulated reads the tokenizer.json of a local model directory; {path} does "
                "not exist (use model.name=tiny or a directory saved with save_pretrained)"
            )
        self._tokenizer = Tokenizer.from_file(str(path))

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def light_chat_codec(model_source: str | Path) -> ChatCodec:
    return ChatCodec(JsonTokenizer(model_source))


@dataclass
class _Request:
    remaining: float  # tokens still to decode
    future: asyncio.Future


class ScriptedDoctor:
    """The doctor's turns as token ids, ``tokens_per_turn`` each, the last one a final diagnosis."""

    def __init__(self, chat: ChatCodec, tokens_per_turn: int, doctor_turns: int, seed: int = 0):
        self.chat = chat
        self._unseeded = random.Random(seed)  # draws for requests without a seed
        self.tokens_per_turn = tokens_per_turn
        self.doctor_turns = doctor_turns
        self._header = chat.generation_prompt()
        self._filler = chat.encode(FILLER)
        open_ids = chat.encode("<reason>")
        self._questions = [self._turn(open_ids, f"</reason> {q}") for q in QUESTIONS]
        self._diagnoses = [
            self._turn(open_ids, f"</reason> Final diagnosis: {name}. Next steps: {steps}.")
            for name, steps in DIAGNOSES
        ]

    def _turn(self, open_ids: list[int], rest: str) -> list[int]:
        tail = self.chat.encode(rest) + [self.chat.im_end_id]
        room = self.tokens_per_turn - len(open_ids) - len(tail)
        if room < 0:
            raise ConfigError(
                f"simulation.tokens_per_turn={self.tokens_per_turn} is too short for the simulated "
                f"doctor's turn {rest!r} ({len(open_ids) + len(tail)} tokens); raise it"
            )
        padding = (self._filler * (room // max(1, len(self._filler)) + 1))[:room]
        return open_ids + padding + tail

    def turn_index(self, prompt: list[int]) -> int:
        """Doctor turns before this one: the prompt holds one generation header per doctor turn."""
        first, size = self._header[0], len(self._header)
        headers = sum(
            1 for i, token in enumerate(prompt) if token == first and prompt[i : i + size] == self._header
        )
        return max(0, headers - 1)

    def reply(self, prompt: list[int], seed: int | None) -> tuple[list[int], list[float]]:
        turn = self.turn_index(prompt)
        draw = self._unseeded.getrandbits(32) if seed is None else _seed_of(seed, turn)
        rng = random.Random(draw)
        if turn + 1 >= self.doctor_turns:
            tokens = self._diagnoses[draw % len(self._diagnoses)]
        else:
            tokens = self._questions[(draw + turn) % len(self._questions)]
        logprobs = [-LOGPROB_RANGE * rng.random() for _ in tokens]
        return list(tokens), logprobs


def _seed_of(seed: int, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SimulatedEngine(InProcessAdapterEngine):
    """A GPU's decode time for a scripted doctor's tokens; see the module docstring for the model."""

    def __init__(
        self,
        simulation: SimulationConfig,
        chat: ChatCodec,
        *,
        max_batch_size: int = 64,
        seed: int = 0,
    ):
        self.step_s = simulation.engine_step_s
        self.token_s = simulation.engine_token_s
        self.max_batch_size = max_batch_size
        self.doctor = ScriptedDoctor(chat, simulation.tokens_per_turn, simulation.doctor_turns, seed)
        self._versions = AdapterVersions()  # version -> {name: numpy array} (None for the base model)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # What the engine has done, for tests and benchmarks.
        self.tokens_generated = 0
        self.adapter_bytes_loaded = 0

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, adapter: AdapterWeights) -> None:
        # The copy is the point: a real engine moves every byte of the adapter to its GPU.
        weights = {name: np.array(value, copy=True) for name, value in adapter.state_dict.items()}
        self.adapter_bytes_loaded += sum(w.nbytes for w in weights.values())
        self._versions.add(adapter.version, weights)

    # ---- requests -------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_version: int | None = None
    ) -> Generation:
        version = self.latest_version if adapter_version is None else adapter_version
        with self._versions.use(version):
            tokens, logprobs = self.doctor.reply(prompt_token_ids, sampling.seed)
            finish = "stop"
            if len(tokens) > sampling.max_new_tokens:
                cut = sampling.max_new_tokens
                tokens, logprobs, finish = tokens[:cut], logprobs[:cut], "length"
            await self._decode(len(tokens))
        self.tokens_generated += len(tokens)
        return Generation(tokens, logprobs, finish, version)

    async def _decode(self, count: int) -> None:
        """Wait as long as the running batch takes to give this request ``count`` tokens."""
        if self.step_s <= 0 and self.token_s <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._run_batch())
        request = _Request(float(count), loop.create_future())
        self._waiting.append(request)
        self._arrived.set()
        await request.future

    async def _run_batch(self) -> None:
        """Advance the running batch from one arrival or departure to the next."""
        loop = asyncio.get_running_loop()
        while True:
            # A caller that was cancelled (a group given up, a shutdown) leaves the batch.
            self._running = [r for r in self._running if not r.future.done()]
            while self._waiting and len(self._running) < self.max_batch_size:
                request = self._waiting.popleft()
                if not request.future.done():
                    self._running.append(request)
            self._arrived.clear()
            if not self._running:
                await self._arrived.wait()
                continue
            step = self.step_s + self.token_s * len(self._running)
            horizon = min(r.remaining for r in self._running) * step
            started = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), horizon)
            progress = (loop.time() - started) / step
            still = []
            for request in self._running:
                request.remaining -= progress
                if request.remaining <= 1e-6:
                    if not request.future.done():
                        request.future.set_result(None)
                else:
                    still.append(request)
            self._running = still

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for request in [*self._running, *self._waiting]:
            if not request.future.done():
                request.future.cancel()
