"""Learner speed: doctor tokens per second of the GRPO update, with where the time goes.

``Learner.train_step`` runs on real trajectories, generated once by ``RolloutWorker.run_groups`` with
the offline patient and judge, the size of one training step of the config. Doctor tokens are the
loss-mask tokens the step trains on. The step's time is split by hooks around the model's forward
passes (the policy's, with gradients, and the adapter-free reference's for the KL term) and around
``backward``; the rest is data preparation, log-softmax and loss, and the optimizer step.

With ``--device cuda`` (and a GPU), a randomly initialised model with Phi-4's shapes, bf16, gradient
checkpointing and a rank-16 LoRA, is also timed on synthetic trajectories.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import pyarrow as pa
import torch

from grpodx.bench.core import (
    BenchContext,
    Benchmark,
    BenchResult,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    stat,
    torch_threads,
)
from grpodx.bench.weight_push import PHI4_SHAPES
from grpodx.config import Config
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.rollout import Scenario

# The rest of microsoft/phi-4's config.json beyond the LoRA-relevant shapes.
PHI4_MODEL = {**PHI4_SHAPES, "vocab_size": 100352, "max_position_embeddings": 16384, "rope_theta": 250000.0}
# What configs/phi4.yaml sets for the learner.
PHI4_LEARNER_OVERRIDES = [
    "model.dtype=bfloat16",
    "model.gradient_checkpointing=true",
    "lora.rank=16",
    "lora.alpha=32",
    "grpo.num_generations=4",
    "grpo.kl_coef=0.0",
    "grpo.token_budget=16384",
    "train.batch_size=16",
    "episode.sampling.temperature=0.8",
]


@dataclass(frozen=True)
class Sizes:
    groups: int | None  # None: the config's train.batch_size
    gpu_groups: int
    gpu_length: int


SIZES = {
    "full": Sizes(groups=None, gpu_groups=8, gpu_length=2048),
    "quick": Sizes(groups=2, gpu_groups=4, gpu_length=1024),
    "smoke": Sizes(groups=1, gpu_groups=1, gpu_length=64),
}


def real_trajectories(config: Config, model_source: str, groups: int) -> pa.Table:
    """``groups`` groups of ``grpo.num_generations`` episodes, from the offline patient and judge."""
    from grpodx.env import make_judge, make_patient
    from grpodx.rollout import RolloutWorker

    worker = RolloutWorker("bench", config, model_source, make_patient(config), make_judge(config))
    sampler = CaseSampler(load_knowledge_base(), "train", config.train.seed)
    scenarios = [
        Scenario(0, f"learner-g{i}", sampler.sample(), config.grpo.num_generations, 0, config.train.seed)
        for i in range(groups)
    ]
    return pa.Table.from_batches([asyncio.run(worker.run_groups(scenarios))])


def synthetic_trajectories(
    groups: int, group_size: int, length: int, vocab_size: int, seed: int = 0
) -> pa.Table:
    """Trajectories with TRAJECTORY_SCHEMA: random tokens, prompt and doctor spans taking turns (half the
    tokens are the doctor's), rewards 0 and 1 in turn so that every group has an advantage."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    span = max(1, length // 8)
    for group in range(groups):
        for index in range(group_size):
            ids = torch.randint(1, vocab_size, (length,), generator=generator).tolist()
            mask = [int((position // span) % 2 == 1) for position in range(length)]
            rows.append(
                {
                    **{field.name: None for field in TRAJECTORY_SCHEMA},
                    "step": 0,
                    "group_id": f"synthetic-{group}",
                    "sample_index": index,
                    "worker_id": "bench",
                    "policy_version": 0,
                    "reward": float(index % 2),
                    "valid": True,
                    "num_tokens": length,
                    "num_doctor_tokens": sum(mask),
                    "token_ids": ids,
                    "loss_mask": mask,
                    "behaviour_logprobs": [-2.0 if m else 0.0 for m in mask],
                }
            )
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


@contextlib.contextmanager
def phase_timer(*modules: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds spent in the forward passes of ``modules`` (with and without gradients) and in ``backward``.

    Pass modules that never call one another: the learner runs the decoder and the output layer
    separately (the output layer only where a loss token is predicted), so the two are timed apart.
    """
    times: dict[str, float] = defaultdict(float)
    began: list[float] = []

    def before(module, args):
        began.append(time.perf_counter())

    def after(module, args, output):
        phase = "forward" if torch.is_grad_enabled() else "reference_forward"
        times[phase] += time.perf_counter() - began.pop()

    original_backward = torch.Tensor.backward

    def timed_backward(tensor, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original_backward(tensor, *args, **kwargs)
        finally:
            times["backward"] += time.perf_counter() - started

    hooks = [
        hook
        for m in modules
        for hook in (m.register_forward_pre_hook(before), m.register_forward_hook(after))
    ]
    torch.Tensor.backward = timed_backward  # only for the timed block: Learner calls loss.backward()
    try:
        yield times
    finally:
        torch.Tensor.backward = original_backward
        for hook in hooks:
            hook.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(learner, table: pa.Table, repeats: int) -> dict[str, list[float]]:
    """One warm-up step, then ``repeats`` timed ``train_step`` calls on the same trajectories."""
    learner.train_step(table)
    _sync(learner.device)
    measured: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        base = learner.model.get_base_model()
        with phase_timer(base.get_decoder(), base.get_output_embeddings()) as phases:
            started = time.perf_counter()
            metrics = learner.train_step(table)
            _sync(learner.device)
            elapsed = time.perf_counter() - started
        measured["seconds"].append(elapsed)
        measured["doctor_tokens"].append(metrics["learner/tokens"])
        measured["sequences"].append(metrics["learner/sequences"])
        for phase in ("forward", "reference_forward", "backward"):
            measured[phase].append(phases.get(phase, 0.0))
        measured["other"].append(elapsed - sum(phases.values()))
    return measured


def _row(
    label: str,
    device: str,
    table: pa.Table,
    measured: dict[str, list[float]],
    peak: float | None,
    before: float | None,
) -> dict:
    seconds = measured["seconds"]
    all_tokens = sum(len(ids) for ids in table.column("token_ids").to_pylist())
    return {
        "model": label,
        "device": device,
        "sequences": int(measured["sequences"][0]),
        "doctor_tokens": int(measured["doctor_tokens"][0]),
        "all_tokens": all_tokens,
        "step_s": stat(seconds),
        "doctor_tokens_per_s": stat([t / s for t, s in zip(measured["doctor_tokens"], seconds, strict=True)]),
        "all_tokens_per_s": stat([all_tokens / s for s in seconds]),
        "forward_s": stat(measured["forward"]),
        "reference_forward_s": stat(measured["reference_forward"]),
        "backward_s": stat(measured["backward"]),
        "other_s": stat(measured["other"]),
        "memory": "GPU allocated" if device.startswith("cuda") else "process RSS",
        "memory_before_mib": before,
        "peak_mib": peak,
    }


def random_phi_model(shapes: dict, dtype: torch.dtype, device: str | torch.device):
    """A randomly initialised Phi3ForCausalLM of the given shapes, made directly on ``device``."""
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def phi_shaped_row(ctx: BenchContext, device: str, shapes: dict = PHI4_MODEL) -> dict:
    """The learner on a random model of ``shapes`` (Phi-4's by default) with synthetic trajectories.

    No checkpoint is read: the learner's model loader is replaced, for this call only, by one that
    builds the random model on ``device``.
    """
    from grpodx.learner import Learner

    sizes = SIZES[ctx.scale]
    config = ctx.derive(PHI4_LEARNER_OVERRIDES)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def load_random(source, dtype_name, load_device):
        return random_phi_model(shapes, dtype, load_device), None

    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with mock.patch("grpodx.learner.load_doctor", load_random):
        learner = Learner(config, "random-phi4-shaped", device=device)
    table = synthetic_trajectories(
        sizes.gpu_groups, config.grpo.num_generations, sizes.gpu_length, shapes["vocab_size"]
    )
    before = torch.cuda.memory_allocated() / 2**20 if on_gpu else None
    measured = time_steps(learner, table, ctx.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    label = "Phi-4-shaped, random init" if shapes is PHI4_MODEL else "Phi-shaped (small), random init"
    row = _row(f"{label}, {str(dtype).removeprefix('torch.')}", device, table, measured, peak, before)
    del learner
    return row


def run(ctx: BenchContext) -> BenchResult:
    from grpodx.learner import Learner

    sizes = SIZES[ctx.scale]
    # Every group trained, tied or not: what is timed is the learner's work per doctor token, and a
    # small step of real episodes can tie all its groups (the default skips those, timing nothing).
    config = ctx.derive(["grpo.skip_tied_groups=false"])
    groups = sizes.groups or config.train.batch_size
    ctx.log(f"learner: generating {groups} × {config.grpo.num_generations} trajectories")
    with torch_threads(config.ray.rollout_threads):
        table = real_trajectories(config, ctx.model_source, groups)
    notes = []
    on_gpu = ctx.device == "cuda"
    with torch_threads(config.ray.learner_threads):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        peak_reset = reset_peak_rss()
        learner = Learner(config, ctx.model_source, device=ctx.device)
        before = torch.cuda.memory_allocated() / 2**20 if on_gpu else rss_mib()
        measured = time_steps(learner, table, ctx.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mib()
        row = _row("tiny doctor + LoRA", str(learner.device), table, measured, peak, before)
        del learner
    rows = [row]
    notes.append(
        f"Tiny doctor: {groups} groups × {config.grpo.num_generations} real episodes (one training step of "
        f"the config), lora.rank {config.lora.rank}, kl_coef {config.grpo.kl_coef:g}, token_budget "
        f"{config.grpo.token_budget}, torch threads {config.ray.learner_threads or 'default'} (the learner "
        "actor's setting); one warm-up step, then the median over repeats."
    )
    notes.append(
        "Doctor tokens/s = loss-mask tokens trained on ÷ train_step seconds; all tokens/s counts every "
        "position of the sequences (the forward passes process all of them)."
    )
    notes.append(
        "Split: forward = the policy's forward passes (with gradients); reference = the adapter-free "
        "forward for the KL term (0 without KL); backward = loss.backward(); other = the rest of train_step "
        "(Arrow to rows, advantages, padding, log-softmax and loss, gradient clipping, optimizer step)."
    )
    rss_note = (
        "Memory (CPU): the benchmark process's resident memory once the learner is built (before its first "
        "step), and its peak while the learner was built and stepped (the kernel's peak mark, reset just "
        "before): the process also holds the libraries and whatever earlier benchmarks left"
        if peak_reset or on_gpu
        else "Memory (CPU): peak is the process's lifetime peak (this kernel did not let it be reset)"
    )
    notes.append(rss_note + ". On a GPU: torch.cuda memory allocated, measured the same way.")
    if ctx.device == "cuda":
        if torch.cuda.is_available():
            ctx.log("learner: Phi-4-shaped random model on the GPU")
            rows.append(phi_shaped_row(ctx, "cuda"))
            notes.append(
                "Phi-4-shaped: microsoft/phi-4's shapes, random weights made on the GPU (no checkpoint), "
                "bf16, gradient checkpointing, LoRA r16 on the fused modules, the learner settings of "
                f"configs/phi4.yaml; synthetic trajectories of {SIZES[ctx.scale].gpu_length} tokens, half of "
                "them doctor tokens."
            )
        else:
            notes.append("--device cuda was asked for but no CUDA GPU is visible: no Phi-4-shaped run.")
    else:
        notes.append(
            "No GPU run here: with --device cuda and a CUDA GPU, a randomly initialised Phi-4-shaped model "
            "(bf16, LoRA r16, gradient checkpointing) is timed as well."
        )
    return BenchResult(
        rows=rows,
        columns=[
            ("model", "model"),
            ("device", "device"),
            ("sequences", "sequences"),
            ("doctor_tokens", "doctor tokens"),
            ("all_tokens", "all tokens"),
            ("step_s", "step s"),
            ("doctor_tokens_per_s", "doctor tokens/s"),
            ("all_tokens_per_s", "all tokens/s"),
            ("forward_s", "forward s"),
            ("reference_forward_s", "reference s"),
            ("backward_s", "backward s"),
            ("other_s", "other s"),
            ("memory", "memory"),
            ("memory_before_mib", "before MiB"),
            ("peak_mib", "peak MiB"),
        ],
        notes=notes,
    )


BENCHMARK = Benchmark(
    name="learner",
    title="GRPO update speed",
    measures="Doctor (loss-mask) tokens per second of Learner.train_step on one training step's "
    "trajectories, with the forward/backward split and peak memory.",
    run=run,
)
