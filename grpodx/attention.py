"""Grouped-query attention that reads the shared key/value heads in place, for models run on CPU.

transformers' ``sdpa`` attention expands every key/value head to the query heads it serves
(``repeat_kv``: a copy of the whole KV cache, per layer, per decoded token) whenever there is an
attention mask, because on CUDA a masked grouped call falls back to a slow kernel. On CPU, torch's
``scaled_dot_product_attention(..., enable_gqa=True)`` takes the mask and the grouped heads directly
and gives the same numbers (bit for bit on the tiny doctor, tests/test_attention.py). For the tiny
doctor (4 query heads over 2 key/value heads) the copies were about a third of a decode step's time.

The attention is registered with transformers under :data:`GROUPED_SDPA` and chosen by
:func:`grpodx.models.load_doctor` for grouped-query models on CPU; GPU runs keep ``sdpa``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

GROUPED_SDPA = "grpodx_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """[batch, heads, length, dim] query against [batch, kv heads, length, dim] key and value; returns
    [batch, length, heads, dim], as transformers' attention functions do."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # A mask already says what each query sees; without one, the causal flag does (prefill only: a
    # single decoded query sees everything before it).
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def uses_grouped_query_attention(model_config) -> bool:
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    return heads is not None and kv_heads < heads
