"""GRPODx against TRL's ``GRPOTrainer`` on the same single-turn work, side by side (docs/peer_trl.md).

Both sides train the same doctor (the config's, float32 on the CPU) with a LoRA of the same rank,
alpha, dropout and target modules, on the same prompts (the doctor's system prompt and the scripted
patient's opening of held-out cases, in the doctor's chat format: the token ids are checked equal), with
the same group size, prompts per step, completion limit (``episode.sampling.max_new_tokens``),
temperature, clip range, optimizer (AdamW, the config's rate, constant schedule, gradient norm clip)
and no KL term. Rewards come from one length-based function for both (how close the completion's
token count is to half the limit), so that groups are seldom tied and both sides compute every
completion's gradient (GRPODx's ``skip_tied_groups`` is off).

- TRL: the library as released (the ``bench`` extra), its own generation path (``model.generate``,
  one batch of every completion of the step), ``loss_type="dapo"`` (the token mean over the batch,
  which is GRPODx's token-mean), ``beta=0``.
- GRPODx: in this process, a :class:`~grpodx.rollout.RolloutWorker` with ``episode.max_turns=1``
  (the transformers engine, the offline patient and judge) generates the step's groups, the
  :class:`~grpodx.learner.Learner` trains on them, and the worker loads the new adapter: the same
  synchronous loop TRL runs, with no Ray in between, on the same CPU threads.

They are interleaved: after each TRL optimizer step a callback runs one GRPODx step, so each repeat
times one step of each under the same load. The first step of each is a warm-up and is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from grpodx.bench.core import BenchContext, Benchmark, BenchResult, ratio_stat, stat


@dataclass(frozen=True)
class Sizes:
    groups: int | None  # prompts per step; None: the config's train.batch_size
    max_new_tokens: int | None  # None: the config's episode.sampling.max_new_tokens


SIZES = {
    "full": Sizes(groups=None, max_new_tokens=None),
    "quick": Sizes(groups=4, max_new_tokens=None),
    "smoke": Sizes(groups=1, max_new_tokens=8),
}


def length_reward(token_ids: list[int], max_new_tokens: int) -> float:
    """The reward both trainers use, from the completion's tokens alone.

    0.8 × closeness of its length to half the limit (1 there, 0 at 0 tokens and at the limit) + 0.2 × its
    share of distinct tokens: the second term keeps a group whose completions all hit the limit from
    tying, so that both trainers compute the gradient of (nearly) every completion.
    """
    half = max_new_tokens / 2
    length = len(token_ids)
    distinct = len(set(token_ids)) / length if length else 0.0
    return 0.8 * (1.0 - min(1.0, abs(length - half) / half)) + 0.2 * distinct


class GrpodxLoop:
    """GRPODx's synchronous step in this process: generate, score, train, publish.

    ``rescore`` replaces each episode's reward with a function of its doctor tokens (the single-turn
    comparison's length reward); without it the episode keeps the reward its judge gave. ``api_key``
    is for an API-backed patient (``patient.kind=openai``).
    """

    def __init__(
        self,
        config,
        model_source: str,
        case_batches: list[list],
        rescore: Callable[[list[int]], float] | None = None,
        api_key=None,
    ):
        from grpodx.env import make_judge, make_patient
        from grpodx.learner import Learner
        from grpodx.rollout import RolloutWorker

        self.config = config
        self.case_batches = case_batches
        self.rescore = rescore
        self.loop = asyncio.new_event_loop()
        self.patient, self.judge = make_patient(config, api_key), make_judge(config, api_key)
        self.worker = RolloutWorker("peer", config, model_source, self.patient, self.judge)
        # Version 0 is the base model, which a fresh adapter (B = 0) equals: no adapter to load yet.
        self.learner = Learner(config, model_source, device="cpu")
        self.step_index = 0
        self.measured: dict[str, list[float]] = defaultdict(list)
        self.prompt_ids: list[int] | None = None

    def step(self) -> dict[str, float]:
        from grpodx.rollout import Scenario

        cases = self.case_batches[self.step_index]
        scenarios = [
            Scenario(
                self.step_index,
                f"peer-{self.step_index}-{i}",
                case,
                self.config.grpo.num_generations,
                self.learner.version,
                self.config.train.seed,
            )
            for i, case in enumerate(cases)
        ]
        started = time.perf_counter()
        batch = self.loop.run_until_complete(self.worker.run_groups(scenarios))
        generated = time.perf_counter()
        completions = [
            [token for token, m in zip(ids, mask, strict=True) if m]
            for ids, mask in zip(
                batch.column("token_ids").to_pylist(), batch.column("loss_mask").to_pylist(), strict=True
            )
        ]
        counts = [len(ids) for ids in completions]
        if self.rescore is not None:
            rewards = pa.array([self.rescore(ids) for ids in completions], pa.float32())
            batch = batch.set_column(batch.schema.get_field_index("reward"), "reward", rewards)
        metrics = self.learner.train_step(pa.Table.from_batches([batch]))
        self.worker.load_adapter(self.learner.adapter())
        finished = time.perf_counter()
        if self.prompt_ids is None:
            ids, mask = batch.column("token_ids")[0].as_py(), batch.column("loss_mask")[0].as_py()
            self.prompt_ids = ids[: mask.index(1)] if 1 in mask else ids
        self.step_index += 1
        return {
            "seconds": finished - started,
            "generate_s": generated - started,
            "learn_s": finished - generated,
            "completions": float(len(counts)),
            "tokens": float(sum(counts)),
            "trained": metrics["learner/sequences_computed"],
            "turns": sum(batch.column("turns").to_pylist()) / max(1, batch.num_rows),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.worker.engine.close())
        for client in (self.patient, self.judge):  # an API-backed one owns an HTTP client
            if hasattr(client, "aclose"):
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(client.aclose())
        # The engine's batching task waits for requests for ever: cancel it before the loop goes.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


def held_out_cases(config, count: int) -> list:
    from grpodx.medical.cases import CaseSampler
    from grpodx.medical.knowledge import load_knowledge_base

    sampler = CaseSampler(load_knowledge_base(), "eval", config.train.seed)
    return [sampler.sample() for _ in range(count)]


def trl_model(source: str, config):
    """TRL's side of a comparison: the doctor's tokenizer and model (float32), and the LoRA targets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpodx.models import lora_target_modules, use_grouped_sdpa_on_cpu

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    # The same attention kernel as GRPODx's engine and learner (grpodx.attention), so that the two sides
    # differ in their training loops, not in the model code they run.
    use_grouped_sdpa_on_cpu(model)
    return tokenizer, model, lora_target_modules(model.config.model_type, config.lora.target_modules)


