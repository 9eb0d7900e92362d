"""The warm-started tiny doctor: shipped with the package, rebuilt from its recipe on demand.

The recipe is everything that decides the doctor's weights: the tiny-model config, the knowledge base,
the system prompt and turn rules, the scripted resident's dialogues (fingerprinted by the text of the
first few), and the source of the functions that tokenise, build and train. Its hash names the
doctor. The package ships the doctor of the default recipe (``grpodx/tiny/doctor/``: tokenizer, fp16
weights, ``recipe.json``), so neither ``make train`` nor the tests pay for its build (10 to 60 minutes
on 2 CPU cores). Any other recipe (a config override, an edited resident) is built on first use into
``<cache>/tiny-doctor-<hash>`` and reused after that.

A build is deterministic: the same recipe gives the same tokenizer and weights on the same machine
(``grpodx build-tiny --rebuild`` checks it against the shipped files). Another CPU may round
differently. Whoever changes the recipe rebuilds the shipped files with ``grpodx build-tiny --rebuild
--ship``; ``tests/test_tiny_doctor.py`` fails until they do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Phi3ForCausalLM

from grpodx.config import EpisodeConfig, ModelConfig
from grpodx.dialogue import ChatCodec, render_message
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import DEFAULT_PATH, load_knowledge_base
from grpodx.tiny import model as tiny_model
from grpodx.tiny.scripted import ScriptedDialogue, ScriptedDoctor

# Bump when the build changes in a way neither the config nor the hashed sources show.
RECIPE_VERSION = 3
SHIPPED_DIR = Path(__file__).parent / "doctor"
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
# Stored in half precision to keep the package small; every engine loads it as float32, so the model
# that trains and the one that was built are the same numbers (the build rounds before it saves).
STORAGE_DTYPE = torch.float16
# The warm start draws its cases from the train split with its own seed, so it never sees eval cases
# and does not replay the exact stream GRPO will sample.
WARMSTART_SAMPLER_SEED = 7919
# Dialogues whose text stands for the resident's behaviour in the recipe hash.
FINGERPRINT_DIALOGUES = 64


def cache_root(model_config: ModelConfig) -> Path:
    root = model_config.cache_dir or os.environ.get("GRPODX_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grpodx"
    return Path(root)


def recipe(model_config: ModelConfig, episode: EpisodeConfig) -> dict:
    """What decides the doctor's weights, as JSON-able values (hashed by :func:`recipe_hash`)."""
    digest = hashlib.sha256
    dialogues = scripted_dialogues(FINGERPRINT_DIALOGUES, model_config.tiny.seed, episode, model_config)
    # The text, and what of it is learned from.
    text = "".join(
        render_message(role, content) + json.dumps(d.unlearned.get(index))
        for d in dialogues
        for index, (role, content) in enumerate(d.messages)
    )
    sources = "".join(inspect.getsource(function) for function in _RECIPE_CODE)
    return {
        "version": RECIPE_VERSION,
        "tiny": model_config.tiny.model_dump(),
        "system_prompt": episode.system_prompt,
        "last_turn_notice": episode.last_turn_notice,
        "max_turns": episode.max_turns,
        "knowledge_base": digest(DEFAULT_PATH.read_bytes()).hexdigest(),
        "dialogues": digest(text.encode()).hexdigest(),
        "sources": digest(sources.encode()).hexdigest(),
    }


