"""The adapter's transport: pack and unpack bit-exact, errors that say what is wrong, read-only views
from the object store, and a rollout worker that generates the same from the packed form as from the
plain one."""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grpodx.adapter_transport import ALIGNMENT, PackedAdapter, TensorSlot, pack, unpack
from grpodx.engines.base import AdapterWeights
from grpodx.engines.vllm import RAM_HEADROOM_BYTES, adapter_parent_dir

# Values whose bits a lossy path would change: signed zero, infinities, NaN, the smallest subnormal.
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 65504.0, -3.14159]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def _adapter(version: int = 3) -> AdapterWeights:
    generator = torch.Generator().manual_seed(version)
    state = {
        "base_model.model.layers.0.self_attn.qkv_proj.lora_A.weight": torch.randn(4, 33, generator=generator),
        "base_model.model.layers.0.self_attn.qkv_proj.lora_B.weight": torch.randn(
            7, 4, generator=generator
        ).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=generator).to(torch.float16),
        "specials_f32": torch.tensor(SPECIAL, dtype=torch.float32),
        "specials_bf16": torch.tensor(SPECIAL).to(torch.bfloat16),
        "specials_f16": torch.tensor(SPECIAL).to(torch.float16),
        "odd_bytes": torch.arange(3, dtype=torch.uint8),  # leaves the next tensor unaligned unless padded
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(6, 2, generator=generator).t(),  # not contiguous
    }
    return AdapterWeights(version, state, {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]})


