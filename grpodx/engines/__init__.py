"""Generation engines behind one interface (:mod:`grpodx.engines.base`)."""

from __future__ import annotations

from grpodx.config import Config
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
        )
    raise NotImplementedError(
        f"engine.kind={config.engine.kind!r} is not available in this build; use engine.kind=hf"
    )
