"""Shared fixtures: a small random Phi-3 doctor for fast engine/learner tests, and config helpers."""

from __future__ import annotations

import os

# No test reaches the Hugging Face Hub (nothing but loopback is allowed); a model that is not on disk
# must fail as "not found", at once. Set before transformers is imported, which reads it then.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch

from grpodx.config import TinyDoctorConfig
from grpodx.dialogue import DOCTOR_SYSTEM_PROMPT, render_message
from grpodx.tiny.model import build_model, train_tokenizer

_CORPUS = [
    render_message("system", DOCTOR_SYSTEM_PROMPT),
    render_message("user", "I am a 40-year-old woman. I came in because of chest pain."),
    render_message("assistant", "<reason>Chest pain. Consider GERD.</reason> Do you have a fever?"),
    render_message("assistant", "Final diagnosis: Influenza. Next steps: rapid influenza test."),
    "Yes, I have had a fever. No, I don't have a cough. shortness of breath headache nausea",
]


@pytest.fixture(scope="session")
def small_tokenizer():
    return train_tokenizer(_CORPUS * 4, vocab_size=400)


def save_random_doctor(directory, tokenizer, config: TinyDoctorConfig):
    """A random (untrained) Phi3ForCausalLM saved like the tiny doctor: tokenizer + weights."""
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def actor_pid(handle) -> int:
    """The pid of a Ray actor's process, asked from the actor itself (to stop or inspect it)."""
    import ray

    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))


def small_run_settings(model_dir, run_dir, run_name: str, *extra: str) -> list[str]:
    """key=value overrides of a short Ray training run of the small doctor (two rollout workers, batches
    of 3 groups of 2 two-turn episodes, no evaluation); ``extra`` comes last, so it wins."""
    return [
        f"model.name={model_dir}",
        f"train.run_dir={run_dir}",
        f"train.run_name={run_name}",
        "train.batch_size=3",
        "train.eval_cases=0",
        "grpo.num_generations=2",
        "lora.rank=4",
        "episode.max_turns=2",
        "episode.sampling.max_new_tokens=6",
        "ray.num_rollout_workers=2",
        "ray.rollout_num_cpus=1",
        "ray.learner_num_cpus=1",
        *extra,
    ]


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, small_tokenizer):
    config = TinyDoctorConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=3)
    return save_random_doctor(tmp_path_factory.mktemp("small-doctor"), small_tokenizer, config)


def save_perturbed_adapter(directory, model_dir, seed: int, scale: float = 1.0):
    """A LoRA on ``model_dir`` with random B matrices (a fresh one is zero and changes nothing), saved
    by peft like a checkpoint's adapter."""
    from peft import LoraConfig, get_peft_model

    from grpodx.models import load_doctor

    model, _ = load_doctor(str(model_dir))
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loopback():
    """Our Chat Completions server on 127.0.0.1, one per test module."""
    from grpodx.testing.loopback import OpenAICompatibleServer

    with OpenAICompatibleServer() as server:
        yield server


@pytest.fixture
def server(loopback):
    """The module's loopback server, with no requests or queued faults left from another test."""
    loopback.reset()
    yield loopback
    loopback.reset()