def recipe_hash(model_config: ModelConfig, episode: EpisodeConfig) -> str:
    encoded = json.dumps(recipe(model_config, episode), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def shipped_recipe() -> dict | None:
    """The ``recipe.json`` of the doctor shipped with the package, if any."""
    path = SHIPPED_DIR / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def tiny_doctor_path(model_config: ModelConfig, episode: EpisodeConfig, progress: bool = True) -> Path:
    """Directory of the warm-started tiny doctor (tokenizer + model): shipped, cached, or built now."""
    wanted = recipe_hash(model_config, episode)
    shipped = shipped_recipe()
    if shipped is not None and shipped["recipe_hash"] == wanted:
        return SHIPPED_DIR
    root = cache_root(model_config)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"tiny-doctor-{wanted}"
    if (target / RECIPE_FILE).exists():
        return target
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same recipe
        if not (target / RECIPE_FILE).exists():
            _build_into(target, model_config, episode, progress)
    return target


def rebuild(model_config: ModelConfig, episode: EpisodeConfig, out_dir: Path, progress: bool = True) -> Path:
    """Build from the recipe into ``out_dir`` (replaced), ignoring the shipped and cached doctors."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _build_into(out_dir, model_config, episode, progress)
    return out_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a built doctor, by name (a few MB): what :func:`compare` compares."""
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


def compare(reference: dict[str, bytes], rebuilt: dict[str, bytes]) -> str:
    """One line per file: identical, or how it differs (the weights tensor by tensor)."""
    lines = []
    for name in sorted(set(reference) | set(rebuilt)):
        if name == RECIPE_FILE:
            continue  # holds the build time and machine, which differ by design
        if reference.get(name) == rebuilt.get(name):
            lines.append(f"  {name}: identical, bit for bit")
        elif name not in reference or name not in rebuilt:
            lines.append(f"  {name}: only in the {'rebuilt' if name in rebuilt else 'shipped'} doctor")
        elif name == WEIGHTS_FILE:
            lines.append(f"  {name}: differs ({_weights_difference(reference[name], rebuilt[name])})")
        else:
            lines.append(f"  {name}: differs")
    same = all(line.endswith("bit for bit") for line in lines)
    verdict = "identical to the shipped doctor" if same else "differs from the shipped doctor"
    hint = "" if same else " (a build on another CPU or library version may round differently)"
    return f"rebuilt doctor {verdict}{hint}:\n" + "\n".join(lines)


def _weights_difference(reference: bytes, rebuilt: bytes) -> str:
    from safetensors.torch import load

    first, second = load(reference), load(rebuilt)
    if first.keys() != second.keys():
        return "different tensor names"
    changed = [name for name in first if not torch.equal(first[name], second[name])]
    if not changed:
        return "same tensors, different file layout"
    largest = max(float((first[n].float() - second[n].float()).abs().max()) for n in changed)
    return f"{len(changed)} of {len(first)} tensors, largest difference {largest:.3g}"


def _build_into(target: Path, model_config: ModelConfig, episode: EpisodeConfig, progress: bool) -> None:
    """Build in a staging directory beside ``target`` and swap it in, so no half-built doctor is seen."""
    staging = Path(tempfile.mkdtemp(prefix=".tiny-doctor-", dir=target.parent))
    try:
        build_tiny_doctor(model_config, episode, staging, progress=progress)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".tiny-doctor-old-", dir=target.parent))
            target.rename(old / "doctor")
            shutil.rmtree(old)
        staging.rename(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)


def scripted_dialogues(
    count: int, seed: int, episode: EpisodeConfig, model_config: ModelConfig | None = None
) -> list[ScriptedDialogue]:
    """The warm start's dialogues: the resident's own, and (``coverage_share`` of them) interviews of
    a fixed length, 1 to max_turns - 1 questions, whose go-on-or-stop words carry no loss."""
    tiny = (model_config or ModelConfig()).tiny
    kb = load_knowledge_base()
    doctor = ScriptedDoctor(kb, separate_share=tiny.separate_share, last_turn_notice=episode.last_turn_notice)
    sampler = CaseSampler(kb, "train", WARMSTART_SAMPLER_SEED + seed)
    rng = random.Random(seed)
    dialogues = []
    for _ in range(count):
        questions = None
        if episode.max_turns > 1 and rng.random() < tiny.coverage_share:
            questions = rng.randint(1, episode.max_turns - 1)
        dialogues.append(doctor.dialogue(sampler.sample(), rng, episode.max_turns, questions))
    return dialogues


