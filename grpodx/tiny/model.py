"""The tiny doctor's tokenizer and architecture: Phi-4's format and module names at a few million parameters.

The tokenizer is a byte-level BPE trained on text the project generates, carrying Phi-4's special
tokens (``<|im_start|>``, ``<|im_sep|>``, ``<|im_end|>``, pad ``<|dummy_85|>``) and chat template. The
model is a ``Phi3ForCausalLM``: the same class, fused ``qkv_proj`` / ``gate_up_proj`` modules and
grouped-query attention as microsoft/phi-4, so every code path (LoRA targets, vLLM loading) is the
production one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from grpodx.config import TinyDoctorConfig
from grpodx.dialogue import ENDOFTEXT, IM_END, PAD, PHI4_CHAT_TEMPLATE, SPECIAL_TOKENS


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, PAD, ENDOFTEXT)],
    )
    tokenizer.chat_template = PHI4_CHAT_TEMPLATE
    tokenizer.model_max_length = 16384
    return tokenizer


def build_model(config: TinyDoctorConfig, tokenizer: PreTrainedTokenizerFast) -> Phi3ForCausalLM:
    torch.manual_seed(config.seed)
    phi3 = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=max(1, config.num_heads // 2),
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=250000.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Phi3ForCausalLM(phi3)
