"""The learner: the base model with a LoRA adapter, its optimizer, and the GRPO update.

One ``train_step`` takes the trajectories of a batch of groups, computes group advantages, and makes
one optimizer step of the clipped policy loss, token-mean over every doctor token of the batch
(micro-batched by a token budget, with the loss scaled so accumulation equals the full-batch mean).
The KL reference, when used, is the same model with the adapter disabled: it costs no memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights

from grpodx.algo import grpo
from grpodx.config import Config
from grpodx.data.trajectory import as_table
from grpodx.engines.base import AdapterWeights
from grpodx.models import best_device, check_adapter_keys, load_doctor, lora_target_modules

LEARNER_STATE_FILE = "learner_state.pt"
ADAPTER_DIR = "adapter"
PLAIN_OUTPUT_LAYER = frozenset({"phi3", "llama", "mistral", "qwen2", "qwen3"})


def _squared_norm(parameters: list[torch.Tensor], minus: list[torch.Tensor | None] | None = None) -> float:
    """Squared norm of the parameters' gradients (less ``minus``, the gradients saved earlier)."""
    total = 0.0
    for index, parameter in enumerate(parameters):
        if parameter.grad is None:
            continue
        grad = parameter.grad.detach().float()
        if minus is not None and minus[index] is not None:
            grad = grad - minus[index].float()
        total += float(grad.pow(2).sum())
    return total


class GradientNoiseMeter:
    """The gradient noise scale in groups: how many groups a step needs before its signal beats its noise.

    Each accumulate call's own gradient is the change it makes to the accumulated one; from their squared
    norms and the step's, unbiased estimates of |G|^2 and tr(Sigma) per group
    (:func:`grpodx.algo.grpo.gradient_noise_estimates`, when every call brought the same number of
    groups); the scale is the ratio of their running averages (exponential, 0.9), because one step's
    |G|^2 estimate is too noisy to divide by. Costs a copy of the gradient per call.
    """

    def __init__(self):
        self._parts: list[tuple[float, int]] = []  # (squared norm, groups) per accumulate call
        self._before: list[torch.Tensor | None] = []
        self._average = (0.0, 0.0)  # running averages of the |G|^2 and tr(Sigma) estimates

    def before_call(self, trainable: list[torch.Tensor]) -> None:
        self._before = [None if p.grad is None else p.grad.detach().clone() for p in trainable]

    def after_call(self, trainable: list[torch.Tensor], groups: int) -> None:
        self._parts.append((_squared_norm(trainable, self._before), groups))
        self._before = []

    def step_metrics(self, trainable: list[torch.Tensor]) -> dict[str, float]:
        """At the end of a step, before the gradient is scaled: this step's estimates and the scale."""
        parts, self._parts = self._parts, []
        sizes = {groups for _, groups in parts}
        nan = float("nan")
        if len(parts) < 2 or len(sizes) != 1:
            return {
                "learner/grad_signal_sq": nan,
                "learner/grad_noise_trace": nan,
                "learner/noise_scale": nan,
            }
        signal, noise = grpo.gradient_noise_estimates([sq for sq, _ in parts], _squared_norm(trainable))
        groups_per_part = sizes.pop()
        # Both averages start at 0 and so carry the same start-up bias, which cancels in the ratio.
        average_signal, average_noise = (
            0.9 * a + 0.1 * b for a, b in zip(self._average, (signal, noise), strict=True)
        )
        self._average = (average_signal, average_noise)
        return {
            "learner/grad_signal_sq": signal / groups_per_part**2,
            "learner/grad_noise_trace": noise / groups_per_part,
            "learner/noise_scale": average_noise / average_signal * groups_per_part
            if average_signal > 0
            else nan,
        }


@dataclass
class PendingStep:
    """What the accumulate calls of one step have added up, until :meth:`Learner.step` applies it."""

    tokens: int = 0  # loss tokens of the trained episodes, computed or not (zero advantage, no KL)
    sequences: int = 0  # trained episodes
    sequences_computed: int = 0
    micro_batches: int = 0
    seconds: float = 0.0
    # Sums over micro-batches of the loss terms (not yet divided by the batch's denominator) and of
    # the per-micro-batch ratio statistics.
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    ratio_max: float = 0.0
    groups: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add_micro_batch(self, stats: dict[str, float]) -> None:
        self.micro_batches += 1
        self.ratio_max = max(self.ratio_max, stats.pop("ratio_max"))
        for key, value in stats.items():
            self.sums[key] += value


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        progress = min(1.0, step / max(1, total_steps))
        if schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return warm * (1 - progress)
        return warm

    return factor


