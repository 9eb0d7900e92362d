"""Rollout overhead: a rollout worker's doctor tokens per second against the bare engine's.

The worker runs full episodes (chat framing, ``<reason>`` stripping, the offline scripted patient and
judge, rewards, the Arrow record batch) through ``RolloutWorker`` without Ray. Every ``generate`` call
it makes is recorded (prompt, tokens generated, sampling seed); the bare engine then replays the same
prompts, each forced to generate exactly as many tokens (no stop token), turn by turn: all first turns
together, then all second turns, as the worker's episodes moved. Same engine, same weights, same
threads, so the ratio is what the episode machinery costs on top of generation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from grpodx.bench.core import BenchContext, Benchmark, BenchResult, ratio_stat, stat, torch_threads
from grpodx.engines.base import AdapterWeights, Generation, GenerationEngine, SamplingParams
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.rollout import Scenario


@dataclass(frozen=True)
class RecordedCall:
    prompt: list[int]
    sampling: SamplingParams
    adapter_version: int | None
    generated: int


class RecordingEngine(GenerationEngine):
    """Passes every call to ``inner`` and records what the bare engine must replay."""

    def __init__(self, inner: GenerationEngine):
        self.inner = inner
        self.calls: list[RecordedCall] = []

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_version: int | None = None
    ) -> Generation:
        generation = await self.inner.generate(prompt_token_ids, sampling, adapter_version)
        self.calls.append(
            RecordedCall(list(prompt_token_ids), sampling, adapter_version, len(generation.token_ids))
        )
        return generation

    def load_adapter(self, adapter: AdapterWeights) -> None:
        self.inner.load_adapter(adapter)

    def unload_adapter(self, version: int) -> None:
        self.inner.unload_adapter(version)

    @property
    def latest_version(self) -> int:
        return self.inner.latest_version

    def loaded_versions(self) -> list[int]:
        return self.inner.loaded_versions()


def turn_rounds(calls: list[RecordedCall]) -> list[list[RecordedCall]]:
    """Calls grouped by turn: an episode's calls share its sampling seed and come in order."""
    seen: Counter[int | None] = Counter()
    rounds: dict[int, list[RecordedCall]] = defaultdict(list)
    for call in calls:
        rounds[seen[call.sampling.seed]].append(call)
        seen[call.sampling.seed] += 1
    return [rounds[turn] for turn in sorted(rounds)]


async def replay(engine: GenerationEngine, calls: list[RecordedCall]) -> int:
    """The same prompts on the bare engine, each generating exactly as many tokens as recorded."""
    generated = 0
    for calls_of_turn in turn_rounds(calls):
        outputs = await asyncio.gather(
            *(
                engine.generate(
                    call.prompt,
                    replace(call.sampling, max_new_tokens=call.generated, stop_token_ids=()),
                    call.adapter_version,
                )
                for call in calls_of_turn
            )
        )
        generated += sum(len(output.token_ids) for output in outputs)
    return generated


@dataclass(frozen=True)
class Sizes:
    groups: int
    group_size: int


SIZES = {
    "full": Sizes(groups=8, group_size=8),
    "quick": Sizes(groups=2, group_size=8),
    "smoke": Sizes(groups=1, group_size=4),
}


