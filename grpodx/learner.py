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
from pathlib import Path

import pyarrow as pa
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights

from grpodx.algo import grpo
from grpodx.config import Config
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
        self._pending = self._new_pending()
        self._part_sq_norms: list[tuple[float, int]] = []
        # Running averages of the per-step |G|^2 and tr(Sigma) estimates (per accumulate call).
        self._noise_average = (0.0, 0.0)
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
        if isinstance(batches, pa.RecordBatch):
            batches = [batches]
        table = batches if isinstance(batches, pa.Table) else pa.Table.from_batches(batches)
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
        counts = [sum(rows[i]["loss_mask"]) for i in selected]
        pending = self._pending
        pending["tokens"] += sum(sum(rows[i]["loss_mask"]) for i in trained)
        pending["sequences"] += len(trained)
        pending["sequences_computed"] += len(selected)
        if self.config.grpo.loss_aggregation == "sequence-mean" and selected:
            # A / L_i per token: every episode weighs the same once step() divides by the episode count.
            scaled = grpo.sequence_mean_advantages(
                torch.tensor([advantages[i] for i in selected]), torch.tensor(counts)
            )
            total = max(1, sum(counts))
            for i, value in zip(selected, scaled.tolist(), strict=True):
                advantages[i] = value * len(selected) / total
        if not self.model.training:
            self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # This call's own gradient is the change it makes to the accumulated one; its squared norm, per
        # call (one group when the orchestrator streams them), feeds the gradient noise scale in step().
        before = [None if p.grad is None else p.grad.detach().clone() for p in trainable]
        lengths = [len(rows[i]["token_ids"]) for i in selected]
        for micro in grpo.micro_batches(lengths, self.config.grpo.token_budget):
            members = [selected[j] for j in micro]
            stats = self._backward([rows[i] for i in members], [advantages[i] for i in members])
            pending["ratio_max"] = max(pending["ratio_max"], stats.pop("ratio_max"))
            for key, value in stats.items():
                pending[key] += value
        for key, value in group_stats.items():
            pending[key] += value
        self._part_sq_norms.append((_squared_norm(trainable, before), len({row["group_id"] for row in rows})))
        seconds = time.perf_counter() - started
        pending["seconds"] += seconds
        return {"learner/accumulate_seconds": seconds, "learner/pending_sequences": pending["sequences"]}

    def step(self) -> dict[str, float]:
        """Apply the accumulated gradient as one optimizer step; the adapter becomes version N+1."""
        started = time.perf_counter()
        pending, self._pending = self._pending, self._new_pending()
        parts, self._part_sq_norms = self._part_sq_norms, []
        sequence_mean = self.config.grpo.loss_aggregation == "sequence-mean"
        denominator = pending["sequences"] if sequence_mean else pending["tokens"]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        noise_metrics = self._noise_scale(parts, _squared_norm(trainable))
        grad_norm = 0.0
        if denominator > 0:
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
        micro_count = max(1.0, pending["micro_batches"])
        norm = max(1.0, denominator)
        # With every group tied and skipped no token was computed: there is no ratio to average.
        computed = pending["micro_batches"] > 0
        return {
            "learner/loss": pending["loss"] / norm,
            "learner/kl": pending["kl"] / norm,
            "learner/grad_norm": grad_norm,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/clip_fraction": pending["clip_fraction"] / micro_count if computed else float("nan"),
            "learner/ratio_mean": pending["ratio_mean"] / micro_count if computed else float("nan"),
            "learner/ratio_max": pending["ratio_max"],
            "learner/masked_by_cap": pending["masked_by_cap"],
            "learner/truncated_tokens": pending["truncated_tokens"],
            "learner/masked_sequences": pending["masked_sequences"],
            "learner/tokens": float(pending["tokens"]),
            "learner/sequences": float(pending["sequences"]),
            "learner/sequences_computed": float(pending["sequences_computed"]),
            "learner/seconds": pending["seconds"] + time.perf_counter() - started,
            "groups/total": pending["groups/total"],
            "groups/zero_advantage": pending["groups/zero_advantage"],
            "groups/trained": pending["groups/trained"],
            **noise_metrics,
        }

    def _noise_scale(self, parts: list[tuple[float, int]], total_sq_norm: float) -> dict[str, float]:
        """Gradient noise scale in groups: how many groups a step needs before its signal beats its noise.

        Per step, unbiased estimates of |G|^2 and tr(Sigma) per group (from the accumulate calls, when
        each brought the same number of groups); the scale is the ratio of their running averages
        (exponential, 0.9), because one step's |G|^2 estimate is too noisy to divide by.
        """
        sizes = {groups for _, groups in parts}
        if len(parts) < 2 or len(sizes) != 1:
            nan = float("nan")
            return {
                "learner/grad_signal_sq": nan,
                "learner/grad_noise_trace": nan,
                "learner/noise_scale": nan,
            }
        signal, noise = grpo.gradient_noise_estimates([sq for sq, _ in parts], total_sq_norm)
        groups_per_part = sizes.pop()
        # Both averages start at 0 and so carry the same start-up bias, which cancels in the ratio.
        average_signal, average_noise = (
            0.9 * a + 0.1 * b for a, b in zip(self._noise_average, (signal, noise), strict=True)
        )
        self._noise_average = (average_signal, average_noise)
        return {
            "learner/grad_signal_sq": signal / groups_per_part**2,
            "learner/grad_noise_trace": noise / groups_per_part,
            "learner/noise_scale": (
                average_noise / average_signal * groups_per_part if average_signal > 0 else float("nan")
            ),
        }

    @staticmethod
    def _new_pending() -> defaultdict[str, float]:
        return defaultdict(float)

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

    def _backward(self, rows: list[dict], advantages: list[float]) -> dict[str, float]:
        """Backpropagate the summed (not yet normalised) loss of one micro-batch."""
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
        advantage = torch.tensor(advantages, dtype=torch.float32, device=self.device)

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
            if self.config.grpo.loss_aggregation == "sequence-mean":
                # Each episode's mean KL, summed; step() divides by the episode count.
                kl = sum(
                    grpo.kl_penalty(
                        logprobs[i : i + 1], ref_logprobs[i : i + 1], loss_mask[i : i + 1], num_tokens=None
                    )
                    for i in range(len(rows))
                )
            else:
                kl = grpo.kl_penalty(logprobs, ref_logprobs, loss_mask, num_tokens=1)
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
            "micro_batches": 1.0,
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
    def adapter(self) -> AdapterWeights:
        state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.model).items()}
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
