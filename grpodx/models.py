"""Where the doctor model comes from, and which modules its LoRA adapter targets.

``model.name: tiny`` is the embedded doctor, built and cached by :mod:`grpodx.tiny.build`; any other
name is a Hugging Face id or a local directory. LoRA targets default per architecture so that another
backbone trains with a config change only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from peft import get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from grpodx.config import Config, ConfigError

# Phi-3 / Phi-4 fuse q, k, v into qkv_proj and gate, up into gate_up_proj: an adapter trained on the
# unfused names would not load on microsoft/phi-4.
_FUSED_PHI = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "phi3": _FUSED_PHI,
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_target_modules(model_type: str, configured: list[str] | None) -> list[str]:
    if configured:
        return list(configured)
    if model_type not in LORA_TARGETS:
        raise ConfigError(
            f"no default LoRA target modules for architecture '{model_type}'; "
            f"set lora.target_modules (known defaults: {', '.join(sorted(LORA_TARGETS))})"
        )
    return list(LORA_TARGETS[model_type])


def doctor_source(config: Config, progress: bool = True) -> str:
    """Path or hub id of the doctor; builds the tiny doctor on first use."""
    if config.model.name == "tiny":
        from grpodx.tiny.build import tiny_doctor_path

        return str(tiny_doctor_path(config.model, config.episode, progress=progress))
    return config.model.name


def load_doctor(source: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """The base model (eval mode, no adapter) and its tokenizer."""
    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in a training log
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype]).to(device)
    use_grouped_sdpa_on_cpu(model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.eval(), tokenizer


def use_grouped_sdpa_on_cpu(model) -> None:
    """Let a grouped-query model on CPU that runs on transformers' ``sdpa`` attention read its shared
    key/value heads without copying them (:mod:`grpodx.attention`); other models, and models on a GPU,
    are left as they are."""
    from grpodx.attention import GROUPED_SDPA, uses_grouped_query_attention

    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and model.config._attn_implementation == "sdpa" and uses_grouped_query_attention(model.config):
        model.set_attn_implementation(GROUPED_SDPA)


def best_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class AdapterKeysError(ConfigError):
    """An adapter's tensors are not exactly those of the model's LoRA layers."""


def check_adapter_keys(peft_model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a partial or foreign adapter before it is loaded.

    peft loads non-strictly: a missing LoRA tensor would silently keep its initial value (a run would
    resume half-trained and save on), and an unknown one would be dropped.
    """
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}
    problems = adapter_mismatch({name: tuple(t.shape) for name, t in weights.items()}, expected)
    if problems:
        raise AdapterKeysError(
            f"{source}: the adapter does not match this model's LoRA layers: {problems}. Pass a "
            "complete adapter saved for this model and these lora settings"
        )


def adapter_mismatch(given: dict[str, tuple], expected: dict[str, tuple]) -> str:
    """What differs between an adapter's tensor shapes and those a model's LoRA layers expect ("" when
    nothing does): missing tensors, tensors with no place in the model, tensors of another shape."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(name for name in set(given) & set(expected) if given[name] != expected[name])
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {len(expected)} LoRA tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors this model has no place for (e.g. {unexpected[0]})")
    if wrong:
        name = wrong[0]
        problems.append(
            f"{len(wrong)} of another shape (e.g. {name}: {given[name]}, expected {expected[name]})"
        )
    return "; ".join(problems)


class MissingLoraTargets(ValueError):
    """peft found none of the LoRA target modules in the model (its message's first line)."""


def lora_shapes(
    model_config, lora_config, inspect_base: Callable[[torch.nn.Module], None] | None = None
) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor ``lora_config`` puts on a model of ``model_config``, built on the
    meta device: no weights are read or allocated. ``inspect_base`` sees the model before LoRA wraps it."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
        if inspect_base is not None:
            inspect_base(base)
        try:
            model = get_peft_model(base, lora_config)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise MissingLoraTargets(str(exc).splitlines()[0]) from None
    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}
