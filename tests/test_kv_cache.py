"""The transformers engine's preallocated key/value cache, and finished rows leaving a running batch."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import Qwen2Config

from grpodx.algo.grpo import sequence_logprobs
from grpodx.engines.base import SamplingParams
from grpodx.engines.hf import HFEngine
from grpodx.engines.kv_cache import full_attention_only, preallocated_cache
from grpodx.models import load_doctor


def _decode(model, input_ids, attention, steps, cache=None, drop_after=None):
    """Greedy decode; after step ``drop_after`` only even rows go on (as finished rows leave a batch).
    Returns the logits of every step, one [rows, vocab] tensor each."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    logits = [out.logits[:, -1]]
    for step in range(steps):
        tokens = logits[-1].argmax(-1, keepdim=True)
        if step == drop_after:
            keep = torch.arange(0, tokens.shape[0], 2)
            out.past_key_values.batch_select_indices(keep)
            tokens, attention, positions = tokens[keep], attention[keep], positions[keep]
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("reserve", [1, 3, 64])
@torch.inference_mode()
def test_preallocated_cache_decodes_exactly_like_the_dynamic_cache(small_model_dir, reserve):
    """Bit-identical logits, left padding included, whether the buffer has room for the whole turn (64)
    or must grow every few tokens (1, 3), and after rows leave the batch mid-turn."""
    model, _ = load_doctor(str(small_model_dir))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 200, (4, 9), generator=generator)
    attention = torch.ones_like(input_ids)
    attention[1, :4] = 0
    attention[3, :2] = 0
    layers = model.config.num_hidden_layers
    for drop_after in (None, 4):
        expected = _decode(model, input_ids, attention, 10, drop_after=drop_after)
        cache = preallocated_cache(layers, reserve)
        actual = _decode(model, input_ids, attention, 10, cache, drop_after=drop_after)
        assert len(actual) == len(expected) == 11
        for got, want in zip(actual, expected, strict=True):
            assert torch.equal(got, want)
    assert cache.get_seq_length() == 9 + 10


def test_only_full_attention_models_get_the_preallocated_cache(small_model_dir):
    model, _ = load_doctor(str(small_model_dir))
    assert full_attention_only(model.config)
    sliding = Qwen2Config(
        use_sliding_window=True, sliding_window=16, max_window_layers=0, num_hidden_layers=2
    )
    assert not full_attention_only(sliding)
    assert full_attention_only(Qwen2Config(use_sliding_window=False, num_hidden_layers=2))


def test_finished_rows_leave_the_batch_without_changing_the_others(small_model_dir):
    """Eight seeded requests with budgets of 1 to 15 tokens in one batch: each samples what it samples
    alone, and its recorded logprobs are those of a full forward pass over its own tokens (a row that
    read another row's cache after the batch shrank would fail both)."""
    model, tokenizer = load_doctor(str(small_model_dir))
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, max_batch_size=8, seed=0)
    texts = ["fever", "a long story about a cough that began last week", "rash", "chest pain at night"]
    prompts = [tokenizer.encode(f"<|im_start|>user<|im_sep|>{texts[i % 4]}<|im_end|>") for i in range(8)]
    samplings = [SamplingParams(temperature=1.0, max_new_tokens=1 + 2 * i, seed=i) for i in range(8)]

    async def together():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, samplings, strict=True)))

    async def alone(index):
        return await engine.generate(prompts[index], samplings[index])

    batched = asyncio.run(together())
    for index, generation in enumerate(batched):
        assert len(generation.token_ids) == 1 + 2 * index
        assert generation.token_ids == asyncio.run(alone(index)).token_ids
        ids = torch.tensor([prompts[index] + generation.token_ids])
        with torch.no_grad():
            full = sequence_logprobs(engine.model(input_ids=ids).logits, ids, temperature=1.0)
        assert torch.allclose(full[0, len(prompts[index]) :], torch.tensor(generation.logprobs), atol=1e-4)
