"""The transformers engine: logprobs of what it sampled, seeds, adapters by version."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from grpodx.algo.grpo import sequence_logprobs
from grpodx.dialogue import IM_END
from grpodx.engines.base import AdapterWeights, SamplingParams
from grpodx.engines.hf import HFEngine, sample_next_tokens
from grpodx.models import load_doctor

PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def _engine(small_model_dir, seed=0):
    model, tokenizer = load_doctor(str(small_model_dir))
    return HFEngine(model, pad_token_id=tokenizer.pad_token_id, max_batch_size=8, seed=seed), tokenizer


def _perturbed_adapter(small_model_dir, version: int, scale: float = 0.5) -> AdapterWeights:
    """A LoRA whose B matrices are non-zero, so it really changes the model (fresh ones do not)."""
    model, _ = load_doctor(str(small_model_dir))
    peft_model = get_peft_model(model, LoraConfig(**PEFT))
    generator = torch.Generator().manual_seed(version)
    state = get_peft_model_state_dict(peft_model)
    state = {
        k: (torch.randn(v.shape, generator=generator) * scale if "lora_B" in k else v)
        for k, v in state.items()
    }
    return AdapterWeights(version, state, PEFT)


def test_sample_next_tokens_greedy_and_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    uniform = torch.tensor([0.99, 0.0])
    tokens, logprobs = sample_next_tokens(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), uniform)
    assert tokens.tolist() == [1, 2]
    assert logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_inverse_cdf_draws_follow_the_tempered_distribution():
    """Each token is drawn as often as its probability at the row's temperature says (20,000 draws per
    row: a frequency off by more than 0.015 is > 4 standard errors)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(2, 1)
    temperature = torch.tensor([1.0, 0.5])
    expected = torch.softmax(logits / temperature.unsqueeze(-1), dim=-1)
    counts = torch.zeros_like(expected)
    uniforms = torch.rand((20_000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for uniform in uniforms:
        tokens, _ = sample_next_tokens(logits, temperature, torch.ones(2), uniform)
        counts[torch.arange(2), tokens] += 1
    assert torch.allclose(counts / len(uniforms), expected, atol=0.015)
    assert counts[:, 4].sum() == 0  # probability 0 is never drawn
    # The ends of [0, 1) land on the first and the last token that has any probability.
    edges = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64)
    tokens, _ = sample_next_tokens(logits, torch.ones(2), torch.ones(2), edges)
    assert tokens.tolist() == [0, 3]


def test_top_p_restricts_choices_but_not_the_recorded_logprob():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    seen = set()
    for seed in range(200):
        uniform = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        token, logprob = sample_next_tokens(logits, torch.tensor([1.0]), torch.tensor([0.5]), uniform)
        seen.add(token.item())
        assert logprob.item() == pytest.approx(torch.log(torch.tensor(0.6)).item(), abs=1e-6)
    assert seen == {0}
    # At 0.8 the two likeliest tokens stay, in proportion 0.6 : 0.3.
    draws = [
        sample_next_tokens(logits, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([u]))[0].item()
        for u in torch.linspace(0, 0.999, 1000).tolist()
    ]
    assert set(draws) == {0, 1} and draws.count(0) == pytest.approx(667, abs=2)


def test_engine_logprobs_match_a_full_forward(small_model_dir):
    engine, tokenizer = _engine(small_model_dir)
    prompt = tokenizer.encode("<|im_start|>user<|im_sep|>chest pain<|im_end|><|im_start|>assistant<|im_sep|>")
    sampling = SamplingParams(temperature=0.8, max_new_tokens=12, seed=11)

    async def run():
        return await engine.generate(prompt, sampling)

    generation = asyncio.run(run())
    ids = torch.tensor([prompt + generation.token_ids])
    with torch.no_grad():
        full = sequence_logprobs(engine.model(input_ids=ids).logits, ids, temperature=0.8)[0, len(prompt) :]
    assert torch.allclose(full, torch.tensor(generation.logprobs), atol=1e-4)


def test_seeded_requests_are_independent_of_batching(small_model_dir):
    engine, tokenizer = _engine(small_model_dir)
    prompt = tokenizer.encode("<|im_start|>user<|im_sep|>fever<|im_end|><|im_start|>assistant<|im_sep|>")
    other = tokenizer.encode("<|im_start|>user<|im_sep|>a much longer opening about headache<|im_end|>")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)

    async def alone():
        return await engine.generate(prompt, sampling)

    async def crowded():
        results = await asyncio.gather(
            engine.generate(other, SamplingParams(max_new_tokens=10, seed=1)),
            engine.generate(prompt, sampling),
            engine.generate(other, SamplingParams(max_new_tokens=3, seed=2)),
        )
        return results[1]

    assert asyncio.run(alone()).token_ids == asyncio.run(crowded()).token_ids


