"""A few real training steps through Ray: two rollout workers, one learner, checkpoints, resume."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from grpodx.config import load_config
from grpodx.orchestrator import Orchestrator
from tests.conftest import small_run_settings


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(model_dir, run_dir, max_steps, *extra):
    settings = [f"train.max_steps={max_steps}", "train.save_steps=1", "train.eval_cases=4", "grpo.lr=1e-2"]
    return load_config(None, small_run_settings(model_dir, run_dir, "ray-test", *settings, *extra))


def test_train_resume_and_trajectories(ray_session, small_model_dir, tmp_path):
    greedy_too = ["train.eval_temperature=0.7", "train.eval_greedy=true"]
    config = _config(small_model_dir, tmp_path, 2, *greedy_too)
    orchestrator = Orchestrator(config, progress=False)
    result = orchestrator.train()
    run_dir = result.run_dir
    assert result.steps == 2
    # Before and after played the same 4 held-out cases with the same seeds, paired case by case, at
    # the sampling temperature and greedily.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_paired"] == result.eval_paired and result.eval_paired["cases"] == 4
    assert summary["eval_greedy_paired"]["cases"] == 4
    assert summary["eval_greedy_before"]["episodes"] == summary["eval_greedy_after"]["episodes"] == 4
    assert "information_per_question" in summary["eval_after"]
    # The evaluation episodes are kept as training episodes are, and summarise to the same figures.
    from grpodx.data.trajectory import TRAJECTORY_SCHEMA
    from grpodx.evaluation import summarize

    for name, step in [("before", 0), ("after", 2), ("before-greedy", 0), ("after-greedy", 2)]:
        episodes = pq.read_table(run_dir / "evaluation" / f"{name}.parquet")
        assert episodes.schema == TRAJECTORY_SCHEMA and episodes.num_rows == 4, name
        assert set(episodes.column("step").to_pylist()) == {step}, name
    after = pq.read_table(run_dir / "evaluation" / "after.parquet")
    assert summarize(after)["mean_reward"] == pytest.approx(summary["eval_after"]["mean_reward"])
    # The learning curve is drawn at the end, from metrics.jsonl.
    from matplotlib.image import imread

    assert imread(run_dir / "learning_curve.png").shape[0] > 500
    assert (run_dir / "report" / "report.html").is_file()  # written at the end of every run

    # The adapter version advanced on every worker, to the learner's version.
    versions = ray.get([s.handle.adapter_versions.remote() for s in orchestrator.actors.pool.slots.values()])
    assert all(max(v) == 2 for v in versions), versions
    assert ray.get(orchestrator.actors.learner.version.remote()) == 2
    orchestrator.shutdown()

    # Trajectories: one Parquet file per step, readable by pandas and pyarrow, masks as recorded.
    frame = pd.read_parquet(run_dir / "trajectories")
    assert len(frame) == 2 * 3 * 2
    assert set(frame["worker_id"]) == {"rollout-0", "rollout-1"}
    assert sorted(frame.groupby("step")["policy_version"].unique().map(list).sum()) == [0, 1]
    for group_id, group in frame.groupby("group_id"):
        assert group["case_id"].nunique() == 1 and len(group) == 2, group_id
    table = pq.read_table(run_dir / "trajectories" / "step-000001.parquet")
    for row in table.to_pylist():
        ids, mask, logprobs = row["token_ids"], row["loss_mask"], row["behaviour_logprobs"]
        assert len(ids) == len(mask) == len(logprobs)
        assert sum(mask) == row["num_doctor_tokens"] > 0
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask, strict=True) if not m)
        assert all(lp <= 0.0 for lp in logprobs)

    # What the exact posterior makes of each interview, with its questions counted the same way.
    for row in frame.itertuples():
        assert row.questions == row.turns - pd.notna(row.diagnosis), row
        assert row.information_gain >= 0 and row.evidence_right in (True, False)

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward/mean" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert [line["step"] for line in lines if "eval_greedy/mean_reward" in line] == [0, 2]
    for key in (
        "interview/questions",
        "interview/information_per_question",
        "interview/evidence_right",
        "groups/zero_advantage",
        "time/weight_push",
        "time/step",
        "time/learner_idle_share",
        "staleness/share_0",
        "learner/seconds",
        "tokens/doctor",
    ):
        assert key in steps[0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # Resume from step 2 and run to step 3: the step count and learner state continue.
    checkpoint = run_dir / "checkpoints" / "step-000002"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    resumed = Orchestrator(
        _config(small_model_dir, tmp_path, max_steps=3), load_checkpoint=str(checkpoint), progress=False
    )
    assert resumed.run_dir == run_dir
    first_config = (run_dir / "config.yaml").read_text()
    result = resumed.train()
    assert result.steps == 3
    assert result.eval_before is None and result.eval_paired is None  # no "before" for a resumed run
    versions = ray.get([s.handle.adapter_versions.remote() for s in resumed.actors.pool.slots.values()])
    assert all(max(v) == 3 for v in versions)
    resumed.shutdown()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "reward/mean" in line] == [1, 2, 3]
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "orchestrator.json").read_text())
    assert state["step"] == 3 and state["sampler"]["position"] == 9
    third = pd.read_parquet(run_dir / "trajectories" / "step-000003.parquet")
    assert set(third["policy_version"]) == {2}
    # The first run's record of its config stays; the resumed run's is written beside it.
    assert (run_dir / "config.yaml").read_text() == first_config and "max_steps: 2" in first_config
    assert "max_steps: 3" in (run_dir / "config-resumed-at-step-000002.yaml").read_text()


def test_training_with_api_patient_and_judge(ray_session, small_model_dir, tmp_path):
    """A few steps with both API backends pointed at our loopback Chat Completions server."""
    from pydantic import SecretStr

    from grpodx.testing.loopback import OpenAICompatibleServer

    secret = "sk-test-grpodx-0123456789abcdef"
    with OpenAICompatibleServer() as server:
        config = load_config(
            None,
            [
                f"model.name={small_model_dir}",
                f"train.run_dir={tmp_path}",
                "train.run_name=api",
                "train.max_steps=2",
                "train.save_steps=2",
                "train.batch_size=2",
                "train.eval_cases=0",
                "grpo.num_generations=2",
                "lora.rank=4",
                "episode.max_turns=2",
                "episode.sampling.max_new_tokens=6",
                "ray.num_rollout_workers=1",
                "patient.kind=openai",
                f"patient.base_url={server.base_url}",
                "judge.kind=openai",
                f"judge.base_url={server.base_url}",
            ],
        )
        orchestrator = Orchestrator(config, progress=False, api_key=SecretStr(secret))
        result = orchestrator.train()
        orchestrator.shutdown()
        requests = server.requests
    assert result.steps == 2
    # The patient was asked (every episode has at least one doctor question before the last turn)
    # and every request carried the key.
    assert requests and all(r.authorization == f"Bearer {secret}" for r in requests)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line["api/patient/requests"] > 0 for line in lines)
    assert all(line["episodes/failed"] == 0 for line in lines)
    assert lines[-1]["api/patient/total_tokens"] > 0
    # The key never reaches the run directory: config, metrics, Parquet, checkpoints.
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_pipelined_run_respects_staleness_and_writes_to_a_uri(ray_session, small_model_dir, tmp_path):
    """max_staleness=1: workers run one batch ahead, no group is trained more than one version after it
    started, every turn's version is recorded; the run directory is a file:// URI and resumes from it."""
    overrides = ["train.max_staleness=1", "train.run_name=async", "train.eval_cases=0", "train.save_steps=2"]
    config = _config(small_model_dir, f"file://{tmp_path}", 4, *overrides)
    orchestrator = Orchestrator(config, progress=False)
    result = orchestrator.train()
    orchestrator.shutdown()
    assert result.steps == 4
    run_dir = tmp_path / "async"
    frame = pd.read_parquet(run_dir / "trajectories")
    assert len(frame) == 4 * 3 * 2 and frame["group_id"].nunique() == 4 * 3  # every group exactly once
    trained_by = frame["step"] - 1
    lag = trained_by - frame["policy_version"]
    assert lag.between(0, 1).all(), lag.tolist()
    assert (lag == 1).any(), "no group started before the version that trained it: nothing overlapped"
    for start, versions, learner_version in zip(
        frame["policy_version"], frame["turn_versions"], trained_by, strict=True
    ):
        versions = list(versions)
        assert versions[0] == start and versions == sorted(versions) and versions[-1] <= learner_version
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "staleness/mean" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert all(line["staleness/max"] <= 1 for line in steps)
    assert all(line["groups/lost"] == 0 and line["groups/duplicates_total"] == 0 for line in steps)
    assert (run_dir / "learning_curve.png").is_file()  # written through the URI's filesystem

    resumed = Orchestrator(
        _config(small_model_dir, f"file://{tmp_path}", 5, *overrides),
        load_checkpoint=f"file://{run_dir}/checkpoints/step-000004",
        progress=False,
    )
    assert resumed.train().steps == 5
    resumed.shutdown()
    state = json.loads((run_dir / "checkpoints" / "step-000005" / "orchestrator.json").read_text())
    assert state["step"] == 5 and state["sampler"]["position"] == 15
    assert (run_dir / "checkpoints" / "step-000005" / "_COMPLETE").is_file()


