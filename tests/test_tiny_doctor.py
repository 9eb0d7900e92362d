"""The tiny doctor: Phi-4's format, a deterministic build, and a warm start that beats guessing."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from grpodx.config import load_config
from grpodx.dialogue import (
    IM_END,
    IM_SEP,
    IM_START,
    PAD,
    REASON_CLOSE,
    REASON_OPEN,
    ChatCodec,
    parse_final_diagnosis,
    strip_reasoning,
)
from grpodx.evaluation import paired_difference, summarize
from grpodx.local import evaluate_doctors
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.models import doctor_source
from grpodx.tiny.build import recipe_hash, scripted_dialogues, tiny_doctor_path
from grpodx.tiny.scripted import ScriptedDoctor
from tests.conftest import save_perturbed_adapter

KB = load_knowledge_base()


def test_tokenizer_carries_phi4_tokens_and_template(small_tokenizer):
    for token in (IM_START, IM_SEP, IM_END, PAD):
        ids = small_tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = small_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>U<|im_end|>"
    assert text == expected + "<|im_start|>assistant<|im_sep|>"
    assert small_tokenizer.eos_token == IM_END and small_tokenizer.pad_token == PAD
    chat = ChatCodec(small_tokenizer)
    assert chat.decode(chat.encode("Do you have a fever?") + [chat.im_end_id]) == "Do you have a fever?"


def test_scripted_dialogues_follow_the_rules():
    episode = load_config(None).episode
    dialogues = scripted_dialogues(60, seed=5, episode=episode)
    assert [d.messages for d in dialogues] == [d.messages for d in scripted_dialogues(60, 5, episode)]
    for dialogue in dialogues:
        doctor_turns = [c for role, c in dialogue.messages if role == "assistant"]
        assert 2 <= len(doctor_turns) <= episode.max_turns
        for turn in doctor_turns:
            assert "<reason>" in turn and "</reason>" in turn
            assert dialogue.case.condition not in strip_reasoning(turn).visible or turn is doctor_turns[-1]
        assert parse_final_diagnosis(strip_reasoning(doctor_turns[-1]).visible) == dialogue.diagnosis
        notices = [c for role, c in dialogue.messages if role == "system"]
        assert len(notices) == (1 if len(doctor_turns) == episode.max_turns else 0)


def test_scripted_reasoning_restates_every_answer_so_far():
    """Each reasoning block lists the chief complaint and every earlier answer, in order, split yes/no."""
    episode = load_config(None).episode
    for dialogue in scripted_dialogues(40, seed=9, episode=episode):
        case = dialogue.case
        yes, no = [KB.symptom(case.chief_complaint).keywords[0]], []
        turns = [(role, content) for role, content in dialogue.messages if role != "system"]
        for (role, content), following in zip(turns, turns[1:] + [("end", "")], strict=True):
            if role != "assistant":
                continue
            thought = content[len(REASON_OPEN) : content.index(REASON_CLOSE)]
            expected = f"Yes: {', '.join(yes)}. No: {', '.join(no) if no else 'none'}."
            assert thought.startswith(expected), (thought, expected)
            if following[0] == "user":
                (asked,) = KB.symptoms_mentioned(strip_reasoning(content).visible)
                (yes if asked in case.present else no).append(KB.symptom(asked).keywords[0])
                assert following[1].startswith("Yes" if asked in case.present else "No")


def test_scripted_doctor_is_far_better_than_guessing():
    doctor = ScriptedDoctor(KB)
    sampler = CaseSampler(KB, "train", 11)
    rng = random.Random(0)
    right = sum(
        doctor.dialogue(case, rng).diagnosis == case.condition
        for case in (sampler.sample() for _ in range(200))
    )
    assert right / 200 > 10 / len(KB.conditions)


def test_build_is_deterministic_and_cached(tmp_path):
    overrides = [
        f"model.cache_dir={tmp_path}",
        "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1",
        "model.tiny.intermediate_size=64",
        "model.tiny.vocab_size=600",
        "model.tiny.warmstart_dialogues=48",
        "model.tiny.warmstart_epochs=1",
        "model.tiny.warmstart_batch_size=16",
    ]
    config = load_config(None, overrides)
    first = tiny_doctor_path(config.model, config.episode, progress=False)
    weights = load_file(first / "model.safetensors")
    assert json.loads((first / "recipe.json").read_text())["dialogues"] == 48
    # Cached: the same recipe returns the same directory without rebuilding.
    mtime = (first / "model.safetensors").stat().st_mtime
    assert tiny_doctor_path(config.model, config.episode, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime == mtime
    # Rebuilt from scratch elsewhere: identical weights.
    again = load_config(None, [*overrides[1:], f"model.cache_dir={tmp_path / 'other'}"])
    second = tiny_doctor_path(again.model, again.episode, progress=False)
    for name, tensor in load_file(second / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    # A different recipe is a different model.
    changed = load_config(None, [*overrides, "model.tiny.seed=99"])
    assert recipe_hash(changed.model, changed.episode) != recipe_hash(config.model, config.episode)


@pytest.mark.slow
def test_warm_started_doctor_beats_random_guessing():
    """Builds the real embedded doctor (a few minutes, once per recipe) and evaluates it."""
    config = load_config("configs/tiny-cpu.yaml", ["train.eval_cases=80"])
    (episodes,) = asyncio.run(evaluate_doctors(config, [None]))
    summary = summarize(episodes)
    random_guess = 1 / len(KB.conditions)
    assert summary["accuracy"] > 4 * random_guess, summary
    assert summary["finished"] > 0.8, summary
    assert summary["leaked"] < 0.2, summary


@pytest.mark.slow
def test_paired_evaluation_repeats_every_episode_of_the_same_weights(tmp_path):
    """`grpodx eval --compare` pairs cases; that is only sound if the same weights replay each case."""
    import shutil

    config = load_config("configs/tiny-cpu.yaml", ["train.eval_cases=24"])  # T = 0.7 (the config's)
    save_perturbed_adapter(tmp_path / "first", doctor_source(config), seed=0, scale=0.05)
    second = shutil.copytree(tmp_path / "first", tmp_path / "second")
    base, first, again = asyncio.run(evaluate_doctors(config, [None, str(tmp_path / "first"), str(second)]))

    def replay(episodes):
        return [(e["case_id"], e["diagnosis"], e["turns"], e["reward"]) for e in episodes]

    assert replay(first) == replay(again)
    paired = paired_difference(first, again)
    assert paired["cases"] == 24 and paired["reward_diff"] == 0 and paired["better"] == paired["worse"] == 0
    # The adapter is really applied: the base doctor plays some of the cases differently.
    assert replay(first) != replay(base)