def run(ctx: BenchContext) -> BenchResult:
    from grpodx.engines import create_engine
    from grpodx.env import make_judge, make_patient
    from grpodx.rollout import RolloutWorker

    sizes = SIZES[ctx.scale]
    config = ctx.config
    sampler = CaseSampler(load_knowledge_base(), "train", config.train.seed)
    worker_rate, engine_rate, episodes, tokens, calls_made = [], [], 0, 0, 0
    with torch_threads(config.ray.rollout_threads):
        engine = RecordingEngine(create_engine(config, ctx.model_source, "cpu", seed=config.train.seed))
        worker = RolloutWorker(
            "overhead", config, ctx.model_source, make_patient(config), make_judge(config), engine=engine
        )

        def scenarios(tag: str) -> list[Scenario]:
            return [
                Scenario(0, f"{tag}-g{i}", sampler.sample(), sizes.group_size, 0, config.train.seed)
                for i in range(sizes.groups)
            ]

        async def measure() -> None:
            nonlocal episodes, tokens, calls_made
            await worker.run_groups(scenarios("warm-up"))  # first batches, tokenizer caches
            for repeat in range(ctx.repeats):
                engine.calls.clear()
                started = time.perf_counter()
                batch = await worker.run_groups(scenarios(f"r{repeat}"))
                worker_s = time.perf_counter() - started
                doctor_tokens = sum(batch.column("num_doctor_tokens").to_pylist())
                recorded = list(engine.calls)
                if doctor_tokens != sum(call.generated for call in recorded):
                    raise RuntimeError("the episodes' doctor tokens differ from the tokens generated")
                started = time.perf_counter()
                replayed = await replay(engine.inner, recorded)
                engine_s = time.perf_counter() - started
                if replayed != doctor_tokens:
                    raise RuntimeError(f"the replay made {replayed} tokens, the episodes {doctor_tokens}")
                worker_rate.append(doctor_tokens / worker_s)
                engine_rate.append(replayed / engine_s)
                episodes += batch.num_rows
                tokens += doctor_tokens
                calls_made += len(recorded)
                ctx.log(
                    f"overhead repeat {repeat + 1}: worker {worker_rate[-1]:.0f} tokens/s, "
                    f"bare engine {engine_rate[-1]:.0f} tokens/s"
                )

        # One event loop for everything: the worker's and the engine's asyncio objects stay on it.
        asyncio.run(measure())
    ratio = ratio_stat(worker_rate, engine_rate)
    rows = [
        {
            "what": "rollout worker (full episodes)",
            "episodes": episodes,
            "generate_calls": calls_made,
            "doctor_tokens": tokens,
            "tokens_per_s": stat(worker_rate),
            "ratio": ratio,
        },
        {
            "what": "bare engine (same prompts and lengths)",
            "episodes": None,
            "generate_calls": calls_made,
            "doctor_tokens": tokens,
            "tokens_per_s": stat(engine_rate),
            "ratio": ratio_stat(engine_rate, engine_rate),
        },
    ]
    notes = [
        f"{sizes.groups} groups × {sizes.group_size} episodes per repeat, all in flight at once "
        f"(episodes_per_worker {config.ray.episodes_per_worker}, engine batches up to "
        f"{config.engine.max_batch_size}); engine {config.engine.kind}, torch threads "
        f"{config.ray.rollout_threads or 'default'} (a rollout actor's setting), doctor at "
        f"{ctx.model_source}.",
        "Tokens: the doctor's generated tokens (loss-mask tokens), identical on both sides: the replay "
        "forces each recorded call's length with no stop token, and the counts are checked equal.",
        "Worker time: run_groups from the call to the record batch (generation, patient, judge, reward, "
        "Arrow). Engine time: the replay, one turn after another, each turn's calls concurrently.",
        "Ratio = worker tokens/s ÷ bare engine tokens/s per repeat (1 = no overhead); 1 − ratio is the "
        "share of a worker's time spent outside generation or lost to smaller batches as episodes end.",
    ]
    return BenchResult(
        rows=rows,
        columns=[
            ("what", "what"),
            ("episodes", "episodes"),
            ("generate_calls", "generate calls"),
            ("doctor_tokens", "doctor tokens"),
            ("tokens_per_s", "tokens/s"),
            ("ratio", "÷ bare engine"),
        ],
        notes=notes,
    )


BENCHMARK = Benchmark(
    name="overhead",
    title="rollout worker against the bare engine",
    measures="Doctor tokens per second of a rollout worker running full episodes (offline patient and "
    "judge, no Ray) against the bare engine generating the same prompts and lengths.",
    run=run,
)