def test_stop_token_ends_generation(small_model_dir):
    engine, tokenizer = _engine(small_model_dir)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    prompt = tokenizer.encode("<|im_start|>user<|im_sep|>hello<|im_end|>")
    # With every token allowed as a stop token, generation must end after one token.
    sampling = SamplingParams(max_new_tokens=20, stop_token_ids=tuple(range(len(tokenizer))), seed=0)
    generation = asyncio.run(engine.generate(prompt, sampling))
    assert len(generation.token_ids) == 1 and generation.finish_reason == "stop"
    sampling = SamplingParams(max_new_tokens=5, stop_token_ids=(im_end,), seed=0, temperature=0.0)
    generation = asyncio.run(engine.generate(prompt, sampling))
    assert generation.finish_reason == ("stop" if generation.token_ids[-1] == im_end else "length")


def test_adapter_versions_change_outputs_and_requests_keep_theirs(small_model_dir):
    engine, tokenizer = _engine(small_model_dir)
    prompt = tokenizer.encode("<|im_start|>user<|im_sep|>chest pain<|im_end|><|im_start|>assistant<|im_sep|>")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)

    async def scenario():
        base = await engine.generate(prompt, sampling)
        engine.load_adapter(_perturbed_adapter(small_model_dir, 1))
        assert engine.latest_version == 1
        tuned = await engine.generate(prompt, sampling)
        # A request pinned to version 1 is in flight while version 2 arrives and 1 is unloaded.
        pinned = asyncio.ensure_future(engine.generate(prompt, sampling, adapter_version=1))
        await asyncio.sleep(0)
        engine.load_adapter(_perturbed_adapter(small_model_dir, 2))
        engine.unload_adapter(1)
        assert 1 in engine.loaded_versions()  # still in use: removal waits
        finished = await pinned
        assert 1 not in engine.loaded_versions()
        with pytest.raises(KeyError):
            await engine.generate(prompt, sampling, adapter_version=1)
        base_again = await engine.generate(prompt, sampling, adapter_version=0)
        return base, tuned, finished, base_again

    base, tuned, finished, base_again = asyncio.run(scenario())
    assert tuned.token_ids != base.token_ids
    assert finished.adapter_version == 1 and finished.token_ids == tuned.token_ids
    assert base_again.token_ids == base.token_ids


@pytest.mark.parametrize(("gap_s", "wait_s"), [(0.0, 0.0), (0.2, 1.0), (0.2, 0.012)])
def test_a_batch_waits_for_requests_that_keep_arriving(small_model_dir, gap_s, wait_s):
    """Turns arrive a few milliseconds apart (each after its own patient reply): with a gap they share
    one batch, without one the first starts alone; the wait caps how long a batch is held open."""
    engine, tokenizer = _engine(small_model_dir)
    engine.batch_gap_s, engine.batch_wait_s = gap_s, wait_s
    sizes = []
    decode = engine._decode

    def counting_decode(batch):
        sizes.append(len(batch))
        decode(batch)

    engine._decode = counting_decode
    prompt = tokenizer.encode("<|im_start|>user<|im_sep|>fever<|im_end|><|im_start|>assistant<|im_sep|>")

    async def staggered():
        async def arrive(delay, seed):
            await asyncio.sleep(delay)
            return await engine.generate(prompt, SamplingParams(max_new_tokens=4, seed=seed))

        return await asyncio.gather(*(arrive(0.01 * i, i) for i in range(4)))

    results = asyncio.run(staggered())
    assert sum(sizes) == 4
    if wait_s == 1.0:
        assert sizes == [4]  # each arrived 10 ms after the one before: well within the gap
    else:
        assert sizes[0] < 4  # started alone (no wait) or closed by the 12 ms cap
    assert all(len(r.token_ids) == 4 for r in results)
