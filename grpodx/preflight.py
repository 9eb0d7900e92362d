"""Checks the driver makes before it starts Ray or writes anything: each bad setting ends here as one
sentence that names it, instead of as an actor's traceback minutes later.

What is checked: the run directory can be created, the doctor model resolves (config and tokenizer),
the LoRA rank fits the model's layers, and a checkpoint to resume from is whole and fits the adapter
the config builds. The shapes come from the model built on PyTorch's ``meta`` device: no weights are
read and no memory is taken, so Phi-4 is checked in a second.
"""

from __future__ import annotations

import json
import struct
import zipfile
from io import BytesIO
from pathlib import Path

import torch

from grpodx.config import Config, ConfigError
from grpodx.learner import ADAPTER_DIR, LEARNER_STATE_FILE
from grpodx.models import adapter_mismatch
from grpodx.storage import RunStorage

ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"
CHECKPOINT_STATE = "orchestrator.json"  # the driver's part of a checkpoint: step and case stream

# Files a tokenizer can load from; a model directory needs at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# ---- the run directory ------------------------------------------------------------------------
def open_run_root(run_dir: str) -> RunStorage:
    """``train.run_dir`` opened and created, or a ConfigError that names it."""
    try:
        root = RunStorage(run_dir)
        root.makedirs()
    except ValueError as exc:  # a URI pyarrow cannot open: the message already names the setting
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"train.run_dir={run_dir}: cannot create the run directory there ({reason}); "
            "set train.run_dir to a directory you can write to"
        ) from None
    return root


# ---- the model ----------------------------------------------------------------------------------
def resolve_model(config: Config, progress: bool = True) -> tuple[str, object]:
    """(where the doctor loads from, its transformers config), or a ConfigError saying what is missing.

    ``tiny`` is shipped or built here; a directory must hold config.json and a tokenizer; any other
    name is a Hugging Face id, found in the local cache or downloaded (only config and tokenizer).
    """
    from grpodx.models import doctor_source

    source = doctor_source(config, progress=progress)
    name = config.model.name
    directory = Path(source).expanduser()
    looks_like_path = name == "tiny" or directory.is_dir() or name.startswith(("/", ".", "~"))
    if looks_like_path:
        _check_model_directory(name, directory)
    return source, _load_model_config(name, source, looks_like_path)


def _check_model_directory(name: str, directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"model.name={name}: no directory {directory}; pass a model directory or a hub id")
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / file).is_file() for file in _TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise ConfigError(
            f"model.name={name}: {directory} holds no {' and no '.join(missing)}; pass a directory "
            "saved with save_pretrained (model and tokenizer)"
        )


def _load_model_config(name: str, source: str, local: bool):
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(source)
        if not local:  # a hub id: the tokenizer must come too (a directory's was checked above)
            AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "the directory" if local else "neither in the local Hugging Face cache nor downloadable"
        raise ConfigError(
            f"model.name={name}: cannot load its config or tokenizer ({where}: {reason}); pass a local "
            "model directory, or a hub id this machine can download (network, HF_TOKEN) or has cached"
        ) from None
    return model_config


# ---- the adapter the config builds ----------------------------------------------------------------
def adapter_shapes(config: Config, model_config) -> dict[str, tuple[int, ...]]:
    """Name → shape of every LoRA tensor the learner would create, built on the meta device."""
    from peft import LoraConfig

    from grpodx.models import MissingLoraTargets, lora_shapes, lora_target_modules

    targets = lora_target_modules(model_config.model_type, config.lora.target_modules)
    try:
        return lora_shapes(
            model_config,
            LoraConfig(r=config.lora.rank, target_modules=targets),
            lambda base: _check_rank(config.lora.rank, base, targets),
        )
    except MissingLoraTargets as exc:
        raise ConfigError(
            f"lora.target_modules={targets}: {exc}; name modules of this {model_config.model_type} model"
        ) from None


