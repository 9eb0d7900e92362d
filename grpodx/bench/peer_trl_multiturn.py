"""GRPODx against TRL's ``GRPOTrainer`` on the project's own job: multi-turn interviews with a patient API
that answers in 300 ms (docs/peer_trl.md).

TRL 1.16 trains on conversations in two ways. Its tool loop (``tools`` / ``environment_factory``,
``GRPOTrainer._tool_call_loop``) generates one turn for the whole batch with TRL's generation, then runs
each completion's tool calls (a completion's async calls gathered together, the completions one after
another), then generates again for those that called a tool. A ``rollout_func`` is the user's own loop.
The doctor does not write TRL's tool-call format (its questions are chat turns and the patient is the
user), so the TRL side here is that loop's structure written as a ``rollout_func``:

- turns in lock step: one generation of every conversation still running, by TRL's own generation path
  (``GRPOTrainer._generate_single_turn``: ``model.generate`` on the left-padded batch);
- then the patient for each conversation: *serial*, one call after another, as the tool loop runs
  completions; or *gathered*, a turn's calls all at once (``asyncio.gather``), the most a rollout
  function can overlap without an engine that takes requests as they come.

GRPODx runs a :class:`~grpodx.rollout.RolloutWorker` (every episode its own coroutine; the engine batches
whatever turns are waiting) and its :class:`~grpodx.learner.Learner` in this process, no Ray. Both sides
hold the conversation with the same code (:class:`~grpodx.env.episode.EpisodeRunner`: chat format,
reasoning hidden from the patient, diagnosis parsing, the offline judge and the reward), the same API
patient client against the same loopback server, the same cases, group size, turn limit, per-turn token
limit, temperature, LoRA and optimizer, and no KL, so the two differ in the loop alone. Steps are
interleaved: after each TRL step (serial and gathered alternate) one GRPODx step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

from pydantic import SecretStr

from grpodx.bench.core import BenchContext, Benchmark, BenchResult, ratio_stat, stat
from grpodx.bench.peer_trl import GrpodxLoop, held_out_cases, trl_model, trl_settings
from grpodx.engines.base import Generation, SamplingParams

LATENCY_S = 0.3
DUMMY_KEY = SecretStr("sk-bench-loopback-no-auth")  # the loopback server checks no key
MODES = ("serial", "gathered")


@dataclass(frozen=True)
class Sizes:
    groups: int | None  # cases per step; None: the config's train.batch_size
    num_generations: int | None  # None: the config's
    max_turns: int | None  # None: the config's episode.max_turns
    max_new_tokens: int | None  # per turn; None: the config's
    latency_s: float


SIZES = {
    "full": Sizes(
        groups=None, num_generations=None, max_turns=None, max_new_tokens=None, latency_s=LATENCY_S
    ),
    "quick": Sizes(groups=2, num_generations=8, max_turns=None, max_new_tokens=None, latency_s=LATENCY_S),
    "smoke": Sizes(groups=1, num_generations=2, max_turns=2, max_new_tokens=8, latency_s=0.05),
}


class LockstepGeneration:
    """A generation engine for :class:`EpisodeRunner` that answers a turn only once every running
    conversation has asked for one, with one call of TRL's own generation for all of them.

    TRL's transformers path returns no logprobs (the trainer scores the tokens itself), so the episode
    records zeros; only TRL reads these episodes.
    """

    def __init__(self, generate_batch, stop_token_id: int):
        self._generate_batch = generate_batch  # list of prompt ids -> list of completion ids
        self._stop = stop_token_id
        self.running = 0
        self._waiting: list[tuple[list[int], SamplingParams, asyncio.Future]] = []

    async def generate(self, prompt_token_ids, sampling: SamplingParams, adapter_version=None) -> Generation:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((list(prompt_token_ids), sampling, future))
        self._release_when_all_wait()
        return await future

    def finished(self) -> None:
        """A conversation ended: the others no longer wait for it."""
        self.running -= 1
        self._release_when_all_wait()

    def _release_when_all_wait(self) -> None:
        if not self._waiting or len(self._waiting) < self.running:
            return
        batch, self._waiting = self._waiting, []
        outputs = self._generate_batch([ids for ids, _, _ in batch])
        for (_, sampling, future), output in zip(batch, outputs, strict=True):
            tokens = list(output)[: sampling.max_new_tokens]
            finish = "stop" if tokens and tokens[-1] == self._stop else "length"
            future.set_result(Generation(tokens, [0.0] * len(tokens), finish, 0))


class OneCallAtATime:
    """The patient asked for one conversation after another, as TRL's tool loop runs completions."""

    def __init__(self, patient):
        self._patient = patient
        self._lock = asyncio.Lock()

    async def opening(self, case):
        return await self._patient.opening(case)

    async def reply(self, case, history):
        async with self._lock:
            return await self._patient.reply(case, history)


