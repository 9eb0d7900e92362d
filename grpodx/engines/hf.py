"""Generation with transformers: batched sampling with a KV cache, on CPU or GPU.

Concurrent ``generate`` calls are collected into batches (one adapter version per batch) and run in a
worker thread, so the event loop keeps serving patient and judge calls while the model works. This is
the fallback engine; production rollouts use vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from grpodx.engines.base import (
    AdapterVersions,
    AdapterWeights,
    Generation,
    InProcessAdapterEngine,
    SamplingParams,
)
from grpodx.engines.kv_cache import full_attention_only, preallocated_cache
from grpodx.models import check_adapter_keys


def sample_next_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return it with its logprob under the temperature-scaled distribution.

    ``uniform`` holds one U[0, 1) draw per row: the token is where it falls in the row's cumulative
    distribution (inverse-CDF sampling, exact), so each row brings its own seeded randomness with one
    number, not one per vocabulary entry. Temperature 0 means greedy, and the logprob is then the raw
    model's. Top-p truncation changes which tokens can be drawn but not the recorded logprob, so that
    the learner, which has no top-p, scores the same quantity; rows without it skip the vocabulary sort.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The kept tokens are a prefix of the sorted row; the first is always kept.
        weights = torch.where(mass_before < top_p.unsqueeze(-1), sorted_probs, torch.zeros_like(sorted_probs))
        position = _inverse_cdf(weights, uniform)
        sampled = order.gather(-1, position.unsqueeze(-1)).squeeze(-1)
    else:
        sampled = _inverse_cdf(probs, uniform)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index per row drawn with probability proportional to ``weights`` (>= 0, a positive one per row)."""
    # float64: over a 100k vocabulary a float32 running sum drifts enough to shift rare tokens' odds.
    cdf = weights.double().cumsum(dim=-1)
    target = (uniform.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to the total itself; never step past the last token with weight.
    last_positive = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last_positive)