def test_a_run_whose_patient_api_dies_stops_with_a_checkpoint(ray_session, small_model_dir, tmp_path, capsys):
    """The API passes the start-up check, then answers 500 to everything: each step reports its failed
    episodes on the console, logs no reward (null, not 0.0), and the circuit breaker stops the run after
    train.max_failed_steps steps with a checkpoint to resume from."""
    from pydantic import SecretStr

    from grpodx.stopping import TrainingHalted
    from grpodx.testing.loopback import OpenAICompatibleServer

    with OpenAICompatibleServer() as server:
        config = _config(
            small_model_dir,
            tmp_path,
            10,
            "train.eval_cases=0",
            "train.save_steps=100",
            "train.max_failed_steps=2",
            "ray.num_rollout_workers=1",
            "patient.kind=openai",
            f"patient.base_url={server.base_url}",
            "patient.client.max_retries=0",
        )
        orchestrator = Orchestrator(config, progress=False, api_key=SecretStr("sk-test-breaker-0123456789"))
        server.inject("server_error", times=100_000)  # after the start-up check passed
        with pytest.raises(TrainingHalted, match="more than 50% of the episodes failed in 2 steps") as halted:
            orchestrator.train()
        orchestrator.shutdown()
    run_dir = orchestrator.run_dir
    assert f"--load-checkpoint {run_dir / 'checkpoints' / 'step-000002'}" in str(halted.value)
    assert (run_dir / "checkpoints" / "step-000002" / "orchestrator.json").is_file()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["episodes/failed_share"] == 1.0 and line["reward/mean"] is None for line in lines)
    console = capsys.readouterr().out
    assert "step 1: 6 of 6 episodes failed, 0 scored: conversation ApiError ×6" in console
    assert f"patient API call to {server.base_url} failed after 1 attempt(s): HTTP 500" in console


def test_training_on_a_cases_file(ray_session, small_model_dir, tmp_path):
    """train.cases_file: the run trains on the file's train share and evaluates on its held-out share."""
    from grpodx.medical.case_file import load_case_file
    from grpodx.medical.knowledge import load_knowledge_base
    from tests.test_own_cases import many_cards, write_jsonl

    cases_file = write_jsonl(tmp_path / "cases.jsonl", many_cards(60))
    cards = load_case_file(cases_file, load_knowledge_base()).cards
    split = {card.case_id: card.split for card in cards}
    config = _config(small_model_dir, tmp_path, 1, f"train.cases_file={cases_file}", "train.eval_cases=3")
    orchestrator = Orchestrator(config, progress=False)
    try:
        result = orchestrator.train()
    finally:
        orchestrator.shutdown()
    trained = pd.read_parquet(result.run_dir / "trajectories")["case_id"]
    evaluated = pd.read_parquet(result.run_dir / "evaluation" / "after.parquet")["case_id"]
    assert {split[c] for c in trained} == {"train"} and {split[c] for c in evaluated} == {"eval"}
