"""``grpodx export``: a checkpoint's adapter alone (peft) or merged into the base (plain transformers),
each giving the logits of base + adapter; bad input stops with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from grpodx.cli import app
from grpodx.dialogue import DOCTOR_SYSTEM_PROMPT
from grpodx.models import load_doctor
from tests.conftest import save_perturbed_adapter

RUNNER = CliRunner()
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
# float32 throughout: merging W + scale * B @ A reorders a few additions, nothing more.
TOLERANCE = 1e-5
SEQUENCES = [
    [1, 5, 17, 42, 99, 3],
    [1, 200, 7, 7, 7, 150, 80, 3, 1, 12],
    list(range(5, 45)),
]


@pytest.fixture(scope="module")
def checkpoint(small_model_dir, tmp_path_factory):
    """A checkpoint laid out as training writes it, ``<dir>/adapter/``, with a non-zero LoRA."""
    directory = tmp_path_factory.mktemp("checkpoint") / "step-000010"
    save_perturbed_adapter(directory / "adapter", small_model_dir, seed=1, scale=0.5)
    return directory


def _export(checkpoint, out, model_dir, *extra: str):
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--config", CONFIG]
    return RUNNER.invoke(app, [*args, *extra, f"model.name={model_dir}"])


def _logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in SEQUENCES]


@pytest.fixture(scope="module")
def reference(small_model_dir, checkpoint):
    """Logits of the base model, and of the base with the checkpoint's adapter through peft."""
    base, _ = load_doctor(str(small_model_dir))
    plain = _logits(base)
    tuned = _logits(PeftModel.from_pretrained(base, str(checkpoint / "adapter")).eval())
    # The adapter matters: a test of equal logits must not pass because it changes nothing.
    assert max((a - b).abs().max().item() for a, b in zip(plain, tuned, strict=True)) > 1e-2
    return tuned


def _max_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


def test_merged_export_is_a_plain_model_with_the_adapters_logits(
    small_model_dir, checkpoint, reference, tmp_path
):
    out = tmp_path / "merged"
    result = _export(checkpoint, out, small_model_dir, "--merge")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert type(merged).__name__ == "Phi3ForCausalLM" and merged.dtype == torch.float32
    assert _max_difference(_logits(merged), reference) <= TOLERANCE
    # The tokenizer and its chat template came along: the directory is a whole model.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": DOCTOR_SYSTEM_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant<|im_sep|>")
    info = json.loads((out / "grpodx_export.json").read_text())
    assert info["base_model"] == str(small_model_dir) and info["format"].startswith("transformers")
    assert info["lora_rank"] == 4 and info["checkpoint"] == str(checkpoint.resolve())


def test_adapter_export_loads_with_peft_and_gives_the_same_logits(
    small_model_dir, checkpoint, reference, tmp_path
):
    out = tmp_path / "adapter"
    out.mkdir()  # an empty directory is a fine place to write
    result = _export(checkpoint, out, small_model_dir)
    assert result.exit_code == 0, result.output
    assert f"--lora-modules doctor={out}" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "grpodx_export.json",
    ]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(small_model_dir) and saved["r"] == 4
    info = json.loads((out / "grpodx_export.json").read_text())
    assert info["base_model"] == str(small_model_dir) and info["format"] == "peft LoRA adapter"
    base, _ = load_doctor(str(small_model_dir))
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    assert _max_difference(_logits(loaded), reference) <= TOLERANCE


def test_the_runs_config_is_the_default(small_model_dir, checkpoint, tmp_path):
    """``runs/<run>/checkpoints/step-N``: without --config the run's config.yaml names the model."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000010"
    save_perturbed_adapter(step / "adapter", small_model_dir, seed=2)
    (run / "config.yaml").write_text(f"model:\n  name: {small_model_dir}\n")
    result = RUNNER.invoke(app, ["export", "--checkpoint", str(step), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "grpodx_export.json").read_text())["base_model"] == str(
        small_model_dir
    )


def _bad_inputs(tmp_path, checkpoint):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    return {
        "no such checkpoint": (tmp_path / "missing", tmp_path / "o1", [], "no such directory"),
        "a checkpoint without an adapter": (no_adapter, tmp_path / "o2", [], "holds no adapter"),
        "--out not empty": (checkpoint, full, [], "exists and is not empty"),
        "--out a file": (checkpoint, a_file, ["--merge"], "exists and is not a directory"),
        # The shipped tiny doctor is larger than the small model the adapter was trained on.
        "an adapter for another model": (checkpoint, tmp_path / "o3", ["model.name=tiny"], "does not fit"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no such checkpoint",
        "a checkpoint without an adapter",
        "--out not empty",
        "--out a file",
        "an adapter for another model",
    ],
)
def test_bad_input_is_one_line(case, small_model_dir, checkpoint, tmp_path):
    source, out, extra, expected = _bad_inputs(tmp_path, checkpoint)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    # model.name given last wins; "another model" overrides it with the shipped doctor.
    args = ["export", "--checkpoint", str(source), "--out", str(out), "--config", CONFIG]
    result = RUNNER.invoke(app, [*args, f"model.name={small_model_dir}", *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left behind
    if case.startswith("--out"):
        assert (out / "keep.txt" if out.is_dir() else out).read_text() == "mine"