def _check_rank(rank: int, base: torch.nn.Module, targets: list[str]) -> None:
    """A rank above a layer's smaller side adds parameters and no expressiveness; far above, it fills
    the memory of every actor before anything trains."""
    widths = {
        name.rsplit(".", 1)[-1]: min(module.in_features, module.out_features)
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if widths and rank > min(widths.values()):
        narrowest = min(widths, key=widths.get)
        raise ConfigError(
            f"lora.rank={rank} (--lora-rank) is larger than the model's narrowest LoRA target "
            f"({narrowest}, {widths[narrowest]} wide); pick a rank of at most {widths[narrowest]} "
            "(8 to 64 is usual)"
        )


# ---- a checkpoint to resume from ------------------------------------------------------------------
def check_checkpoint(
    storage: RunStorage, rel: str, config: Config, expected: dict[str, tuple[int, ...]]
) -> dict:
    """The checkpoint's driver state, once every file of it reads and its adapter fits ``expected``."""
    where = storage.display(rel)

    def read(name: str) -> bytes:
        if not storage.exists(f"{rel}/{name}"):
            raise ConfigError(f"--load-checkpoint {where}: {name} is missing; pass a complete checkpoint")
        return storage.read_bytes(f"{rel}/{name}")

    state = _json(read(CHECKPOINT_STATE), f"{where}/{CHECKPOINT_STATE}")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("sampler"), dict):
        raise ConfigError(
            f"--load-checkpoint {where}: {CHECKPOINT_STATE} has no step and sampler state; "
            "pass a checkpoint written by grpodx train"
        )
    saved = _json(read(ADAPTER_CONFIG), f"{where}/{ADAPTER_CONFIG}")
    if saved.get("r") != config.lora.rank:
        raise ConfigError(
            f"--load-checkpoint {where}: its adapter has LoRA rank {saved.get('r')} but lora.rank is "
            f"{config.lora.rank}; pass --lora-rank {saved.get('r')} (or lora.rank={saved.get('r')})"
        )
    try:
        given = safetensors_shapes(read(ADAPTER_WEIGHTS), f"{where}/{ADAPTER_WEIGHTS}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; resume from an earlier checkpoint") from None
    _compare_shapes(given, expected, f"{where}/{ADAPTER_WEIGHTS}")
    learner_state = read(LEARNER_STATE_FILE)
    try:  # torch.save writes a zip; a truncated or overwritten one fails its central directory or CRCs
        with zipfile.ZipFile(BytesIO(learner_state)) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        bad = LEARNER_STATE_FILE
    if bad is not None:
        raise ConfigError(
            f"--load-checkpoint {where}: {LEARNER_STATE_FILE} is damaged ({bad}); resume from an "
            "earlier checkpoint"
        )
    return state


def _json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc}); resume from an earlier checkpoint") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} holds no JSON object; resume from an earlier checkpoint")
    return value


def safetensors_shapes(data: bytes, where: str) -> dict[str, tuple[int, ...]]:
    """Name → shape from a safetensors file, after checking that its header parses and that every
    tensor's bytes are present (a truncated upload or a half-written copy fails here)."""

    def damaged(why: str) -> ConfigError:
        return ConfigError(f"{where} is not a whole safetensors file ({why})")

    if len(data) < 8:
        raise damaged(f"{len(data)} bytes")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise damaged(f"its header claims {header_size} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    shapes, data_bytes = {}, len(data) - 8 - header_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (_, end) = tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise damaged(f"no shape or offsets for {name}") from None
        if end > data_bytes:
            raise damaged(f"{name} ends at byte {end}, the data holds {data_bytes}")
        shapes[name] = shape
    return shapes


def _compare_shapes(given: dict, expected: dict, where: str) -> None:
    problems = adapter_mismatch(given, expected)
    if problems:
        raise ConfigError(
            f"{where} does not fit the adapter this config builds: {problems}; resume with "
            "the model and lora settings the checkpoint was trained with"
        )


# ---- the patient and judge APIs -------------------------------------------------------------------
async def check_api_backends(config: Config, api_key) -> None:
    """One one-token request to each API-backed patient or judge; a server that is not there, refuses
    the key or does not know the model stops the run here, with the URL and the setting named."""
    for role in ("patient", "judge"):
        settings = getattr(config, role)
        if settings.kind == "openai":
            await _probe(role, settings, api_key)


async def _probe(role: str, settings, api_key) -> None:
    from grpodx.api_client import ApiClient, ApiError
    from grpodx.env import require_api_key

    api_key = require_api_key(api_key, role)
    # One retry: a hiccup may pass, a dead server should not hold the start for the full backoff.
    client_config = settings.client.model_copy(
        update={"max_retries": 1, "timeout_s": min(settings.client.timeout_s, 20.0)}
    )
    client = ApiClient(
        client_config,
        model=settings.model,
        api_key=api_key,
        base_url=settings.base_url,
        name=role,
        warn_on_failure=False,
    )
    url = settings.base_url or "https://api.openai.com/v1 (the default)"
    try:
        await client.chat([{"role": "user", "content": "Reply with OK."}], temperature=0.0, max_tokens=1)
    except ApiError as error:
        if error.kind != "rate_limited":  # a 429 means URL, key and model work; the run paces itself
            raise ConfigError(_probe_failure(role, settings.model, url, error)) from None
    finally:
        await client.aclose()


def _probe_failure(role: str, model: str, url: str, error) -> str:
    reason = error.reason
    if error.kind in ("connection", "timeout"):
        return (
            f"{role}.base_url={url}: the {role} API does not answer ({reason}); check the URL and that "
            "the server is up"
        )
    if error.status_code in (401, 403):
        return (
            f"the {role} API at {url} refuses the key ({reason}); check OPENAI_API_KEY, "
            "--openai-api-key-file or --openai-api-key"
        )
    if error.status_code == 404:
        return (
            f"{role}.model={model}: the {role} API at {url} does not serve it ({reason}); set {role}.model "
            f"to a model that server serves, or {role}.base_url to the right server"
        )
    return (
        f"the {role} API at {url} failed a one-token test request ({reason}); check {role}.base_url "
        f"and {role}.model"
    )