class TrlConversations:
    """The ``rollout_func`` of the TRL side: the step's conversations, turn by turn, as token ids with an
    ``env_mask`` (1 on the doctor's sampled tokens) and each episode's reward for the reward function."""

    def __init__(
        self, config, tokenizer, patient, case_batches: list[list], num_generations: int, mode_of_step
    ):
        from grpodx.dialogue import ChatCodec
        from grpodx.env import make_judge
        from grpodx.medical.knowledge import load_knowledge_base

        self.config = config
        self.chat = ChatCodec(tokenizer)
        self.patient = patient
        self.case_batches = case_batches
        self.num_generations = num_generations
        self.mode_of_step = mode_of_step  # step index -> "serial" or "gathered"
        self.runner_parts = dict(
            chat=self.chat,
            judge=make_judge(config),
            kb=load_knowledge_base(),
            episode_config=config.episode,
            reward_config=config.reward,
        )
        self.loop = asyncio.new_event_loop()
        self.step_index = 0
        self.modes: list[str] = []  # the patient mode of each step, in order
        self.measured: dict[str, list[float]] = defaultdict(list)
        self.first_prompt: list[int] | None = None

    def __call__(self, prompts: list, trainer) -> dict:
        from grpodx.env.episode import EpisodeRunner

        cases = self.case_batches[self.step_index]
        expected = len(cases) * self.num_generations
        if len(prompts) != expected:
            raise RuntimeError(f"TRL asked for {len(prompts)} rollouts, the step has {expected}")
        openings = [prompt[-1]["content"] for prompt in prompts]
        cases_per_rollout = [case for case in cases for _ in range(self.num_generations)]
        for case, opening in zip(cases_per_rollout, openings, strict=True):
            # TRL's prompts come in dataset order, each repeated num_generations times.
            if self.loop.run_until_complete(self.patient.opening(case)) != opening:
                raise RuntimeError("TRL's prompts are not the step's cases in order: not the same work")
        mode = self.mode_of_step(self.step_index)
        self.modes.append(mode)

        def generate_batch(prompt_ids: list[list[int]]) -> list[list[int]]:
            completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, 1)
            return completion_ids

        engine = LockstepGeneration(generate_batch, self.chat.im_end_id)
        patient = OneCallAtATime(self.patient) if mode == "serial" else self.patient
        runner = EpisodeRunner(engine=engine, patient=patient, **self.runner_parts)
        sampling = runner.sampling(seed=None)

        async def one(case):
            try:
                return await runner.run(case, 0, sampling)
            finally:
                engine.finished()

        async def all_of_them():
            engine.running = len(cases_per_rollout)
            return await asyncio.gather(*(one(case) for case in cases_per_rollout))

        results = self.loop.run_until_complete(all_of_them())
        failed = [r.error for r in results if not r.valid]
        if failed:
            raise RuntimeError(f"{len(failed)} TRL-side episodes failed, e.g. {failed[0]}")
        prompt_ids, completion_ids, env_mask, rewards = [], [], [], []
        for result in results:
            start = result.loss_mask.index(1)
            prompt_ids.append(result.token_ids[:start])
            completion_ids.append(result.token_ids[start:])
            env_mask.append(result.loss_mask[start:])
            rewards.append(result.reward.total)
        if self.first_prompt is None:
            self.first_prompt = prompt_ids[0]
        self.measured["episodes"].append(float(len(results)))
        self.measured["doctor_tokens"].append(float(sum(sum(mask) for mask in env_mask)))
        self.measured["turns"].append(sum(r.turns for r in results) / len(results))
        self.step_index += 1
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": None,  # TRL's transformers path has none either; the trainer scores the tokens
            "env_mask": env_mask,
            "episode_reward": rewards,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.patient.aclose())
        self.loop.close()


def run(ctx: BenchContext) -> BenchResult:
    from grpodx.testing.loopback import OpenAICompatibleServer

    sizes = SIZES[ctx.scale]
    base = ctx.config
    groups = sizes.groups or base.train.batch_size
    num_generations = sizes.num_generations or base.grpo.num_generations
    max_turns = sizes.max_turns or base.episode.max_turns
    max_new_tokens = sizes.max_new_tokens or base.episode.sampling.max_new_tokens
    episodes = groups * num_generations
    server = OpenAICompatibleServer(latency_s=sizes.latency_s).start()
    try:
        config = ctx.derive(
            [
                f"grpo.num_generations={num_generations}",
                f"episode.max_turns={max_turns}",
                f"episode.sampling.max_new_tokens={max_new_tokens}",
                "grpo.kl_coef=0.0",
                "grpo.skip_tied_groups=false",
                "grpo.loss_aggregation=token-mean",
                "grpo.lr_schedule=constant",
                "grpo.warmup_steps=0",
                "grpo.weight_decay=0.0",
                "engine.kind=hf",
                "patient.kind=openai",
                f"patient.base_url={server.base_url}",
                f"patient.max_concurrency={max(64, episodes)}",
                "judge.kind=icd",
            ]
        )
        return _compare(ctx, config, server, sizes, groups, episodes)
    finally:
        server.stop()