class Learner:
    def __init__(self, config: Config, model_source: str, device: str | torch.device | None = None):
        self.config = config
        self.device = torch.device(device) if device else best_device(config.ray.learner_num_gpus)
        dtype = config.model.dtype if self.device.type == "cuda" else "float32"
        base, _ = load_doctor(model_source, dtype, self.device)
        if config.model.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        targets = lora_target_modules(base.config.model_type, config.lora.target_modules)
        self.peft_config = {
            "r": config.lora.rank,
            "lora_alpha": config.lora.alpha,
            "lora_dropout": config.lora.dropout,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        }
        # The LoRA A matrices start random: seeded by train.seed, so that two runs of one config start
        # from the same adapter (and a resumed run matches an uninterrupted one), without touching the
        # process's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            self.model = get_peft_model(base, LoraConfig(**self.peft_config))
        # Architectures whose logits are exactly lm_head(last hidden state); the others (Gemma-2's
        # soft-capped logits, say) take the model's own forward.
        self._output_layer_on_loss_tokens = base.config.model_type in PLAIN_OUTPUT_LAYER
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.grpo.lr, weight_decay=config.grpo.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(config.grpo.lr_schedule, config.grpo.warmup_steps, config.train.max_steps),
        )
        self.version = 0
        self._pending = PendingStep()
        self._noise = GradientNoiseMeter() if config.grpo.measure_noise_scale else None
        temperature = config.episode.sampling.temperature
        # The engine records logprobs of the temperature-scaled distribution; score the same one.
        self.temperature = temperature if temperature > 0 else 1.0

    # ---- the update -----------------------------------------------------------------------------
    def train_step(self, batches: list[pa.RecordBatch] | pa.Table) -> dict[str, float]:
        """One GRPO step on a whole batch: :meth:`accumulate` it, then :meth:`step`."""
        self.accumulate(batches)
        return self.step()

    def accumulate(self, batches: list[pa.RecordBatch] | pa.Table | pa.RecordBatch) -> dict[str, float]:
        """Add the gradient of whole groups to the pending step; groups may arrive one at a time.

        Advantages are per group, so a group needs nothing from the rest of its batch. The loss is a sum
        over tokens here; :meth:`step` divides the accumulated gradient by the batch's total (doctor
        tokens for token-mean, episodes for sequence-mean), which is exactly the gradient of the batch
        mean, whatever order and grouping the groups came in.
        """
        started = time.perf_counter()
        table = as_table(batches)
        columns = table.select(
            ["group_id", "reward", "valid", "token_ids", "loss_mask", "behaviour_logprobs"]
        )
        rows = columns.to_pylist()
        advantages, group_stats, tied = self._advantages(rows)
        use_kl = self.config.grpo.kl_coef > 0
        trained = [i for i, a in enumerate(advantages) if a is not None]
        if self.config.grpo.skip_tied_groups:
            # Out of the batch entirely, as if never sampled (DAPO's dynamic-sampling filter).
            trained = [i for i in trained if rows[i]["group_id"] not in tied]
        # A zero-advantage episode adds nothing to the policy gradient, so it is not computed, but its
        # tokens still count in the batch's mean, as they would in a batch computed whole.
        selected = [i for i in trained if advantages[i] != 0.0 or use_kl]
        pending = self._pending
        pending.tokens += sum(sum(rows[i]["loss_mask"]) for i in trained)
        pending.sequences += len(trained)
        pending.sequences_computed += len(selected)
        counts = torch.tensor([sum(rows[i]["loss_mask"]) for i in selected])
        weights = grpo.sequence_weights(self.config.grpo.loss_aggregation, counts).tolist()
        if not self.model.training:
            self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self._noise is not None:
            self._noise.before_call(trainable)
        lengths = [len(rows[i]["token_ids"]) for i in selected]
        for micro in grpo.micro_batches(lengths, self.config.grpo.token_budget):
            members = [selected[j] for j in micro]
            stats = self._backward(
                [rows[i] for i in members], [advantages[i] for i in members], [weights[j] for j in micro]
            )
            pending.add_micro_batch(stats)
        for key, value in group_stats.items():
            pending.groups[key] += value
        if self._noise is not None:
            self._noise.after_call(trainable, len({row["group_id"] for row in rows}))
        seconds = time.perf_counter() - started
        pending.seconds += seconds
        return {"learner/accumulate_seconds": seconds, "learner/pending_sequences": pending.sequences}

    def step(self) -> dict[str, float]:
        """Apply the accumulated gradient as one optimizer step; the adapter becomes version N+1."""
        started = time.perf_counter()
        pending, self._pending = self._pending, PendingStep()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        nan = float("nan")
        noise_metrics = self._noise.step_metrics(trainable) if self._noise is not None else {}
        denominator = grpo.loss_denominator(
            self.config.grpo.loss_aggregation, pending.tokens, pending.sequences
        )
        grad_norm = 0.0
        if pending.sequences > 0:
            for parameter in trainable:
                if parameter.grad is not None:
                    parameter.grad.div_(denominator)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, self.config.grpo.max_grad_norm))
        # Without gradients (every group tied) AdamW skips every parameter; stepping anyway keeps the
        # schedule counting training steps.
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.version += 1
        sums, micro = pending.sums, pending.micro_batches
        # With every group tied and skipped no token was computed: there is no ratio to average.
        return {
            "learner/loss": sums["loss"] / denominator,
            "learner/kl": sums["kl"] / denominator,
            "learner/grad_norm": grad_norm,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/clip_fraction": sums["clip_fraction"] / micro if micro else nan,
            "learner/ratio_mean": sums["ratio_mean"] / micro if micro else nan,
            "learner/ratio_max": pending.ratio_max,
            "learner/masked_by_cap": sums["masked_by_cap"],
            "learner/truncated_tokens": sums["truncated_tokens"],
            "learner/masked_sequences": sums["masked_sequences"],
            "learner/tokens": float(pending.tokens),
            "learner/sequences": float(pending.sequences),
            "learner/sequences_computed": float(pending.sequences_computed),
            "learner/seconds": pending.seconds + time.perf_counter() - started,
            "groups/total": pending.groups["groups/total"],
            "groups/zero_advantage": pending.groups["groups/zero_advantage"],
            "groups/trained": pending.groups["groups/trained"],
            **noise_metrics,
        }

    def _advantages(self, rows: list[dict]) -> tuple[list[float | None], dict[str, float], set[str]]:
        """Advantage per row (None for rows excluded: failed episodes, groups with < 2 valid), the
        group metrics, and the ids of the tied groups (all rewards equal, so all advantages zero)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            if row["valid"]:
                groups[row["group_id"]].append(index)
        advantages: list[float | None] = [None] * len(rows)
        tied: set[str] = set()
        for group_id, members in groups.items():
            if len(members) < 2:
                continue
            rewards = torch.tensor([rows[i]["reward"] for i in members], dtype=torch.float32)
            if bool(grpo.zero_advantage_groups(rewards, len(members))[0]):
                tied.add(group_id)
            values = grpo.group_advantages(
                rewards,
                len(members),
                scale_by_std=self.config.grpo.scale_rewards,
                eps=self.config.grpo.advantage_eps,
            )
            for i, value in zip(members, values.tolist(), strict=True):
                advantages[i] = value
        all_groups = {row["group_id"] for row in rows}
        stats = {
            "groups/total": float(len(all_groups)),
            "groups/zero_advantage": float(len(tied)),
            "groups/trained": float(len([m for m in groups.values() if len(m) >= 2]) - len(tied)),
        }
        return advantages, stats, tied

    def _backward(self, rows: list[dict], advantages: list[float], weights: list[float]) -> dict[str, float]:
        """Backpropagate the summed, weighted (not yet normalised) loss of one micro-batch: each episode's
        tokens weigh ``weights[i]`` (:func:`grpodx.algo.grpo.sequence_weights`)."""
        width = max(len(r["token_ids"]) for r in rows)
        pad = 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        behaviour = torch.zeros((len(rows), width), dtype=torch.float32)
        for row_index, row in enumerate(rows):
            n = len(row["token_ids"])
            input_ids[row_index, :n] = torch.tensor(row["token_ids"])
            attention[row_index, :n] = 1
            loss_mask[row_index, :n] = torch.tensor(row["loss_mask"], dtype=torch.bool)
            behaviour[row_index, :n] = torch.tensor(row["behaviour_logprobs"])
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        loss_mask, behaviour = loss_mask.to(self.device), behaviour.to(self.device)
        weight = torch.tensor(weights, dtype=torch.float32, device=self.device)
        # The clipped objective is positively homogeneous in the advantage: weighting the advantage
        # weights the episode's policy-loss tokens.
        advantage = torch.tensor(advantages, dtype=torch.float32, device=self.device) * weight

        logprobs = self._loss_token_logprobs(input_ids, attention, loss_mask)
        loss, stats = grpo.policy_loss(
            logprobs,
            behaviour,
            advantage,
            loss_mask,
            clip_low=self.config.grpo.clip_low,
            clip_high=self.config.grpo.clip_high,
            num_tokens=1,
            ratio_cap=self.config.grpo.ratio_cap,
            truncate_at=self.config.grpo.truncated_is_cap,
            sequence_bounds=self.config.grpo.sequence_ratio_bounds,
        )
        kl_value = 0.0
        if self.config.grpo.kl_coef > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref_logprobs = self._loss_token_logprobs(input_ids, attention, loss_mask)
            kl = (grpo.kl_per_sequence(logprobs, ref_logprobs, loss_mask) * weight).sum()
            loss = loss + self.config.grpo.kl_coef * kl
            kl_value = float(kl.detach())
        loss.backward()
        return {
            "loss": float(loss.detach()),
            "kl": kl_value,
            "clip_fraction": float(stats["clip_fraction"]),
            "ratio_mean": float(stats["ratio_mean"]),
            "ratio_max": float(stats["ratio_max"]),
            "masked_by_cap": float(stats["masked_by_cap"]),
            "truncated_tokens": float(stats["truncated"]),
            "masked_sequences": float(stats["masked_sequences"]),
        }

    def _loss_token_logprobs(
        self, input_ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, T] logprobs of the tokens in ``loss_mask`` (0.0 at the others; nothing reads them).

        Where the output layer is a plain linear map of the last hidden state, it runs only at the
        positions that predict a loss token: in a dialogue more than half the tokens are the prompt's and
        the patient's, and the vocabulary-sized layer is about 40% of the tiny doctor's compute and, with
        Phi-4's 100k vocabulary, a large part of the learner's activation memory.
        """
        if not self._output_layer_on_loss_tokens:
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            return grpo.sequence_logprobs(logits, input_ids, self.temperature)
        base = self.model.get_base_model()
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        predicts = loss_mask[:, 1:]  # position t - 1 predicts token t
        logits = base.get_output_embeddings()(hidden[:, :-1][predicts])
        values = grpo.target_logprobs(logits, input_ids[:, 1:][predicts], self.temperature)
        positions = torch.cat([torch.zeros_like(loss_mask[:, :1]), predicts], dim=1)
        return values.new_zeros(input_ids.shape).masked_scatter(positions, values)

    @torch.no_grad()
    def token_logprobs(self, token_ids: list[int], adapter: bool = True) -> list[float]:
        """Logprobs the learner gives each token of one sequence (position 0 is 0.0): for parity checks."""
        ids = torch.tensor([token_ids], device=self.device)
        context = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with context:
            logits = self.model(input_ids=ids).logits
        return grpo.sequence_logprobs(logits, ids, self.temperature)[0].tolist()

    # ---- publishing and checkpoints -------------------------------------------------------------
    def adapter(self, copy: bool = True) -> AdapterWeights:
        """The LoRA tensors as CPU copies; ``copy=False`` gives the live parameters (on the learner's
        device) to a caller that copies them at once, as :func:`grpodx.adapter_transport.pack` does."""
        state = {k: v.detach() for k, v in get_peft_model_state_dict(self.model).items()}
        if copy:
            state = {k: v.to("cpu", copy=True) for k, v in state.items()}
        return AdapterWeights(version=self.version, state_dict=state, peft_config=dict(self.peft_config))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / ADAPTER_DIR)
        torch.save(
            {
                "version": self.version,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            directory / LEARNER_STATE_FILE,
        )

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        state_file = directory / LEARNER_STATE_FILE
        if not state_file.is_file() or not (directory / ADAPTER_DIR).is_dir():
            raise FileNotFoundError(
                f"{directory} is not a GRPODx checkpoint (needs {ADAPTER_DIR}/ and {LEARNER_STATE_FILE}); "
                "pass a directory under <run>/checkpoints/ to --load-checkpoint"
            )
        weights = load_peft_weights(str(directory / ADAPTER_DIR), device=str(self.device))
        check_adapter_keys(self.model, weights, str(directory / ADAPTER_DIR))
        set_peft_model_state_dict(self.model, weights)
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