@dataclass
class _Request:
    prompt: list[int]
    sampling: SamplingParams
    version: int
    future: asyncio.Future
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class HFEngine(InProcessAdapterEngine):
    """A transformers causal LM that serves concurrent requests in batches, with versioned LoRA."""

    def __init__(
        self,
        model,
        *,
        pad_token_id: int,
        max_batch_size: int = 64,
        seed: int = 0,
        batch_gap_s: float = 0.0,
        batch_wait_s: float = 0.0,
    ):
        self.model = model.eval()
        self.batch_gap_s = batch_gap_s
        self.batch_wait_s = batch_wait_s
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._preallocate_cache = full_attention_only(model.config)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._versions = AdapterVersions()  # version -> AdapterWeights (None for the base model)
        self._active_version = 0
        self._peft_wrapped = False
        self._pending: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._model_lock = threading.Lock()

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, adapter: AdapterWeights) -> None:
        with self._model_lock:
            if not self._peft_wrapped:
                self.model = get_peft_model(self.model, LoraConfig(**adapter.peft_config)).eval()
                self._peft_wrapped = True
        check_adapter_keys(self.model, adapter.state_dict, f"adapter version {adapter.version}")
        # No copy on CPU: a published adapter's tensors are read-only views of the object store's buffer
        # (grpodx.adapter_transport); this engine only reads them, copying them into its LoRA parameters
        # (set_peft_model_state_dict) when it switches to the version.
        state = {name: tensor.detach().to("cpu") for name, tensor in adapter.state_dict.items()}
        self._versions.add(adapter.version, AdapterWeights(adapter.version, state, adapter.peft_config))

    # ---- requests -------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_version: int | None = None
    ) -> Generation:
        version = self.latest_version if adapter_version is None else adapter_version
        with self._versions.use(version):
            loop = asyncio.get_running_loop()
            if self._batcher is None or self._batcher.done():
                self._wakeup = asyncio.Event()
                self._batcher = loop.create_task(self._run_batches())
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
            request = _Request(list(prompt_token_ids), sampling, version, loop.create_future(), generator)
            self._pending.append(request)
            self._wakeup.set()
            return await request.future

    async def _run_batches(self) -> None:
        while True:
            await self._wakeup.wait()
            # Yield once so that requests issued in the same tick join this batch.
            await asyncio.sleep(0)
            await self._gather_stragglers()
            # A caller that was cancelled (a group given up, a shutdown) cancels its future: skip it.
            self._pending = [r for r in self._pending if not r.future.cancelled()]
            if not self._pending:
                self._wakeup.clear()
                continue
            version = self._pending[0].version
            batch = [r for r in self._pending if r.version == version][: self.max_batch_size]
            chosen = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in chosen]
            try:
                await asyncio.to_thread(self._generate_batch, version, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of the failure
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request in batch:
                finish = (
                    "stop"
                    if request.output and request.output[-1] in request.sampling.stop_token_ids
                    else "length"
                )
                if not request.future.done():
                    request.future.set_result(
                        Generation(request.output, request.logprobs, finish, request.version)
                    )

    async def _gather_stragglers(self) -> None:
        """Hold the batch open while requests keep coming, each within ``batch_gap_s`` of the one
        before, for at most ``batch_wait_s`` in all.

        The next turns of a worker's episodes arrive spread over tens of milliseconds, each after its
        own patient reply. A batch started at the first of them would make the rest wait for its whole
        decode (a batch of 3, then one of 29, every turn), about doubling generation time; this engine
        cannot add requests to a batch once it runs.
        """
        if self.batch_wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        count = len(self._pending)
        while count < self.max_batch_size and loop.time() < deadline:
            await asyncio.sleep(min(self.batch_gap_s, deadline - loop.time()))
            if len(self._pending) == count:
                return
            count = len(self._pending)

    def _activate(self, version: int) -> contextlib.AbstractContextManager:
        if version == 0:
            return self.model.disable_adapter() if self._peft_wrapped else contextlib.nullcontext()
        if self._active_version != version:
            set_peft_model_state_dict(self.model, self._versions.weights[version].state_dict)
            self._active_version = version
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _generate_batch(self, version: int, batch: list[_Request]) -> None:
        with self._model_lock, self._activate(version):
            self._decode(batch)

    def _decode(self, batch: list[_Request]) -> None:
        size = len(batch)
        width = max(len(r.prompt) for r in batch)
        input_ids = torch.full((size, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((size, width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            attention[row, width - len(request.prompt) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        temperature = torch.tensor([r.sampling.temperature for r in batch], device=self.device)
        top_p = torch.tensor([r.sampling.top_p for r in batch], device=self.device)
        stops = [set(r.sampling.stop_token_ids) for r in batch]
        budget = [r.sampling.max_new_tokens for r in batch]
        done = [False] * size

        # Only the last position's logits are sampled from: the vocabulary-sized layer at every prompt
        # position was a third of the prefill's time on the tiny doctor.
        cache = None
        if self._preallocate_cache:
            cache = preallocated_cache(self.model.config.num_hidden_layers, reserve=max(budget))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # Every row's draws for the whole turn at once, from its own generator: a seeded request samples
        # the same tokens whatever batch it shares.
        uniforms = torch.zeros((size, max(budget)), dtype=torch.float64)
        for row, request in enumerate(batch):
            generator = request.generator or self._generator
            uniforms[row, : budget[row]] = torch.rand(budget[row], generator=generator, dtype=torch.float64)
        # Cache rows of the requests still decoding. A finished row leaves the batch (its cache row is
        # dropped) instead of riding along to the longest row's end: the tiny doctor's turns end anywhere
        # from a few tokens to the 96-token limit.
        active = list(range(size))
        for index in range(max(budget)):
            logits = out.logits[:, -1, :]
            tokens, logprobs = sample_next_tokens(logits, temperature, top_p, uniforms[:, index])
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            for slot, row in enumerate(active):
                request = batch[row]
                request.output.append(token_list[slot])
                request.logprobs.append(logprob_list[slot])
                done[row] = token_list[slot] in stops[row] or len(request.output) >= budget[row]
            remaining = [slot for slot, row in enumerate(active) if not done[row]]
            if not remaining:
                break
            if len(remaining) < len(active):
                keep = torch.tensor(remaining, device=self.device)
                out.past_key_values.batch_select_indices(keep)
                attention, positions, tokens = attention[keep], positions[keep], tokens[keep]
                temperature, top_p, uniforms = temperature[keep], top_p[keep], uniforms[keep.cpu()]
                active = [active[slot] for slot in remaining]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