def _compare(ctx, config, server, sizes: Sizes, groups: int, episodes: int) -> BenchResult:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from grpodx.env import make_patient

    num_generations = config.grpo.num_generations
    sampling = config.episode.sampling
    # One warm-up step (gathered), then per repeat one serial and one gathered TRL step, each followed
    # by one GRPODx step.
    steps = 1 + 2 * ctx.repeats
    cases = held_out_cases(config, groups * steps)
    case_batches = [cases[i * groups : (i + 1) * groups] for i in range(steps)]
    source = ctx.model_source
    ctx.log(
        f"peer_trl_multiturn: {groups} cases × {num_generations}, up to {config.episode.max_turns} turns of "
        f"{sampling.max_new_tokens} tokens, patient API {sizes.latency_s * 1000:.0f} ms a call"
    )
    ours = GrpodxLoop(config, source, case_batches, api_key=DUMMY_KEY)

    tokenizer, model, targets = trl_model(source, config)
    theirs_rollout = TrlConversations(
        config,
        tokenizer,
        make_patient(config, DUMMY_KEY),
        case_batches,
        num_generations,
        mode_of_step=lambda index: "gathered" if index % 2 == 0 else "serial",
    )
    patient = theirs_rollout.patient
    prompts = [
        [
            {"role": "system", "content": config.episode.system_prompt},
            {"role": "user", "content": theirs_rollout.loop.run_until_complete(patient.opening(case))},
        ]
        for case in cases
    ]
    theirs: dict[str, list[float]] = defaultdict(list)

    def reward_fn(completions, episode_reward, **_):
        return list(episode_reward)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            theirs["seconds"].append(time.perf_counter() - self.began)
            for key, value in ours.step().items():
                ours.measured[key].append(value)
            ctx.log(
                f"peer_trl_multiturn: step {state.global_step}/{steps}: TRL ({theirs_rollout.modes[-1]}) "
                f"{theirs['seconds'][-1]:.2f} s, GRPODx {ours.measured['seconds'][-1]:.2f} s"
            )

    with tempfile.TemporaryDirectory(prefix="grpodx-peer-trl-mt-") as out:
        # TRL's generation limit is per call, i.e. per turn here; the whole conversation is longer.
        args, peft = trl_settings(config, out, episodes, sampling.max_new_tokens, steps, targets)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(ours.close)
            cleanup.callback(theirs_rollout.close)
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward_fn,
                args=args,
                train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                processing_class=tokenizer,
                peft_config=peft,
                callbacks=[Interleave()],
                rollout_func=theirs_rollout,
            )
            stop_ids = trainer.eos_token_ids
            if theirs_rollout.chat.im_end_id not in stop_ids:
                raise RuntimeError(f"TRL stops at {stop_ids}, not at <|im_end|>: its turns would not end")
            trainer.train()

    if theirs_rollout.first_prompt != ours.prompt_ids:
        raise RuntimeError("TRL's and GRPODx's first prompts differ: not the same work")
    if len(theirs["seconds"]) != steps or len(ours.measured["seconds"]) != steps:
        raise RuntimeError(f"expected {steps} steps of each, got {len(theirs['seconds'])}")
    return _result(ctx, config, sizes, theirs, theirs_rollout, ours, steps)


