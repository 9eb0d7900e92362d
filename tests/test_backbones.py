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


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_learner_and_engine_on_another_backbone(arch, small_tokenizer, tmp_path):
    config_cls, model_cls, expected = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_cls(
        config_cls(
            vocab_size=len(small_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=small_tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)

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


def test_phi3_uses_fused_module_names():
    assert lora_target_modules("phi3", None) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_unknown_architecture_asks_for_explicit_targets():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        lora_target_modules("mamba", None)
    assert lora_target_modules("mamba", ["in_proj"]) == ["in_proj"]
