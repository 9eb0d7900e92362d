"""The command line: eval prints its figures, bad input stops with one clear sentence."""

from __future__ import annotations

import pyarrow.parquet as pq
from typer.testing import CliRunner

from grpodx.cli import app
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from tests.conftest import save_perturbed_adapter

RUNNER = CliRunner()


def test_eval_prints_the_figures_and_keeps_the_episodes(small_model_dir, tmp_path):
    result = RUNNER.invoke(
        app,
        [
            "eval",
            "--cases",
            "3",
            f"model.name={small_model_dir}",
            "episode.max_turns=1",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    # The episodes are the same record as a training run's, one per case.
    episodes = pq.read_table(tmp_path / "base.parquet")
    assert episodes.schema == TRAJECTORY_SCHEMA and episodes.num_rows == 3
    assert episodes.column("group_id").to_pylist() == [
        f"eval-{c}" for c in episodes.column("case_id").to_pylist()
    ]
    assert f"episodes: {tmp_path / 'base.parquet'}" in result.output
    for figure in (
        "accuracy",
        "random guess",
        "mean reward",
        "mean turns",
        "final diagnosis",
        "reasoning leaked",
    ):
        assert figure in result.output


def test_train_rejects_an_unknown_key():
    result = RUNNER.invoke(app, ["train", "grpo.lrr=1"])
    assert result.exit_code == 2
    assert "unknown config key 'grpo.lrr'" in result.output


def test_api_backends_need_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = RUNNER.invoke(app, ["train", "patient.kind=openai"])
    assert result.exit_code == 2
    assert "--openai-api-key" in result.output


def test_missing_checkpoint_is_named(tmp_path):
    result = RUNNER.invoke(app, ["train", "--load-checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "load-checkpoint" in result.output


def test_eval_compare_prints_both_doctors_and_the_paired_difference(small_model_dir, tmp_path):
    adapter = save_perturbed_adapter(tmp_path / "adapter", small_model_dir, seed=1)
    args = ["eval", "--cases", "6", "--temperature", "0.7", f"model.name={small_model_dir}"]
    args += ["episode.max_turns=2", "--checkpoint", str(adapter), "--compare", "base", "--out", str(tmp_path)]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"evaluation of {adapter}" in result.output
    assert "evaluation of the base doctor" in result.output
    assert f"{adapter} minus base on 6 cases (same cases and seeds)" in result.output
    assert "cases better / worse" in result.output


def test_eval_compare_needs_two_different_doctors():
    result = RUNNER.invoke(app, ["eval", "--compare", "base"])
    assert result.exit_code == 2
    assert "--checkpoint" in result.output


def test_build_tiny_finds_the_shipped_doctor_and_rebuilds_on_request(tmp_path, monkeypatch):
    from grpodx.tiny.build import SHIPPED_DIR

    monkeypatch.setenv("GRPODX_CACHE", str(tmp_path / "cache"))
    result = RUNNER.invoke(app, ["build-tiny"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(SHIPPED_DIR)
    # --ship and --out only mean something with --rebuild.
    result = RUNNER.invoke(app, ["build-tiny", "--ship"])
    assert result.exit_code == 2 and "--rebuild" in result.output
    # Another recipe rebuilds into --out; there is no shipped doctor of that recipe to compare with.
    small = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64"]
    small += [
        "model.tiny.vocab_size=600",
        "model.tiny.warmstart_dialogues=32",
        "model.tiny.warmstart_batch_size=16",
    ]
    small += ["model.tiny.warmstart_epochs=1"]
    result = RUNNER.invoke(app, ["build-tiny", "--rebuild", "--out", str(tmp_path / "doctor"), *small])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "doctor" / "model.safetensors").is_file()
    assert "nothing to compare with" in result.output


def test_checkpoint_path_without_a_run_directory_is_named():
    # "/nonexistent" has no run directory above it: once an IndexError traceback.
    for path in ("/nonexistent", "/nonexistent/"):
        result = RUNNER.invoke(app, ["train", "--load-checkpoint", path])
        assert result.exit_code == 2, result.output
        assert f"--load-checkpoint {path}: not a checkpoint directory" in result.output, result.output
        assert "Traceback" not in result.output


def test_zero_rollout_workers_stop_before_anything_starts():
    result = RUNNER.invoke(app, ["train", "--num-rollout-workers", "0"])
    assert result.exit_code == 2
    assert "'ray.num_rollout_workers'" in result.output and "greater than or equal to 1" in result.output


def test_eval_refuses_an_adapter_with_missing_tensors(small_model_dir, tmp_path):
    """peft loads non-strictly: half an adapter would evaluate silently with the rest at zero."""
    from safetensors.torch import load_file, save_file

    adapter = save_perturbed_adapter(tmp_path / "adapter", small_model_dir, seed=1)
    weights = load_file(adapter / "adapter_model.safetensors")
    kept = dict(sorted(weights.items())[: len(weights) // 2])
    save_file(kept, adapter / "adapter_model.safetensors")
    result = RUNNER.invoke(
        app, ["eval", "--cases", "2", "--checkpoint", str(adapter), f"model.name={small_model_dir}"]
    )
    assert result.exit_code == 2, result.output
    missing = len(weights) - len(kept)
    assert f"{adapter}: the adapter does not match this model's LoRA layers: {missing} of" in result.output
    assert "Traceback" not in result.output


def test_eval_of_no_cases_stops_instead_of_printing_nan():
    for args in (["--cases", "0"], ["--cases", "-2"], ["train.eval_cases=0"]):
        result = RUNNER.invoke(app, ["eval", *args])
        assert result.exit_code == 2, result.output
        assert "nan" not in result.output and ("--cases" in result.output)


def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_config_file(tmp_path):
    cases = [
        (["train", "--batch-size", "-1"], "--batch-size -1: bad value for 'train.batch_size'"),
        (["train", "train.batch_size=-1"], "override train.batch_size=-1: bad value for 'train.batch_size'"),
        # The override comes after the flag and wins: it is the one to blame.
        (["train", "--batch-size", "2", "train.batch_size=0"], "override train.batch_size=0:"),
        (["eval", "--temperature", "-1"], "--temperature -1.0: bad value for 'train.eval_temperature'"),
    ]
    for args, message in cases:
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "tiny-cpu.yaml" not in result.output, result.output
    # A bad value in the file itself still names the file.
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: -1\n")
    result = RUNNER.invoke(app, ["train", "--config", str(bad), "--max-steps", "3"])
    assert result.exit_code == 2 and f"{bad}: bad value for 'train.batch_size'" in result.output


def test_flag_help_shows_the_config_models_default():
    """The defaults are read from the config model (they cannot drift) and survive rich's markup."""
    from grpodx.config import TrainConfig

    result = RUNNER.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert f"training steps (config; default {TrainConfig().max_steps})" in result.output
    assert "LoRA rank (config; default 16)" in result.output
