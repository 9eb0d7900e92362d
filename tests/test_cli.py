"""The command line: eval prints its figures, bad input stops with one clear sentence."""

from __future__ import annotations

from typer.testing import CliRunner

from grpodx.cli import app

RUNNER = CliRunner()


def test_eval_prints_the_figures(small_model_dir):
    result = RUNNER.invoke(
        app, ["eval", "--cases", "3", f"model.name={small_model_dir}", "episode.max_turns=1"]
    )
    assert result.exit_code == 0, result.output
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