def corpus(dialogues: list[ScriptedDialogue], system_prompt: str) -> list[str]:
    """The tokenizer's training text: dialogues, plus every name and phrase the doctor might need."""
    kb = load_knowledge_base()
    texts = [render_message("system", system_prompt)]
    texts += [render_message(role, content) for d in dialogues for role, content in d.messages]
    texts += [" ".join(c.all_names()) for c in kb.conditions]
    texts += [f"Do you have {s.phrase}? " + " ".join(s.keywords) for s in kb.symptoms]
    return texts


def encode_dialogue(
    chat: ChatCodec, system_prompt: str, dialogue: ScriptedDialogue
) -> tuple[list[int], list[int]]:
    """Token ids in the episode's exact layout, and the mask of the doctor's tokens (content + <|im_end|>)
    that the warm start learns from: all of them but the plan words the dialogue marks unlearned."""
    ids = chat.message("system", system_prompt)
    mask = [0] * len(ids)
    for index, (role, content) in enumerate(dialogue.messages):
        if role == "assistant":
            prompt = chat.generation_prompt()
            body, learned = _encode_learned(chat, content, dialogue.unlearned.get(index))
            ids += prompt + body + [chat.im_end_id]
            mask += [0] * len(prompt) + learned + [1]
        else:
            message = chat.message(role, content)
            ids += message
            mask += [0] * len(message)
    return ids, mask


def _encode_learned(
    chat: ChatCodec, content: str, span: tuple[int, int] | None
) -> tuple[list[int], list[int]]:
    """Ids of ``content`` and a 0/1 mask that is 0 over the characters of ``span``."""
    if span is None:
        body = chat.encode(content)
        return body, [1] * len(body)
    start, end = span
    pieces = [chat.encode(content[:start]), chat.encode(content[start:end]), chat.encode(content[end:])]
    body = [token for piece in pieces for token in piece]
    if body != chat.encode(content):
        # The span must start and end where tokens do, or its mask would cover the wrong tokens.
        raise ValueError(f"{content[start:end]!r} does not fall on token boundaries in {content!r}")
    return body, [1] * len(pieces[0]) + [0] * len(pieces[1]) + [1] * len(pieces[2])


def build_tiny_doctor(
    model_config: ModelConfig, episode: EpisodeConfig, out_dir: Path, progress: bool = True
) -> None:
    started = time.perf_counter()
    tiny = model_config.tiny
    system_prompt = episode.system_prompt
    torch.manual_seed(tiny.seed)
    dialogues = scripted_dialogues(tiny.warmstart_dialogues, tiny.seed, episode, model_config)
    # The tokenizer needs far fewer dialogues than the model to find its merges.
    tokenizer = tiny_model.train_tokenizer(corpus(dialogues[:5000], system_prompt), tiny.vocab_size)
    chat = ChatCodec(tokenizer)
    encoded = [encode_dialogue(chat, system_prompt, d) for d in dialogues]
    model = tiny_model.build_model(tiny, tokenizer)
    supervised_warm_start(model, encoded, tokenizer.pad_token_id, model_config, progress=progress)
    model.to(STORAGE_DTYPE).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    weights = (out_dir / WEIGHTS_FILE).read_bytes()
    (out_dir / RECIPE_FILE).write_text(
        json.dumps(
            {
                "recipe_hash": recipe_hash(model_config, episode),
                "recipe": recipe(model_config, episode),
                "parameters": model.num_parameters(),
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "built_with": {
                    "torch": torch.__version__,
                    "transformers": _version("transformers"),
                    "machine": platform.machine(),
                    "processor": _cpu_name(),
                    "threads": torch.get_num_threads(),
                },
                "build_seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
        + "\n"
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


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# The code whose every change changes the weights, taken at import so that a test's stand-in for one of
# them does not change the recipe it is checked against.
_RECIPE_CODE = (
    tiny_model.train_tokenizer,
    tiny_model.build_model,
    corpus,
    encode_dialogue,
    _encode_learned,
    build_tiny_doctor,
    supervised_warm_start,
)
