"""Other backbones train with a config change only: LoRA targets default per architecture."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpodx.config import ConfigError, load_config
from grpodx.engines.base import SamplingParams
from grpodx.engines.hf import HFEngine
from grpodx.learner import Learner
from grpodx.models import load_doctor, lora_target_modules
from tests.test_learner import _adapter_vector, _rows, _table

ARCHITECTURES = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def _save_backbone(arch, tokenizer, directory):
    config_cls, model_cls, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_cls(
        config_cls(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_learner_and_engine_on_another_backbone(arch, small_tokenizer, tmp_path):
    expected = ARCHITECTURES[arch][2]
    _save_backbone(arch, small_tokenizer, tmp_path)
    config = load_config(None, ["lora.rank=4", "grpo.lr=1e-2", f"model.name={tmp_path}"])
    learner = Learner(config, str(tmp_path), device="cpu")
    targets = learner.peft_config["target_modules"]
    assert sorted(targets) == sorted(expected)
    adapted = {name.split(".")[-4] for name, _ in learner.model.named_parameters() if "lora_A" in name}
    assert adapted == set(expected)

    before = _adapter_vector(learner)
    learner.train_step(_table(_rows([1, 0, 0, 0], 4, learner)))
    assert not torch.equal(before, _adapter_vector(learner))

    # The adapter the learner publishes loads in the generation engine of the same backbone.
    base, tokenizer = load_doctor(str(tmp_path))
    engine = HFEngine(base, pad_token_id=tokenizer.pad_token_id)
    engine.load_adapter(learner.adapter())
    generation = asyncio.run(engine.generate([5, 6, 7], SamplingParams(max_new_tokens=4, seed=0)))
    assert generation.adapter_version == 1 and len(generation.token_ids) == 4


@pytest.mark.parametrize("arch", ["phi3", *sorted(ARCHITECTURES)])
def test_output_layer_on_loss_tokens_only_matches_the_full_forward(
    arch, small_model_dir, small_tokenizer, tmp_path
):
    """The learner runs the output layer only where a loss token is predicted; its logprobs and their
    gradient are the full forward's, with turns (mask holes) and right padding, adapter on and off."""
    from grpodx.algo import grpo

    directory = small_model_dir
    if arch != "phi3":
        directory = tmp_path
        _save_backbone(arch, small_tokenizer, directory)
    learner = Learner(load_config(None, ["lora.rank=4", f"model.name={directory}"]), str(directory), "cpu")
    assert learner._output_layer_on_loss_tokens
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=generator)
    ids = torch.randint(5, 300, (3, 14), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0  # right padding
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:6] = mask[:, 8:10] = True  # two doctor turns
    mask[2, 12:] = True
    mask[1, 10:] = False
    learner.model.train()
    fast = learner._loss_token_logprobs(ids, attention, mask)
    fast_grads = torch.autograd.grad(
        (fast * mask).sum(), [p for p in learner.model.parameters() if p.requires_grad]
    )
    full = grpo.sequence_logprobs(
        learner.model(input_ids=ids, attention_mask=attention).logits, ids, learner.temperature
    )
    full_grads = torch.autograd.grad(
        (full * mask).sum(), [p for p in learner.model.parameters() if p.requires_grad]
    )
    assert torch.allclose(fast[mask], full[mask], atol=1e-5)
    assert torch.equal(fast[~mask], torch.zeros_like(fast[~mask]))
    for a, b in zip(fast_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), learner.model.disable_adapter():
        reference = learner._loss_token_logprobs(ids, attention, mask)
        full_reference = grpo.sequence_logprobs(
            learner.model(input_ids=ids, attention_mask=attention).logits, ids, 1.0
        )
    assert torch.allclose(reference[mask], full_reference[mask], atol=1e-5)
    assert not torch.allclose(reference[mask], fast[mask], atol=1e-3)  # the adapter does matter


def test_phi3_uses_fused_module_names():
    assert lora_target_modules("phi3", None) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_unknown_architecture_asks_for_explicit_targets():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        lora_target_modules("mamba", None)
    assert lora_target_modules("mamba", ["in_proj"]) == ["in_proj"]
