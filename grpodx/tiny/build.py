"""Build (or find in the cache) the warm-started tiny doctor.

The recipe (tiny-model config, knowledge base, system prompt, this module's RECIPE_VERSION) is hashed;
the model is built once per recipe into ``<cache>/tiny-doctor-<hash>`` and reused after that. A build
is deterministic: the same recipe gives the same tokenizer and the same weights on the same machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Phi3ForCausalLM, PreTrainedTokenizerFast

from grpodx.config import EpisodeConfig, ModelConfig
from grpodx.dialogue import ChatCodec, render_message
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.tiny.model import build_model, train_tokenizer
from grpodx.tiny.scripted import ScriptedDialogue, ScriptedDoctor

RECIPE_VERSION = 2
# The warm start draws its cases from the train split with its own seed, so it never sees eval cases
# and does not replay the exact stream GRPO will sample.
WARMSTART_SAMPLER_SEED = 7919


def cache_root(model_config: ModelConfig) -> Path:
    root = model_config.cache_dir or os.environ.get("GRPODX_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grpodx"
    return Path(root)


def recipe_hash(model_config: ModelConfig, episode: EpisodeConfig) -> str:
    kb_text = (Path(__file__).parents[1] / "medical" / "knowledge_base.yaml").read_bytes()
    recipe = {
        "version": RECIPE_VERSION,
        "tiny": model_config.tiny.model_dump(),
        "system_prompt": episode.system_prompt,
        "last_turn_notice": episode.last_turn_notice,
        "max_turns": episode.max_turns,
        "kb": hashlib.sha256(kb_text).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def tiny_doctor_path(model_config: ModelConfig, episode: EpisodeConfig, progress: bool = True) -> Path:
    """Directory of the warm-started tiny doctor (tokenizer + model), building it if needed."""
    root = cache_root(model_config)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"tiny-doctor-{recipe_hash(model_config, episode)}"
    if (target / "config.json").exists():
        return target
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same recipe
        if not (target / "config.json").exists():
            staging = Path(tempfile.mkdtemp(prefix="tiny-doctor-", dir=root))
            try:
                build_tiny_doctor(model_config, episode, staging, progress=progress)
                staging.rename(target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(staging)
    return target


def scripted_dialogues(count: int, seed: int, episode: EpisodeConfig) -> list[ScriptedDialogue]:
    kb = load_knowledge_base()
    doctor = ScriptedDoctor(kb, last_turn_notice=episode.last_turn_notice)
    sampler = CaseSampler(kb, "train", WARMSTART_SAMPLER_SEED + seed)
    rng = random.Random(seed)
    return [doctor.dialogue(sampler.sample(), rng, episode.max_turns) for _ in range(count)]


def _corpus(dialogues: list[ScriptedDialogue], system_prompt: str) -> list[str]:
    kb = load_knowledge_base()
    texts = [render_message("system", system_prompt)]
    texts += [render_message(role, content) for d in dialogues for role, content in d.messages]
    # Every name and phrase the doctor might need, so each has compact tokens.
    texts += [" ".join(c.all_names()) for c in kb.conditions]
    texts += [f"Do you have {s.phrase}? " + " ".join(s.keywords) for s in kb.symptoms]
    return texts


def encode_dialogue(
    chat: ChatCodec, system_prompt: str, dialogue: ScriptedDialogue
) -> tuple[list[int], list[int]]:
    """Token ids in the episode's exact layout, and the mask of the doctor's tokens (content + <|im_end|>)."""
    ids = chat.message("system", system_prompt)
    mask = [0] * len(ids)
    for role, content in dialogue.messages:
        if role == "assistant":
            prompt = chat.generation_prompt()
            body = chat.encode(content) + [chat.im_end_id]
            ids += prompt + body
            mask += [0] * len(prompt) + [1] * len(body)
        else:
            message = chat.message(role, content)
            ids += message
            mask += [0] * len(message)
    return ids, mask


def build_tiny_doctor(
    model_config: ModelConfig, episode: EpisodeConfig, out_dir: Path, progress: bool = True
) -> None:
    tiny = model_config.tiny
    system_prompt = episode.system_prompt
    torch.manual_seed(tiny.seed)
    dialogues = scripted_dialogues(tiny.warmstart_dialogues, tiny.seed, episode)
    tokenizer = train_tokenizer(_corpus(dialogues, system_prompt), tiny.vocab_size)
    chat = ChatCodec(tokenizer)
    encoded = [encode_dialogue(chat, system_prompt, d) for d in dialogues]
    model = build_model(tiny, tokenizer)
    supervised_warm_start(model, encoded, tokenizer.pad_token_id, model_config, progress=progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(
        json.dumps(
            {"tiny": tiny.model_dump(), "dialogues": len(dialogues), "parameters": model.num_parameters()}
        )
    )


def supervised_warm_start(
    model: Phi3ForCausalLM,
    encoded: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    model_config: ModelConfig,
    progress: bool = True,
) -> None:
    """Next-token cross-entropy on the doctor's tokens only, over length-bucketed batches."""
    tiny = model_config.tiny
    rng = random.Random(tiny.seed)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches = [
        order[i : i + tiny.warmstart_batch_size] for i in range(0, len(order), tiny.warmstart_batch_size)
    ]
    total_steps = len(batches) * tiny.warmstart_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.warmstart_lr, weight_decay=0.01)
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / total_steps)
    )
    model.train()
    bar = tqdm(total=total_steps, desc="warm-starting the tiny doctor", disable=not progress, unit="step")
    for _ in range(tiny.warmstart_epochs):
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_token_id)
            labels = torch.full((len(batch), width), -100)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids, mask = encoded[index]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def load_tiny_doctor(path: Path, device: str = "cpu") -> tuple[Phi3ForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model.eval(), tokenizer
