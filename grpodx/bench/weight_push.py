"""Weight push: from the end of a learner step until every rollout worker holds the new adapter.

Two adapters:

- the tiny doctor's, end to end through the real path: ``LearnerActor.publish()`` packs the adapter
  (:mod:`grpodx.adapter_transport`) and puts it in the object store once, then every
  ``RolloutActor.load_adapter(ref)`` fetches it, unpacks it and serves it as the new version (the
  orchestrator's push), at 1 and 4 rollout workers;
- one the size of a rank-16 LoRA on Phi-4 (synthetic tensors with Phi-4's shapes), which the tiny
  engine cannot load: the receiving side end to end without the engine, at 1, 4 and 16 workers, by two
  paths side by side in each repeat. Packed (the path the learner and the workers use): ``ray.put`` of
  the packed adapter once, then each worker's process fetching it and unpacking it to torch tensors
  (views of the object store's shared memory), which is what ``load_adapter`` does before the engine;
  packing, which in ``publish`` takes the place of the learner's copy of its parameters to the CPU, is
  timed on its own. Pickled torch (the path before, the baseline): ``ray.put`` of the
  ``AdapterWeights`` once, then each worker unpickling its tensors into its own memory. The workers here
  are lightweight actors that hold no engine, so that 16 of them fit a small machine; bf16 and fp32.

Each is set beside a plain memory copy of the same bytes (one contiguous copy into fresh memory) timed
in the same repeat, so the figure reads as "the push costs this many memory copies" on any machine.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from grpodx.adapter_transport import PackedAdapter, pack, unpack
from grpodx.bench.core import (
    BenchContext,
    Benchmark,
    BenchResult,
    ratio_stat,
    release_actors,
    stat,
    torch_threads,
)
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.engines.base import AdapterWeights

# microsoft/phi-4's config.json (Phi3ForCausalLM): the shapes that size its LoRA adapter.
PHI4_SHAPES = {
    "hidden_size": 5120,
    "intermediate_size": 17920,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
}
PHI4_LORA_RANK = 16


def phi_lora_shapes(shapes: dict[str, int], rank: int) -> dict[str, tuple[int, int]]:
    """peft state-dict names and shapes of a LoRA on qkv_proj, o_proj, gate_up_proj, down_proj.

    Per layer and module, A is (rank × in) and B is (out × rank); the fused qkv_proj outputs the queries
    and one key and value per key-value head, gate_up_proj outputs gate and up side by side.
    """
    hidden, inter = shapes["hidden_size"], shapes["intermediate_size"]
    head_dim = hidden // shapes["num_attention_heads"]
    modules = {
        "self_attn.qkv_proj": (hidden, hidden + 2 * shapes["num_key_value_heads"] * head_dim),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_up_proj": (hidden, 2 * inter),
        "mlp.down_proj": (inter, hidden),
    }
    names = {}
    for layer in range(shapes["num_hidden_layers"]):
        for module, (fan_in, fan_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            names[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            names[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return names


def synthetic_adapter(shapes: dict[str, tuple[int, int]], dtype: torch.dtype, version: int) -> AdapterWeights:
    generator = torch.Generator().manual_seed(version)
    with torch_threads(1):  # hundreds of small ops: one thread is fastest on a busy machine
        state = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    return AdapterWeights(version=version, state_dict=state, peft_config={"r": PHI4_LORA_RANK})


def adapter_bytes(adapter: AdapterWeights) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.state_dict.values())


def adapter_params(adapter: AdapterWeights) -> int:
    return sum(t.numel() for t in adapter.state_dict.values())


def memory_copy_seconds(buffer: np.ndarray, tries: int = 3) -> float:
    """A plain copy of ``buffer``'s bytes into new memory in this process (the median of ``tries``): the
    machine's memory-bandwidth yardstick, page faults of the fresh memory included as in a fetch. One
    contiguous copy on one thread (numpy's), the cheapest way to move those bytes, so a ratio to it is
    not flattered."""
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        copy = buffer.copy()
        times.append(time.perf_counter() - started)
        del copy
    return sorted(times)[len(times) // 2]


@ray.remote(num_cpus=0)
class AdapterReceiver:
    """A rollout worker's process without its engine (a few hundred MiB rather than a model's worth):
    Ray resolves the adapter argument before each call, reading the object from the store."""

    def __init__(self, torch_threads_per_worker: int):
        if torch_threads_per_worker:
            torch.set_num_threads(torch_threads_per_worker)

    def ready(self) -> bool:
        return True

    def settle(self) -> bool:
        """Free what the last push left (a pickled adapter's copy), before the next one is timed."""
        gc.collect()
        return True

    def receive_packed(self, packed: PackedAdapter) -> tuple[int, int]:
        """What ``RolloutActor.load_adapter`` does before the engine: unpack to torch tensors."""
        adapter = unpack(packed)
        return adapter.version, adapter_bytes(adapter)

    def receive_pickled(self, adapter: AdapterWeights) -> tuple[int, int]:
        """The path before: Ray has unpickled the torch tensors into this process."""
        return adapter.version, adapter_bytes(adapter)


def synthetic_step_batch(vocab_size: int, groups: int = 2, per_group: int = 2, length: int = 64) -> pa.Table:
    """A few trajectories with TRAJECTORY_SCHEMA, enough for a learner step (it advances the version)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for group in range(groups):
        for index in range(per_group):
            ids = torch.randint(1, vocab_size, (length,), generator=generator).tolist()
            mask = [0] * (length // 2) + [1] * (length - length // 2)
            rows.append(
                {
                    **{field.name: None for field in TRAJECTORY_SCHEMA},
                    "step": 0,
                    "group_id": f"push-{group}",
                    "sample_index": index,
                    "worker_id": "bench",
                    "policy_version": 0,
                    "reward": float(index),
                    "valid": True,
                    "token_ids": ids,
                    "loss_mask": mask,
                    "behaviour_logprobs": [-1.0 if m else 0.0 for m in mask],
                }
            )
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


@dataclass(frozen=True)
class Sizes:
    tiny_workers: tuple[int, ...]  # rollout actors with an engine (the real path)
    workers: tuple[int, ...]  # lightweight receivers (the Phi-4-sized adapter)
    dtypes: tuple[str, ...]


SIZES = {
    "full": Sizes(tiny_workers=(1, 4), workers=(1, 4, 16), dtypes=("bfloat16", "float32")),
    "quick": Sizes(tiny_workers=(1, 2), workers=(1, 4), dtypes=("bfloat16", "float32")),
    "smoke": Sizes(tiny_workers=(1, 2), workers=(1, 2), dtypes=("bfloat16",)),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PACKED, PICKLED = "packed numpy (now)", "pickled torch (before)"


def run(ctx: BenchContext, phi_shapes: dict[str, int] | None = None) -> BenchResult:
    """``phi_shapes`` replaces Phi-4's shapes (the tests use small ones)."""
    sizes = SIZES[ctx.scale]
    phi_shapes = phi_shapes or PHI4_SHAPES
    lora_shapes = phi_lora_shapes(phi_shapes, PHI4_LORA_RANK)
    ctx.ray()
    rows = _tiny_real_path(ctx, sizes.tiny_workers) + _phi_sized(ctx, lora_shapes, sizes)
    big_params = sum(a * b for a, b in lora_shapes.values())
    layers = phi_shapes["num_hidden_layers"]
    notes = [
        "Tiny doctor, real path: the clock starts when LearnerActor.train_step has returned and stops "
        "when every RolloutActor.load_adapter(ref) has returned the new version (the orchestrator's push). "
        "First part = publish (the learner packs its LoRA parameters into one buffer and puts it in the "
        "object store once); second part = the workers fetching it, unpacking it and registering it with "
        "their engines (the transformers engine applies it to the model lazily, at the first batch on "
        "that version: not included).",
        f"Phi-4 size: a rank-{PHI4_LORA_RANK} LoRA on qkv_proj, o_proj, gate_up_proj and down_proj × "
        f"{layers} layers with microsoft/phi-4's shapes (hidden {phi_shapes['hidden_size']}, intermediate "
        f"{phi_shapes['intermediate_size']}, {phi_shapes['num_attention_heads']} query and "
        f"{phi_shapes['num_key_value_heads']} key-value heads): {big_params:,} parameters, with the names "
        "and shapes peft gives such a model (checked in tests/test_bench.py). Synthetic tensors: the tiny "
        "engine cannot load them.",
        f"Phi-4 size, {PACKED}: ray.put of the packed adapter once from the driver (first part), then every "
        "receiving process fetching the object and unpacking it to torch tensors (second part, all workers "
        "at once): what RolloutActor.load_adapter does before the engine. Packing (one copy of the tensors "
        "into a contiguous buffer; in LearnerActor.publish, straight from the parameters, in place of "
        "their copy to the CPU) comes before and is timed on its own, in the pack column and in "
        "(pack + push) ÷ copy. The tensors are views of the object store's shared memory, so a worker "
        "copies nothing here; the engine reads them later (transformers: into its LoRA parameters when it "
        "switches version; vLLM: into the adapter file it loads).",
        f"Phi-4 size, {PICKLED}: ray.put of the AdapterWeights once (Ray pickles the torch tensors; first "
        "part), then every receiving process unpickling them into its own memory (second part), the path "
        "before the packed one, measured in the same repeat. Neither path includes the learner's "
        "GPU→CPU copy (which pack replaces) or the engine loading the adapter.",
        "Receivers: lightweight Ray actors (torch imported, no engine, 0 logical CPUs) standing in for "
        "rollout workers, so that 16 fit a small machine; the tiny real path uses real rollout actors.",
        "The tiny adapter (well under 1 MiB) measures the fixed costs of the push (actor calls, object "
        "store round trips), which is why its ratio to a memory copy is large; the Phi-4-sized rows "
        "measure bandwidth.",
        "Memory copy: one contiguous copy of the same bytes into fresh memory in the driver (numpy, one "
        "thread, the median of 3), timed in the same repeat; push ÷ copy is the number of plain memory "
        "copies the push costs. GB/s = workers × adapter bytes ÷ push time (bytes delivered).",
        "All actors share one machine, so the object store is shared memory: a multi-node cluster adds the "
        "network transfer to each node.",
        f"One warm-up round, then {ctx.repeats} counted repeat(s).",
    ]
    return BenchResult(
        rows=rows,
        columns=[
            ("adapter", "adapter"),
            ("path", "path"),
            ("params", "parameters"),
            ("dtype", "dtype"),
            ("mib", "MiB"),
            ("workers", "workers"),
            ("push_s", "push s"),
            ("first_part_s", "publish / put s"),
            ("second_part_s", "load / fetch s"),
            ("copy_s", "memory copy s"),
            ("push_over_copy", "push ÷ copy"),
            ("pack_s", "pack s (before the push)"),
            ("with_pack_over_copy", "(pack + push) ÷ copy"),
            ("gb_per_s", "GB/s delivered"),
        ],
        notes=notes,
    )


def _tiny_real_path(ctx: BenchContext, worker_counts: tuple[int, ...]) -> list[dict]:
    """The orchestrator's push of the tiny doctor's adapter: a learner and real rollout actors."""
    from grpodx.actors.run_actors import start_learner, start_rollout_worker

    config, model_source = ctx.config, ctx.model_source
    most = max(worker_counts)
    ctx.log(f"weight_push: starting a learner and {most} rollout actors")
    sims = (None, None)  # no episode runs here: the rollout actors need no patient or judge
    learner = start_learner(config, model_source)
    workers = [start_rollout_worker(config, model_source, f"rollout-{i}", *sims) for i in range(most)]
    times = {count: {"push": [], "publish": [], "load": [], "copy": []} for count in worker_counts}
    packed: PackedAdapter | None = None
    try:
        ray.get([w.adapter_versions.remote() for w in workers] + [learner.version.remote()])
        ctx.log("weight_push: actors ready")
        batch = synthetic_step_batch(_vocab_size(model_source))
        for repeat in range(ctx.repeats + 1):  # the first round warms every path up and is not counted
            for count in worker_counts:
                ray.get(learner.train_step.remote(*batch.to_batches()))
                started = time.perf_counter()  # the learner step has returned
                ref = ray.get(learner.publish.remote())
                published = time.perf_counter()
                versions = ray.get([w.load_adapter.remote(ref) for w in workers[:count]])
                finished = time.perf_counter()
                expected = ray.get(learner.version.remote())
                if any(v != expected for v in versions):
                    raise RuntimeError(f"workers serve versions {versions}, the learner is at {expected}")
                if packed is None:
                    packed = ray.get(ref)
                if repeat > 0:
                    times[count]["push"].append(finished - started)
                    times[count]["publish"].append(published - started)
                    times[count]["load"].append(finished - published)
                    times[count]["copy"].append(memory_copy_seconds(packed.buffer))
                del ref
            ctx.log(f"weight_push: tiny doctor, round {repeat} done" + ("" if repeat else " (warm-up)"))
    finally:
        release_actors([*workers, learner])

    assert packed is not None
    adapter = unpack(packed)
    size = adapter_bytes(adapter)
    return [
        {
            "adapter": "tiny doctor (real path)",
            "path": PACKED,
            "params": adapter_params(adapter),
            "dtype": "float32",
            "mib": size / 2**20,
            "workers": count,
            "push_s": stat(t["push"]),
            "first_part_s": stat(t["publish"]),
            "pack_s": None,  # inside publish
            "second_part_s": stat(t["load"]),
            "copy_s": stat(t["copy"]),
            "push_over_copy": ratio_stat(t["push"], t["copy"]),
            "with_pack_over_copy": None,
            "gb_per_s": stat([count * size / s / 1e9 for s in t["push"]]),
        }
        for count, t in times.items()
    ]


def _phi_sized(ctx: BenchContext, lora_shapes: dict[str, tuple[int, int]], sizes: Sizes) -> list[dict]:
    """The receiving side of a Phi-4-sized adapter's push, packed and pickled side by side."""
    most = max(sizes.workers)
    ctx.log(f"weight_push: starting {most} lightweight receivers")
    receivers = [AdapterReceiver.remote(ctx.config.ray.rollout_threads) for _ in range(most)]
    times: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    try:
        ray.get([r.ready.remote() for r in receivers])
        for repeat in range(ctx.repeats + 1):  # the first round warms every path up and is not counted
            for dtype in sizes.dtypes:
                adapter = synthetic_adapter(lora_shapes, _DTYPES[dtype], version=repeat + 1)
                buffer = pack(adapter).buffer  # the adapter's bytes, for the memory copy
                for count in sizes.workers:
                    copy_s = memory_copy_seconds(buffer)
                    # Alternate which path goes first, and let the receivers free the last push's
                    # memory (a pickled copy each) untimed, so that neither path pays for the other.
                    for path in (PACKED, PICKLED) if repeat % 2 else (PICKLED, PACKED):
                        measured = _push_to(receivers[:count], adapter, packed=path == PACKED)
                        gc.collect()
                        ray.get([r.settle.remote() for r in receivers])
                        if repeat == 0:
                            continue
                        entry = times.setdefault((dtype, path, count), {"copy": []})
                        entry["copy"].append(copy_s)
                        for part, seconds in measured.items():
                            entry.setdefault(part, []).append(seconds)
                del adapter, buffer
            ctx.log(f"weight_push: Phi-4 size, round {repeat} done" + ("" if repeat else " (warm-up)"))
    finally:
        release_actors(receivers)

    params = sum(a * b for a, b in lora_shapes.values())
    rows = []
    for (dtype, path, count), t in times.items():
        size = params * _DTYPES[dtype].itemsize
        rows.append(
            {
                "adapter": "Phi-4 LoRA r16 size (receiving side)",
                "path": path,
                "params": params,
                "dtype": dtype,
                "mib": size / 2**20,
                "workers": count,
                "push_s": stat(t["push"]),
                "first_part_s": stat(t["put"]),
                "pack_s": stat(t["pack"]) if path == PACKED else None,
                "second_part_s": stat(t["fetch"]),
                "copy_s": stat(t["copy"]),
                "push_over_copy": ratio_stat(t["push"], t["copy"]),
                "with_pack_over_copy": (
                    ratio_stat([a + b for a, b in zip(t["pack"], t["push"], strict=True)], t["copy"])
                    if path == PACKED
                    else None
                ),
                "gb_per_s": stat([count * size / s / 1e9 for s in t["push"]]),
            }
        )
    return rows


def _push_to(receivers: list, adapter: AdapterWeights, *, packed: bool) -> dict[str, float]:
    """One push of ``adapter`` to ``receivers``, packed or pickled: its parts' seconds. The push is
    ``ray.put`` once and every receiver fetching the object; packing comes before it and is timed on its
    own (it replaces the learner's copy of its parameters to the CPU, which neither path's push counts)."""
    started = time.perf_counter()
    sent = pack(adapter) if packed else adapter
    ready = time.perf_counter()
    ref = ray.put(sent)
    put = time.perf_counter()
    receive = "receive_packed" if packed else "receive_pickled"
    received = ray.get([getattr(r, receive).remote(ref) for r in receivers])
    finished = time.perf_counter()
    del ref, sent
    expected = (adapter.version, adapter_bytes(adapter))
    if any(answer != expected for answer in received):
        raise RuntimeError(f"receivers got (version, bytes) {received}, expected {expected}")
    return {"pack": ready - started, "push": finished - ready, "put": put - ready, "fetch": finished - put}


def _vocab_size(model_source: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_source).vocab_size)


BENCHMARK = Benchmark(
    name="weight_push",
    title="weight push to every rollout worker",
    measures="Seconds from the end of a learner step until every rollout worker holds the new adapter "
    "(tiny doctor, real path; Phi-4-sized LoRA, the receiving side without the engine, packed against "
    "pickled torch), beside a memory copy of the same bytes.",
    run=run,
)
