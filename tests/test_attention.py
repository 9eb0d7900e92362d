"""Grouped-query attention without the key/value copies (grpodx.attention): chosen on CPU for grouped
models only, and the same numbers as transformers' own sdpa attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpodx.attention import GROUPED_SDPA
from grpodx.models import load_doctor, use_grouped_sdpa_on_cpu


def _padded_batch(vocab_size: int, rows: int = 4, length: int = 24, padded: bool = True):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (rows, length), generator=generator)
    attention = torch.ones(rows, length, dtype=torch.long)
    if padded:  # left padding, as the engine batches prompts; without it transformers passes no mask
        attention[: rows // 2, : length // 3] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


def _both(small_model_dir):
    grouped, _ = load_doctor(str(small_model_dir))
    reference, _ = load_doctor(str(small_model_dir))
    reference.set_attn_implementation("sdpa")
    return grouped, reference


def test_load_doctor_picks_the_grouped_attention_for_a_grouped_model_on_cpu(small_model_dir):
    model, _ = load_doctor(str(small_model_dir))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config._attn_implementation == GROUPED_SDPA


def test_a_model_without_grouped_heads_keeps_sdpa():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            attn_implementation="sdpa",
        )
    )
    use_grouped_sdpa_on_cpu(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("padded", [True, False])
def test_prefill_and_cached_decode_give_the_same_logits_as_sdpa(small_model_dir, padded):
    grouped, reference = _both(small_model_dir)
    ids, attention, positions = _padded_batch(grouped.config.vocab_size, padded=padded)
    outputs = []
    with torch.inference_mode():
        for model in (grouped, reference):
            prefill = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
            step_mask = torch.cat([attention, attention.new_ones((ids.shape[0], 1))], dim=1)
            decode = model(
                input_ids=prefill.logits[:, -1].argmax(-1, keepdim=True),
                attention_mask=step_mask,
                position_ids=positions[:, -1:] + 1,
                past_key_values=prefill.past_key_values,
                use_cache=True,
            )
            outputs.append((prefill.logits, decode.logits))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_gradients_match_sdpa(small_model_dir):
    grouped, reference = _both(small_model_dir)
    ids, attention, positions = _padded_batch(grouped.config.vocab_size)
    for model in (grouped, reference):
        model.train()
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        torch.log_softmax(logits, dim=-1)[..., 7].sum().backward()
    for (name, a), (_, b) in zip(grouped.named_parameters(), reference.named_parameters(), strict=True):
        # The backward sums the grouped heads in another order: equal up to float32 rounding.
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