def test_round_trip_is_bit_exact_and_keeps_names_shapes_and_order():
    adapter = _adapter()
    back = unpack(pack(adapter))
    assert back.version == adapter.version and back.peft_config == adapter.peft_config
    assert list(back.state_dict) == list(adapter.state_dict)
    for name, tensor in adapter.state_dict.items():
        got = back.state_dict[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(_bits(got), _bits(tensor)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_dtype_round_trips_bit_exact(dtype):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.cat([torch.randn(1000, generator=generator) * 100, torch.tensor(SPECIAL)]).to(dtype)
    back = unpack(pack(AdapterWeights(1, {"w": tensor.view(2, -1)})))
    assert back.state_dict["w"].dtype == dtype and back.state_dict["w"].shape == (2, 504)
    assert torch.equal(_bits(back.state_dict["w"]), _bits(tensor.view(2, -1)))


def test_one_contiguous_aligned_buffer_and_views_not_copies():
    adapter = _adapter()
    packed = pack(adapter)
    assert packed.buffer.dtype == np.uint8 and packed.buffer.ndim == 1 and packed.buffer.flags.c_contiguous
    assert all(slot.offset % ALIGNMENT == 0 for slot in packed.index)
    assert [slot.name for slot in packed.index] == list(adapter.state_dict)
    assert packed.index[1] == TensorSlot(
        "base_model.model.layers.0.self_attn.qkv_proj.lora_B.weight",
        "bfloat16",
        (7, 4),
        packed.index[1].offset,
    )
    assert packed.buffer.size == packed.index[-1].offset + packed.index[-1].nbytes
    # unpack copies nothing: its tensors are views of the buffer ...
    base = packed.buffer.ctypes.data
    for slot, tensor in zip(packed.index, unpack(packed).state_dict.values(), strict=True):
        if tensor.numel():
            assert tensor.data_ptr() == base + slot.offset
    # ... and pack copies: changing the source afterwards leaves the packed adapter as it was.
    before = packed.buffer.copy()
    for tensor in adapter.state_dict.values():
        tensor.zero_()
    assert np.array_equal(packed.buffer, before)


def test_a_read_only_buffer_unpacks_without_a_warning():
    """From the object store the buffer is read-only; unpacking it must not make torch warn each time."""
    packed = pack(_adapter())
    packed.buffer.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = unpack(packed)
    assert torch.equal(_bits(back.state_dict["half"]), _bits(_adapter().state_dict["half"]))


# ---- errors ---------------------------------------------------------------------------------------
def test_an_empty_adapter_or_index_is_refused():
    with pytest.raises(ValueError, match="adapter version 4 has no tensors to pack"):
        pack(AdapterWeights(4, {}))
    with pytest.raises(ValueError, match="version 4 has an empty index"):
        unpack(PackedAdapter(4, (), np.zeros(0, dtype=np.uint8)))


def test_an_index_that_does_not_match_its_buffer_is_refused():
    packed, other = pack(_adapter()), pack(AdapterWeights(3, {"w": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"describes \d+ bytes, the buffer holds 16: index and buffer do"):
        unpack(dataclasses.replace(packed, buffer=other.buffer))
    with pytest.raises(ValueError, match="describes 16 bytes, the buffer holds"):
        unpack(dataclasses.replace(other, buffer=packed.buffer))
    twice = other.index + (dataclasses.replace(other.index[0], offset=64),)
    with pytest.raises(ValueError, match="names w twice"):
        unpack(PackedAdapter(3, twice, np.zeros(80, dtype=np.uint8)))
    with pytest.raises(ValueError, match="unknown torch dtype 'float128'"):
        unpack(PackedAdapter(3, (TensorSlot("w", "float128", (2,), 0),), np.zeros(32, dtype=np.uint8)))
    with pytest.raises(ValueError, match="1-D uint8 numpy array, not a 1-D float32 array"):
        unpack(dataclasses.replace(other, buffer=np.zeros(4, dtype=np.float32)))


# ---- through Ray's object store --------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_another_process_reads_the_packed_adapter_from_the_store_without_copying(ray_session):
    ray = ray_session
    adapter = _adapter()

    @ray.remote
    def receive(packed: PackedAdapter):
        state = unpack(packed).state_dict
        return packed.buffer.flags.writeable, {name: tensor.clone() for name, tensor in state.items()}

    writeable, received = ray.get(receive.remote(ray.put(pack(adapter))))
    assert not writeable  # a view of the object store's shared memory, as the module's docstring says
    for name, tensor in adapter.state_dict.items():
        assert torch.equal(_bits(received[name]), _bits(tensor)), name


# ---- a rollout worker ------------------------------------------------------------------------------
def test_a_rollout_worker_loaded_from_the_packed_form_generates_as_from_the_plain_form(small_model_dir):
    from grpodx.config import load_config
    from grpodx.env import make_judge, make_patient
    from grpodx.learner import Learner
    from grpodx.medical.cases import CaseSampler
    from grpodx.medical.knowledge import load_knowledge_base
    from grpodx.rollout import RolloutWorker

    config = load_config(
        None,
        [
            f"model.name={small_model_dir}",
            "lora.rank=4",
            "lora.alpha=8",
            "episode.max_turns=2",
            "episode.sampling.max_new_tokens=8",
        ],
    )
    learner = Learner(config, str(small_model_dir), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh B matrices are zero: give the adapter an effect
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    plain = dataclasses.replace(learner.adapter(), version=1)
    packed = pack(dataclasses.replace(learner.adapter(copy=False), version=1))  # as LearnerActor.publish
    packed.buffer.setflags(write=False)  # as it arrives from the object store
    sent = packed.buffer.tobytes()

    cases = [CaseSampler(load_knowledge_base(), "train", 0).sample() for _ in range(2)]
    tokens = {}
    for form, adapter in (("plain", plain), ("packed", unpack(packed))):
        worker = RolloutWorker(form, config, str(small_model_dir), make_patient(config), make_judge(config))
        assert worker.load_adapter(adapter) == 1
        batch = asyncio.run(worker.evaluate(cases, temperature=1.0))
        tokens[form] = batch.column("token_ids").to_pylist()
    base = asyncio.run(worker.evaluate(cases, adapter_version=0, temperature=1.0))
    assert tokens["packed"] == tokens["plain"] != base.column("token_ids").to_pylist()
    assert packed.buffer.tobytes() == sent  # the engine only read the shared buffer


# ---- where the vLLM engine writes adapters --------------------------------------------------------
def test_vllm_adapter_files_go_to_ram_when_it_has_room(tmp_path):
    import tempfile

    assert adapter_parent_dir(1, ram_dir=tmp_path) == tmp_path  # assumes this disk has 512 MiB free
    fallback = Path(tempfile.gettempdir())
    assert adapter_parent_dir(2**60, ram_dir=tmp_path) == fallback  # no room
    assert adapter_parent_dir(1, ram_dir=tmp_path / "missing") == fallback
    assert RAM_HEADROOM_BYTES > 0
