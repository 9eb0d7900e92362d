"""A driver killed outright (SIGKILL) resumes as if nothing happened; Ctrl-C stops with a checkpoint.

Each run is `grpodx train` in its own process (and session, so that the kill takes its local Ray
cluster with it, as a crashed machine would), on the small doctor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 4


def _train_args(model_dir, run_dir, run_name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "grpodx.cli",
        "train",
        f"model.name={model_dir}",
        f"train.run_dir={run_dir}",
        f"train.run_name={run_name}",
        f"train.max_steps={STEPS}",
        "train.save_steps=1",
        "train.batch_size=2",
        "train.eval_cases=0",
        "grpo.num_generations=2",
        "grpo.lr=1e-2",
        "lora.rank=4",
        "episode.max_turns=2",
        "episode.sampling.max_new_tokens=6",
        "ray.num_rollout_workers=1",
        *extra,
    ]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until ``path`` exists and holds something."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.stat().st_size:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


def _run(args: list[str]) -> str:
    finished = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout + finished.stderr


def _metrics(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), f"a step logged twice or out of order: {steps}"
    return {line["step"]: line for line in lines}


def test_a_driver_killed_mid_run_resumes_like_an_uninterrupted_run(small_model_dir, tmp_path):
    reference = tmp_path / "reference"
    _run(_train_args(small_model_dir, tmp_path, "reference"))

    crashed = tmp_path / "crashed"
    process = _start(_train_args(small_model_dir, tmp_path, "crashed"))
    try:
        _wait_for(crashed / "checkpoints" / "step-000002" / "orchestrator.json", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        process.wait()
    assert not (crashed / "checkpoints" / f"step-{STEPS:06d}").exists(), "killed too late to test anything"
    output = _run(
        [
            *_train_args(small_model_dir, tmp_path, "crashed"),
            "--load-checkpoint",
            str(crashed / "checkpoints" / "step-000002"),
        ]
    )
    assert "resumed from checkpoints/step-000002 at step 2" in output

    # Every step logged once; the resumed steps' rollouts equal the uninterrupted run's, and the
    # training figures match within float noise (the case stream, adapter, optimizer and RNG resumed).
    ours, theirs = _metrics(crashed), _metrics(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        for key in ("reward/mean", "episodes/turns", "tokens/doctor"):
            assert ours[step][key] == theirs[step][key], (step, key)
        for key in ("learner/loss", "learner/grad_norm", "learner/kl"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-7), (step, key)
    # No trajectory of a completed step lost or doubled: the same groups, cases and rewards.
    columns = ["step", "group_id", "case_id", "sample_index", "reward"]
    frames = [pd.read_parquet(run / "trajectories", columns=columns) for run in (crashed, reference)]
    frames = [frame.sort_values(["group_id", "sample_index"]).reset_index(drop=True) for frame in frames]
    pd.testing.assert_frame_equal(frames[0], frames[1])
    adapter = f"checkpoints/step-{STEPS:06d}/adapter/adapter_model.safetensors"
    final = [load_file(run / adapter) for run in (crashed, reference)]
    for name, tensor in final[1].items():
        assert (final[0][name] - tensor).abs().max() < 1e-5, name


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(small_model_dir, tmp_path):
    run = tmp_path / "interrupted"
    process = _start(
        _train_args(small_model_dir, tmp_path, "interrupted", "train.max_steps=1000", "train.save_steps=100")
    )
    try:
        _wait_for(run / "metrics.jsonl", process)
        os.kill(process.pid, signal.SIGINT)  # the driver alone, as a terminal's Ctrl-C reaches it
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    step = max(_metrics(run))
    checkpoint = run / "checkpoints" / f"step-{step:06d}"
    assert f"interrupted at step {step}; resume with --load-checkpoint {checkpoint}" in output
    assert json.loads((checkpoint / "orchestrator.json").read_text())["step"] == step
    assert not list(run.rglob("*.tmp")), "a half-written file was left behind"