def trl_settings(config, out: str, batch: int, max_completion_length: int, steps: int, targets):
    """``GRPOConfig`` and ``LoraConfig`` for the same learning work as GRPODx under ``config``: ``batch``
    completions a step in groups of the config's size, its sampling, clip range, optimizer and LoRA,
    the token-mean loss (``dapo``), no KL, a constant rate; nothing logged or saved."""
    from peft import LoraConfig
    from trl import GRPOConfig

    sampling = config.episode.sampling
    args = GRPOConfig(
        output_dir=out,
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=config.grpo.num_generations,
        max_completion_length=max_completion_length,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=config.grpo.clip_low,
        epsilon_high=config.grpo.clip_high,
        learning_rate=config.grpo.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=config.grpo.max_grad_norm,
        optim="adamw_torch",
        max_steps=steps,
        shuffle_dataset=False,
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        disable_dropout=False,
        seed=config.train.seed,
        dataloader_num_workers=0,
    )
    peft = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return args, peft


def run(ctx: BenchContext) -> BenchResult:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from grpodx.env.patient import ScriptedPatient
    from grpodx.medical.knowledge import load_knowledge_base

    sizes = SIZES[ctx.scale]
    base = ctx.config
    groups = sizes.groups or base.train.batch_size
    max_new_tokens = sizes.max_new_tokens or base.episode.sampling.max_new_tokens
    config = ctx.derive(
        [
            "episode.max_turns=1",
            f"episode.sampling.max_new_tokens={max_new_tokens}",
            "grpo.kl_coef=0.0",
            "grpo.skip_tied_groups=false",
            "grpo.loss_aggregation=token-mean",
            "grpo.lr_schedule=constant",
            "grpo.warmup_steps=0",
            "grpo.weight_decay=0.0",
            "engine.kind=hf",
            "patient.kind=scripted",
            "judge.kind=icd",
        ]
    )
    num_generations = config.grpo.num_generations
    sampling = config.episode.sampling
    steps = 1 + ctx.repeats  # one warm-up step each, then one timed step of each per repeat
    cases = held_out_cases(config, groups * steps)
    case_batches = [cases[i * groups : (i + 1) * groups] for i in range(steps)]
    patient = ScriptedPatient(load_knowledge_base())
    system_prompt = config.episode.system_prompt
    prompts = [
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": patient.opening_text(c)}]
        for c in cases
    ]
    source = ctx.model_source

    ctx.log(f"peer_trl: GRPODx side ({groups} prompts × {num_generations}, {max_new_tokens} new tokens)")
    ours = GrpodxLoop(config, source, case_batches, rescore=lambda ids: length_reward(ids, max_new_tokens))

    tokenizer, model, targets = trl_model(source, config)
    theirs: dict[str, list[float]] = defaultdict(list)
    step_tokens: list[int] = []
    step_trained: list[int] = []

    def reward_fn(completions, completion_ids, **_):
        step_tokens.extend(len(ids) for ids in completion_ids)
        rewards = [length_reward(list(ids), max_new_tokens) for ids in completion_ids]
        groups_of = [rewards[i : i + num_generations] for i in range(0, len(rewards), num_generations)]
        # TRL computes every completion's loss; a completion at its group's mean has advantage 0.
        step_trained.append(sum(len(g) for g in groups_of if max(g) > min(g)))
        return rewards

    class Interleave(TrainerCallback):
        """Time each TRL step from its start to the end of its optimizer step, then run one GRPODx step."""

        def __init__(self):
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            step_tokens.clear()
            step_trained.clear()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            theirs["seconds"].append(time.perf_counter() - self.began)
            theirs["completions"].append(float(len(step_tokens)))
            theirs["tokens"].append(float(sum(step_tokens)))
            theirs["trained"].append(float(len(step_tokens)))
            theirs["untied"].append(float(sum(step_trained)))
            for key, value in ours.step().items():
                ours.measured[key].append(value)
            ctx.log(
                f"peer_trl: step {state.global_step}/{steps}: TRL {theirs['seconds'][-1]:.2f} s, "
                f"GRPODx {ours.measured['seconds'][-1]:.2f} s"
            )

    with tempfile.TemporaryDirectory(prefix="grpodx-peer-trl-") as out:
        args, peft = trl_settings(config, out, groups * num_generations, max_new_tokens, steps, targets)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_fn,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[Interleave()],
        )
        ctx.log("peer_trl: interleaved steps, TRL then GRPODx")
        trainer.train()
    ours.close()

    trl_prompt = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=True)
    if isinstance(trl_prompt, dict) or hasattr(trl_prompt, "keys"):
        trl_prompt = trl_prompt["input_ids"]
    if list(trl_prompt) != ours.prompt_ids:
        raise RuntimeError("TRL and GRPODx tokenised the first prompt differently: not the same work")
    if len(theirs["seconds"]) != steps or len(ours.measured["seconds"]) != steps:
        raise RuntimeError(f"expected {steps} steps of each, got {len(theirs['seconds'])}")

    def timed(values: list[float]) -> list[float]:
        return values[1:]  # the warm-up step is not counted

    rows = []
    for label, measured in (
        ("TRL GRPOTrainer", theirs),
        ("GRPODx (rollout worker + learner)", ours.measured),
    ):
        seconds = timed(measured["seconds"])
        completions = timed(measured["completions"])
        tokens = timed(measured["tokens"])
        rows.append(
            {
                "trainer": label,
                "completions": int(completions[0]),
                "trained": stat(timed(measured["trained"])),
                "completion_tokens": stat(tokens),
                "step_s": stat(seconds),
                "completions_per_s": stat([c / s for c, s in zip(completions, seconds, strict=True)]),
                "tokens_per_s": stat([t / s for t, s in zip(tokens, seconds, strict=True)]),
            }
        )
    trl_row, ours_row = rows
    trl_rate = trl_row["completions_per_s"]["values"]
    ours_rate = ours_row["completions_per_s"]["values"]
    trl_token_rate = trl_row["tokens_per_s"]["values"]
    ours_token_rate = ours_row["tokens_per_s"]["values"]
    trl_row["ratio"] = stat([1.0] * len(trl_rate))
    ours_row["ratio"] = ratio_stat(ours_rate, trl_rate)
    trl_row["token_ratio"] = stat([1.0] * len(trl_rate))
    ours_row["token_ratio"] = ratio_stat(ours_token_rate, trl_token_rate)
    ours_row["generate_s"] = stat(timed(ours.measured["generate_s"]))
    ours_row["learn_s"] = stat(timed(ours.measured["learn_s"]))

    import trl

    notes = [
        f"Same work: {groups} held-out cases per step × {num_generations} completions, at most "
        f"{max_new_tokens} new tokens, temperature {sampling.temperature:g}, top-p {sampling.top_p:g}, LoRA "
        f"r{config.lora.rank} alpha {config.lora.alpha:g} dropout {config.lora.dropout:g} on "
        f"{', '.join(targets)}, clip [{config.grpo.clip_low:g}, {config.grpo.clip_high:g}], lr "
        f"{config.grpo.lr:g} constant, no KL, one length-based reward for both; the prompt token ids are "
        "checked identical.",
        "Reward (both): 0.8 × (1 − |tokens − limit/2| ÷ limit/2) + 0.2 × share of distinct tokens. "
        "Gradients computed: completions whose loss was computed; TRL computes all of them, GRPODx skips "
        "those with advantage 0 (tied groups: TRL's untied completions were "
        f"{', '.join(str(int(v)) for v in theirs['untied'][1:])} per timed step).",
        f"TRL {trl.__version__} GRPOTrainer: loss_type dapo, its transformers generation path (one "
        "generate() of the step's completions); a step is timed from on_step_begin to on_step_end "
        "(generation, reward, loss, backward, optimizer step).",
        "GRPODx: RolloutWorker (transformers engine, max_turns 1, offline patient and judge) + Learner "
        "in this process, no Ray; a step is generation, the length reward, train_step and loading the new "
        "adapter into the engine. generate s and learn s split it.",
        "Interleaved: each TRL step is followed by one GRPODx step; one warm-up step of each is not "
        f"counted (warm-up: TRL {theirs['seconds'][0]:.1f} s, GRPODx {ours.measured['seconds'][0]:.1f} s). "
        f"Ratio = GRPODx ÷ TRL per repeat (completions/s; token ratio: completion tokens/s), "
        f"median [min–max] over {ctx.repeats} repeat(s). Completion lengths differ between the two by "
        "sampling, so tokens/s is the fairer figure where they do.",
    ]
    if not all(math.isfinite(v) and v > 0 for v in ours_rate + trl_rate):
        raise RuntimeError("a step generated no completions")
    return BenchResult(
        rows=rows,
        columns=[
            ("trainer", "trainer"),
            ("completions", "completions per step"),
            ("trained", "gradients computed"),
            ("completion_tokens", "completion tokens"),
            ("step_s", "s per step"),
            ("generate_s", "generate s"),
            ("learn_s", "learn s"),
            ("completions_per_s", "completions/s"),
            ("tokens_per_s", "completion tokens/s"),
            ("ratio", "completions/s vs TRL"),
            ("token_ratio", "tokens/s vs TRL"),
        ],
        notes=notes,
    )


BENCHMARK = Benchmark(
    name="peer_trl",
    title="GRPODx vs TRL GRPOTrainer, single turn",
    measures="Seconds per training step and completions per second of TRL's GRPOTrainer and of GRPODx's "
    "rollout worker + learner on the same single-turn work (prompts, group size, lengths, temperature, "
    "LoRA), interleaved, and their ratio.",
    run=run,
)