def _result(ctx, config, sizes, theirs, theirs_rollout, ours, steps) -> BenchResult:
    import trl

    rows = []
    rates: dict[str, list[float]] = {}
    token_rates: dict[str, list[float]] = {}
    ours_episodes = ours.measured["completions"]
    for mode in MODES:
        indices = [i for i in range(1, steps) if theirs_rollout.modes[i] == mode]
        seconds = [theirs["seconds"][i] for i in indices]
        count = [theirs_rollout.measured["episodes"][i] for i in indices]
        tokens = [theirs_rollout.measured["doctor_tokens"][i] for i in indices]
        rates[mode] = [c / s for c, s in zip(count, seconds, strict=True)]
        token_rates[mode] = [t / s for t, s in zip(tokens, seconds, strict=True)]
        rows.append(
            {
                "trainer": f"TRL GRPOTrainer, rollout_func, patient {mode}",
                "episodes": int(count[0]),
                "turns": stat([theirs_rollout.measured["turns"][i] for i in indices]),
                "doctor_tokens": stat(tokens),
                "step_s": stat(seconds),
                "episodes_per_s": stat(rates[mode]),
                "tokens_per_s": stat(token_rates[mode]),
            }
        )
    # GRPODx's step after each TRL step of the mode: the pairs a ratio is taken over.
    timed = list(range(1, steps))
    ours_rates = [ours_episodes[i] / ours.measured["seconds"][i] for i in timed]
    ours_token_rates = [ours.measured["tokens"][i] / ours.measured["seconds"][i] for i in timed]
    ours_row = {
        "trainer": "GRPODx (rollout worker + learner)",
        "episodes": int(ours_episodes[1]),
        "turns": stat([ours.measured["turns"][i] for i in timed]),
        "doctor_tokens": stat([ours.measured["tokens"][i] for i in timed]),
        "step_s": stat([ours.measured["seconds"][i] for i in timed]),
        "generate_s": stat([ours.measured["generate_s"][i] for i in timed]),
        "learn_s": stat([ours.measured["learn_s"][i] for i in timed]),
        "episodes_per_s": stat(ours_rates),
        "tokens_per_s": stat(ours_token_rates),
    }
    for mode, row in zip(MODES, rows, strict=True):
        row["ratio"] = stat([1.0] * len(rates[mode]))
        paired = [timed.index(i) for i in range(1, steps) if theirs_rollout.modes[i] == mode]
        ours_row[f"ratio_{mode}"] = ratio_stat([ours_rates[j] for j in paired], rates[mode])
        ours_row[f"token_ratio_{mode}"] = ratio_stat([ours_token_rates[j] for j in paired], token_rates[mode])
    rows.append(ours_row)
    episode = config.episode
    notes = [
        f"Same work: {config.train.batch_size if sizes.groups is None else sizes.groups} held-out cases per "
        f"step × {config.grpo.num_generations} episodes, up to {episode.max_turns} doctor turns of at most "
        f"{episode.sampling.max_new_tokens} tokens, temperature {episode.sampling.temperature:g}, "
        f"LoRA r{config.lora.rank}, lr {config.grpo.lr:g} constant, no KL; the patient is the API client "
        f"(patient.kind=openai) against a loopback server answering in {sizes.latency_s * 1000:.0f} ms, the "
        "judge the offline ICD-10 one, the reward GRPODx's; the first prompt's token ids are checked equal.",
        f"TRL {trl.__version__}: the doctor does not write TRL's tool-call format, so its tool loop "
        "(GRPOTrainer._tool_call_loop: the batch's turn generated at once, then each completion's tool "
        "calls, completions one after another) is written as a rollout_func of the same structure: "
        "lock-step turns, each one call of TRL's own generation (_generate_single_turn, model.generate) "
        "for every running conversation, then the patient per conversation, 'serial' (one call after "
        "another, as the tool loop) or 'gathered' (a turn's calls at once). Episodes come back with "
        "env_mask (1 on the doctor's tokens), and TRL computes the loss on them (loss_type dapo).",
        "GRPODx: a RolloutWorker (transformers engine, every episode its own coroutine, the engine batches "
        "the turns waiting) and a Learner in this process, no Ray; a step is the episodes, train_step and "
        "loading the new adapter.",
        "Interleaved: one warm-up TRL step (gathered) and one GRPODx step, not counted; then per repeat a "
        "serial and a gathered TRL step, each followed by one GRPODx step. Ratio = GRPODx ÷ TRL episodes/s "
        f"(token ratio: doctor tokens/s) against the TRL step just before, median [min–max] over "
        f"{ctx.repeats} repeat(s). Episodes differ in length by sampling: compare the turns column too.",
    ]
    columns = [
        ("trainer", "trainer"),
        ("episodes", "episodes per step"),
        ("turns", "turns per episode"),
        ("doctor_tokens", "doctor tokens"),
        ("step_s", "s per step"),
        ("generate_s", "generate s"),
        ("learn_s", "learn s"),
        ("episodes_per_s", "episodes/s"),
        ("tokens_per_s", "doctor tokens/s"),
        ("ratio_serial", "episodes/s vs TRL serial"),
        ("ratio_gathered", "vs TRL gathered"),
        ("token_ratio_serial", "tokens/s vs TRL serial"),
        ("token_ratio_gathered", "vs TRL gathered"),
    ]
    return BenchResult(rows=rows, columns=columns, notes=notes)


BENCHMARK = Benchmark(
    name="peer_trl_multiturn",
    title="GRPODx vs TRL GRPOTrainer, multi-turn interviews with a 300 ms patient API",
    measures="Seconds per training step and episodes per second of TRL's GRPOTrainer (a rollout_func "
    "with its tool loop's structure, patient calls serial or gathered per turn) and of GRPODx's rollout "
    "worker + learner on the same interviews, interleaved, and their ratio.",
    run=run,
)
