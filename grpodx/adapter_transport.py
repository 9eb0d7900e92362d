"""How an adapter travels from the learner to the rollout workers: one byte buffer and a small index.

Ray pickles a torch tensor with torch's own reducer, so every rollout worker rebuilds every tensor of
the adapter by copying its bytes out of the object store: a Phi-4-sized rank-16 adapter in bf16
reached 4 workers in the time of about 30 memory copies (``grpodx bench --only weight_push``). A numpy
array, by contrast, travels out of band: a worker on the same node maps the object store's shared
memory instead of copying it (the same push: under 3 memory copies). So the learner packs the
adapter's tensors into one contiguous ``uint8`` array with an index of (name, dtype, shape, offset),
puts that in the object store once, and each worker unpacks it into torch tensors that are views of
the shared buffer (bf16, which numpy lacks, is stored as its bytes and reinterpreted by torch).

Read-only. The unpacked tensors share memory with every other reader of the object on the node;
numpy marks the buffer read-only, torch cannot. Nothing writes to them: the engines only read them
(the transformers engine copies them into its LoRA parameters when it switches to the version, the
vLLM engine writes them to a file), and whoever needs to modify one must ``clone()`` it first. Holding
them keeps the object pinned in the store, once per node, until the engine unloads the version.

(Ray's ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` does a similar thing per tensor, but it is a process-wide
switch every Ray worker must be started with; this module keeps the format explicit and testable.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from grpodx.engines.base import AdapterWeights

# Each tensor starts on a cache line, so its view is aligned for any dtype (and for vector loads).
ALIGNMENT = 64


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in the buffer: ``dtype`` is torch's name for it (``"bfloat16"``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _torch_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter as it travels through the object store: its tensors' bytes in one ``uint8`` array."""

    version: int
    index: tuple[TensorSlot, ...]
    buffer: np.ndarray
    peft_config: dict = field(default_factory=dict)


def pack(adapter: AdapterWeights) -> PackedAdapter:
    """Copy ``adapter``'s tensors (on any device) into one buffer, in state-dict order."""
    if not adapter.state_dict:
        raise ValueError(f"adapter version {adapter.version} has no tensors to pack")
    index, end = [], 0
    for name, tensor in adapter.state_dict.items():
        offset = -(-end // ALIGNMENT) * ALIGNMENT
        index.append(TensorSlot(name, _dtype_name(tensor.dtype), tuple(tensor.shape), offset))
        end = offset + tensor.numel() * tensor.element_size()
    buffer = np.empty(end, dtype=np.uint8)
    for slot, tensor in zip(index, adapter.state_dict.values(), strict=True):
        source = tensor.detach()
        if source.device.type == "cpu":
            # numpy copies on one thread. torch's copy_ splits each tensor over its thread pool, and on
            # busy cores the hundreds of small copies wait for its threads: packing Phi-4's adapter took
            # 1 to 8 s with 2 torch threads on 2 shared cores, 0.015 s this way.
            raw = source.contiguous().view(-1).view(torch.uint8).numpy()
            np.copyto(buffer[slot.offset : slot.offset + slot.nbytes], raw)
        else:  # a device-to-host copy
            _view(_as_tensor(buffer), slot).copy_(source)
    return PackedAdapter(adapter.version, tuple(index), buffer, dict(adapter.peft_config))


def unpack(packed: PackedAdapter) -> AdapterWeights:
    """The adapter as torch tensors that are views of ``packed.buffer`` (no copy; do not write to them)."""
    buffer = packed.buffer
    where = f"packed adapter version {packed.version}"
    if not packed.index:
        raise ValueError(f"{where} has an empty index: the learner published no tensors")
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"{where}: the buffer must be a 1-D uint8 numpy array, not {_describe(buffer)}")
    described = max(slot.offset + slot.nbytes for slot in packed.index)
    if described != buffer.size or min(slot.offset for slot in packed.index) < 0:
        raise ValueError(
            f"{where}: the index describes {described} bytes, the buffer holds {buffer.size}: "
            "index and buffer do not belong together"
        )
    whole = _as_tensor(buffer)
    state: dict[str, torch.Tensor] = {}
    for slot in packed.index:
        if slot.name in state:
            raise ValueError(f"{where}: the index names {slot.name} twice")
        state[slot.name] = _view(whole, slot)
    return AdapterWeights(packed.version, state, dict(packed.peft_config))


def _as_tensor(buffer: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # From the object store the array is read-only; torch warns that it cannot mark the tensor so.
        # The module's contract (see its docstring) is that nothing writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(buffer)


def _view(whole: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    """``slot``'s tensor as a view of the buffer (``whole``, uint8); offsets are aligned for its dtype."""
    return whole[slot.offset : slot.offset + slot.nbytes].view(_torch_dtype(slot.dtype)).view(slot.shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the packed adapter's index names an unknown torch dtype {name!r}")
    return dtype


def _describe(buffer: object) -> str:
    if isinstance(buffer, np.ndarray):
        return f"a {buffer.ndim}-D {buffer.dtype} array"
    return type(buffer).__name__
