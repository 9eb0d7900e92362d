"""Weight push: from the end of a learner step until every rollout worker holds the new adapter.

Two adapters:

- the tiny doctor's, end to end through the real path: ``LearnerActor.publish()`` puts the adapter in
  the object store once and returns its ref, then every ``RolloutActor.load_adapter(ref)`` fetches it
  and serves it as the new version (the orchestrator's ``_push_adapter``);
- one the size of a rank-16 LoRA on Phi-4 (synthetic tensors with Phi-4's shapes), which the tiny
  engine cannot load: only its transport is timed, ``ray.put`` once and each rollout worker's process
  fetching it into its memory, in bf16 and fp32.

Each is set beside a plain memory copy of the same bytes (``tensor.clone()``) timed in the same
repeat, so the figure reads as "the push costs this many memory copies" on any machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import ray
import torch

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


def memory_copy_seconds(adapter: AdapterWeights, tries: int = 3) -> float:
    """A plain copy of the adapter's bytes into new memory in this process (the median of ``tries``):
    the machine's memory-bandwidth yardstick, page faults of the fresh memory included as in a fetch.

    Single-threaded, like the deserialisation it is compared with; it also keeps torch's thread pool out
    of it: with two threads on two busy cores, each of the hundreds of small copies waits for a thread
    that is not running, and the copy took 1 to 7 s instead of 0.06 s.
    """
    times = []
    with torch_threads(1):
        for _ in range(tries):
            started = time.perf_counter()
            copies = {name: tensor.clone() for name, tensor in adapter.state_dict.items()}
            times.append(time.perf_counter() - started)
            del copies
    return sorted(times)[len(times) // 2]


def receive_adapter(actor, adapter: AdapterWeights) -> int:
    """Run inside a rollout actor (``__ray_call__``): Ray has resolved ``adapter`` before the call, reading
    the object from the store and deserialising its tensors into this process, as it does for
    ``RolloutActor.load_adapter``; the engine is left alone."""
    return adapter_bytes(adapter)


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
    workers: tuple[int, ...]
    dtypes: tuple[str, ...]


SIZES = {
    "full": Sizes(workers=(1, 2, 4), dtypes=("bfloat16", "float32")),
    "quick": Sizes(workers=(1, 2), dtypes=("bfloat16", "float32")),
    "smoke": Sizes(workers=(1, 2), dtypes=("bfloat16",)),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def run(ctx: BenchContext, phi_shapes: dict[str, int] | None = None) -> BenchResult:
    """``phi_shapes`` replaces Phi-4's shapes (the tests use small ones)."""
    from grpodx.actors.learner import LearnerActor
    from grpodx.actors.rollout import RolloutActor

    sizes = SIZES[ctx.scale]
    phi_shapes = phi_shapes or PHI4_SHAPES
    lora_shapes = phi_lora_shapes(phi_shapes, PHI4_LORA_RANK)
    model_source = ctx.model_source
    config = ctx.config
    ctx.ray()
    most = max(sizes.workers)
    ctx.log(f"weight_push: starting a learner and {most} rollout actors")
    sims = (None, None)  # no episode runs here: the rollout actors need no patient or judge
    learner = LearnerActor.options(num_cpus=config.ray.learner_num_cpus).remote(config, model_source)
    workers = [
        RolloutActor.options(num_cpus=config.ray.rollout_num_cpus).remote(
            f"rollout-{i}", config, model_source, *sims
        )
        for i in range(most)
    ]
    tiny: dict[int, dict[str, list[float]]] = {
        count: {"push": [], "publish": [], "load": [], "copy": []} for count in sizes.workers
    }
    big: dict[tuple[str, int], dict[str, list[float]]] = {}
    tiny_adapter: AdapterWeights | None = None
    try:
        ray.get([w.adapter_versions.remote() for w in workers] + [learner.version.remote()])
        ctx.log("weight_push: actors ready")
        batch = synthetic_step_batch(_vocab_size(model_source))
        for repeat in range(ctx.repeats + 1):  # the first round warms every path up and is not counted
            counted = repeat > 0
            for count in sizes.workers:
                ray.get(learner.train_step.remote(*batch.to_batches()))
                started = time.perf_counter()  # the learner step has returned
                ref = ray.get(learner.publish.remote())
                published = time.perf_counter()
                versions = ray.get([w.load_adapter.remote(ref) for w in workers[:count]])
                finished = time.perf_counter()
                expected = ray.get(learner.version.remote())
                if any(v != expected for v in versions):
                    raise RuntimeError(f"workers serve versions {versions}, the learner is at {expected}")
                if tiny_adapter is None:
                    tiny_adapter = ray.get(ref)
                if counted:
                    tiny[count]["push"].append(finished - started)
                    tiny[count]["publish"].append(published - started)
                    tiny[count]["load"].append(finished - published)
                    tiny[count]["copy"].append(memory_copy_seconds(tiny_adapter))
                del ref
            for dtype in sizes.dtypes:
                adapter = synthetic_adapter(lora_shapes, _DTYPES[dtype], version=repeat + 1)
                for count in sizes.workers:
                    copy_s = memory_copy_seconds(adapter)
                    started = time.perf_counter()
                    ref = ray.put(adapter)
                    put = time.perf_counter()
                    received = ray.get([w.__ray_call__.remote(receive_adapter, ref) for w in workers[:count]])
                    finished = time.perf_counter()
                    if any(size != adapter_bytes(adapter) for size in received):
                        raise RuntimeError(f"workers got {received} bytes of {adapter_bytes(adapter)}")
                    del ref
                    if counted:
                        times = big.setdefault(
                            (dtype, count), {"push": [], "put": [], "fetch": [], "copy": []}
                        )
                        times["push"].append(finished - started)
                        times["put"].append(put - started)
                        times["fetch"].append(finished - put)
                        times["copy"].append(copy_s)
                del adapter
            ctx.log(f"weight_push: round {repeat} done" + ("" if counted else " (warm-up)"))
    finally:
        release_actors([*workers, learner])

    assert tiny_adapter is not None
    rows = []
    tiny_bytes = adapter_bytes(tiny_adapter)
    for count, times in tiny.items():
        rows.append(
            {
                "adapter": "tiny doctor (real path)",
                "params": adapter_params(tiny_adapter),
                "dtype": "float32",
                "mib": tiny_bytes / 2**20,
                "workers": count,
                "push_s": stat(times["push"]),
                "first_part_s": stat(times["publish"]),
                "second_part_s": stat(times["load"]),
                "copy_s": stat(times["copy"]),
                "push_over_copy": ratio_stat(times["push"], times["copy"]),
                "gb_per_s": stat([count * tiny_bytes / t / 1e9 for t in times["push"]]),
            }
        )
    big_params = sum(a * b for a, b in lora_shapes.values())
    for (dtype, count), times in big.items():
        size = big_params * _DTYPES[dtype].itemsize
        rows.append(
            {
                "adapter": "Phi-4 LoRA r16 size (transport only)",
                "params": big_params,
                "dtype": dtype,
                "mib": size / 2**20,
                "workers": count,
                "push_s": stat(times["push"]),
                "first_part_s": stat(times["put"]),
                "second_part_s": stat(times["fetch"]),
                "copy_s": stat(times["copy"]),
                "push_over_copy": ratio_stat(times["push"], times["copy"]),
                "gb_per_s": stat([count * size / t / 1e9 for t in times["push"]]),
            }
        )
    layers = phi_shapes["num_hidden_layers"]
    notes = [
        "Tiny doctor, real path: the clock starts when LearnerActor.train_step has returned and stops "
        "when every RolloutActor.load_adapter(ref) has returned the new version (the orchestrator's push). "
        "First part = publish (the learner copies its LoRA state dict to CPU and puts it in the object "
        "store once); second part = the workers fetching it and registering it with their engines (the "
        "transformers engine applies it to the model lazily, at the first batch on that version: not "
        "included).",
        f"Phi-4 size: a rank-{PHI4_LORA_RANK} LoRA on qkv_proj, o_proj, gate_up_proj and down_proj × "
        f"{layers} layers with microsoft/phi-4's shapes (hidden {phi_shapes['hidden_size']}, intermediate "
        f"{phi_shapes['intermediate_size']}, {phi_shapes['num_attention_heads']} query and "
        f"{phi_shapes['num_key_value_heads']} key-value heads): {big_params:,} parameters, with the names "
        "and shapes peft gives such a model (checked in tests/test_bench.py). Synthetic tensors: the tiny "
        "engine cannot load them.",
        "Phi-4 size, what is timed: ray.put once from the driver (first part), then every rollout worker's "
        "process fetching the object and deserialising its tensors into its own memory (second part, all "
        "workers at once, through Ray's __ray_call__; Ray pickles torch tensors, so each worker holds its "
        "own copy). Not included: the learner's GPU→CPU copy of the state dict, and the engine loading it "
        "(vLLM writes the adapter to a local directory and loads it onto the GPU).",
        "The tiny adapter (well under 1 MiB) measures the fixed costs of the push (actor calls, object "
        "store round trips), which is why its ratio to a memory copy is large; the Phi-4-sized rows "
        "measure bandwidth.",
        "Memory copy: tensor.clone() of the same state dict in the driver, one thread (the median of 3), "
        "timed in the same repeat; push ÷ copy is the number of plain memory copies the push costs. "
        "GB/s = workers × adapter bytes ÷ push time (bytes delivered).",
        f"All actors share one machine ({ctx.config.ray.rollout_num_cpus:g} logical CPU each), so the object "
        "store is shared memory: a multi-node cluster adds the network transfer to each node.",
        f"One warm-up round, then {ctx.repeats} counted repeat(s).",
    ]
    return BenchResult(
        rows=rows,
        columns=[
            ("adapter", "adapter"),
            ("params", "parameters"),
            ("dtype", "dtype"),
            ("mib", "MiB"),
            ("workers", "workers"),
            ("push_s", "push s"),
            ("first_part_s", "publish / put s"),
            ("second_part_s", "load / fetch s"),
            ("copy_s", "memory copy s"),
            ("push_over_copy", "push ÷ copy"),
            ("gb_per_s", "GB/s delivered"),
        ],
        notes=notes,
    )


def _vocab_size(model_source: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_source).vocab_size)


BENCHMARK = Benchmark(
    name="weight_push",
    title="weight push to every rollout worker",
    measures="Seconds from the end of a learner step until every rollout worker holds the new adapter "
    "(tiny doctor, real path; Phi-4-sized LoRA, transport only), beside a memory copy of the same bytes.",
    run=run,
)
