"""A trained doctor for tools outside GRPODx: a checkpoint's adapter alone, or merged into the base.

``export_checkpoint(config, checkpoint, out)`` writes the adapter of ``<checkpoint>/adapter/`` in
peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained`` and by vLLM's ``--lora-modules``); with ``merge=True`` it folds the
adapter into the base weights (``merge_and_unload``) and writes a plain transformers model directory
(weights, config, generation config, tokenizer, chat template), in ``model.dtype``, for tools that take
no adapters. Both write ``grpodx_export.json``: which base model the adapter belongs to, and where it
came from.

The adapter is checked against the model first, by name and shape, on PyTorch's ``meta`` device (no
weights read): peft loads non-strictly, so an adapter trained for another model would otherwise load
half or not at all without a word. Bad input is a :class:`~grpodx.config.ConfigError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from grpodx.config import Config, ConfigError
from grpodx.learner import ADAPTER_DIR

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "grpodx_export.json"


def run_config_of(checkpoint: str | Path) -> Path | None:
    """The ``config.yaml`` of the run a checkpoint belongs to (``runs/<run>/checkpoints/step-N``)."""
    candidate = Path(checkpoint).parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def adapter_directory(checkpoint: str | Path) -> Path:
    """``<checkpoint>/adapter``, or the checkpoint itself when it is an adapter directory."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise ConfigError(f"--checkpoint {checkpoint}: no such directory; pass runs/<run>/checkpoints/step-N")
    if (directory / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return directory / ADAPTER_DIR
    if (directory / ADAPTER_CONFIG).is_file():
        return directory
    raise ConfigError(
        f"--checkpoint {checkpoint}: holds no adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG} is missing); "
        "pass runs/<run>/checkpoints/step-N"
    )


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; pass a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; pass a new or empty directory")


def _lora_config(adapter_dir: Path, checkpoint: str | Path):
    from peft import LoraConfig

    try:
        saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        if saved.get("peft_type") != "LORA":
            raise ValueError(f"peft_type {saved.get('peft_type')!r}, not LORA")
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"--checkpoint {checkpoint}: {ADAPTER_DIR}/{ADAPTER_CONFIG} is not a peft LoRA config ({exc}); "
            "pass a checkpoint written by grpodx train"
        ) from None
    lora_config.base_model_name_or_path = None  # the training machine's path; set again when loaded
    return lora_config


def _saved_shapes(adapter_dir: Path, checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    from grpodx.preflight import safetensors_shapes

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(
            f"--checkpoint {checkpoint}: {ADAPTER_DIR}/{ADAPTER_WEIGHTS} is missing; "
            "pass a complete checkpoint"
        )
    try:
        return safetensors_shapes(weights.read_bytes(), str(weights))
    except ConfigError as exc:
        raise ConfigError(f"{exc}; export an earlier checkpoint") from None


def check_adapter_fits(model_config, lora_config, given: dict[str, tuple[int, ...]], where: str) -> None:
    """The adapter's tensors are exactly those ``lora_config`` puts on this model, with their shapes."""
    from grpodx.models import MissingLoraTargets, adapter_mismatch, lora_shapes

    try:
        expected = lora_shapes(model_config, lora_config)
    except MissingLoraTargets as exc:
        raise ConfigError(
            f"{where}: the adapter targets modules this {model_config.model_type} model does not have "
            f"({exc}); pass the --config (model.name) it was trained with"
        ) from None
    problems = adapter_mismatch(given, expected)
    if problems:
        raise ConfigError(
            f"{where}: the adapter does not fit this model: {problems}; pass the --config (model.name) it "
            "was trained with"
        )


def export_checkpoint(config: Config, checkpoint: str | Path, out: str | Path, merge: bool = False) -> dict:
    """Write the checkpoint's adapter (or, with ``merge``, the merged model) to ``out``; returns what
    ``grpodx_export.json`` says."""
    from grpodx.preflight import resolve_model

    out = Path(out)
    adapter_dir = adapter_directory(checkpoint)
    _check_out(out)
    source, model_config = resolve_model(config, progress=False)
    lora_config = _lora_config(adapter_dir, checkpoint)
    where = f"--checkpoint {checkpoint}"
    check_adapter_fits(model_config, lora_config, _saved_shapes(adapter_dir, checkpoint), where)

    targets = lora_config.target_modules  # a set of names, or a regex string
    info = {
        "format": "transformers (adapter merged)" if merge else "peft LoRA adapter",
        "base_model": config.model.name if config.model.name != "tiny" else source,
        "model_name": config.model.name,
        "model_type": model_config.model_type,
        "lora_rank": lora_config.r,
        "lora_alpha": lora_config.lora_alpha,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    if merge:
        info["dtype"] = config.model.dtype
    # Written beside ``out`` and renamed into place at the end: a failed export leaves no half a model.
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if merge:
            _write_merged(source, config.model.dtype, adapter_dir, lora_config, partial, where)
        else:
            _write_adapter(adapter_dir, info["base_model"], partial)
        (partial / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty: checked above
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info


def _write_adapter(adapter_dir: Path, base_model: str, target: Path) -> None:
    target.mkdir()
    shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS, target / ADAPTER_WEIGHTS)
    saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    # Where peft's AutoPeftModel finds the base: the model it was trained on as this config names it,
    # not the training machine's path.
    saved["base_model_name_or_path"] = base_model
    (target / ADAPTER_CONFIG).write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _write_merged(source: str, dtype: str, adapter_dir: Path, lora_config, target: Path, where: str) -> None:
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from grpodx.models import AdapterKeysError, check_adapter_keys, load_doctor

    base, tokenizer = load_doctor(source, dtype)
    peft_model = get_peft_model(base, lora_config)
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    try:
        check_adapter_keys(peft_model, weights, where)
    except AdapterKeysError as exc:  # the shapes matched on meta; only a changed file ends here
        raise ConfigError(str(exc)) from None
    set_peft_model_state_dict(peft_model, weights)
    merged = peft_model.merge_and_unload().eval()
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
