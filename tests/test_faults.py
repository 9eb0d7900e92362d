"""Faults a run survives (issue 15): a hung rollout worker, a dead patient worker, an API that fails a
fifth of its calls. Each is a short real run of the small doctor through Ray."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pandas as pd
import pytest
import ray
from pydantic import SecretStr

from grpodx.config import load_config
from grpodx.orchestrator import Orchestrator
from grpodx.testing.loopback import Fault, OpenAICompatibleServer
from tests.conftest import actor_pid, small_run_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(model_dir, run_dir, *extra):
    settings = ["train.max_steps=3", "train.save_steps=100", "ray.rescale_interval_s=0.5", *extra]
    return load_config(None, small_run_settings(model_dir, run_dir, "faults", *settings))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _each_group_trained_once(run_dir, steps: int, batch_size: int, generations: int) -> None:
    frame = pd.read_parquet(run_dir / "trajectories")
    assert len(frame) == steps * batch_size * generations
    assert frame.groupby("group_id").size().eq(generations).all()
    assert frame["group_id"].nunique() == steps * batch_size


def test_a_hung_rollout_worker_is_replaced_and_its_groups_run_once(
    ray_session, small_model_dir, tmp_path, capsys
):
    """A worker stopped with SIGSTOP (alive, silent) after step 1 while it runs a group of batch 2 (the
    groups start at the push, and the patient answers after 1 s, so they are still running when the
    step ends): that group times out after ray.group_timeout_s, goes to another worker exactly once,
    and the run finishes."""
    stopped: list[tuple[str, int]] = []

    def stop_a_busy_worker(step: int, _metrics: dict) -> None:
        if step == 1:
            running = orchestrator.scheduler.in_flight.items()
            busy = sorted(worker for task, (worker, _) in running if not task.done())
            assert busy, "no group was running at the end of step 1: the stopped worker would hold none"
            slot = next(s for s in orchestrator.actors.pool.ready_slots() if s.worker_id == busy[0])
            pid = actor_pid(slot.handle)
            os.kill(pid, signal.SIGSTOP)
            stopped.append((slot.worker_id, pid))

    with OpenAICompatibleServer(latency_s=1.0) as server:
        patient = ["patient.kind=openai", f"patient.base_url={server.base_url}"]
        config = _config(small_model_dir, tmp_path, "ray.group_timeout_s=4", *patient)
        orchestrator = Orchestrator(
            config, progress=False, api_key=SecretStr("sk-hung-0123456789"), on_step_end=stop_a_busy_worker
        )
        started = time.monotonic()
        try:
            result = orchestrator.train()
        finally:
            orchestrator.shutdown()
            for _, pid in stopped:  # in case Ray did not reap it
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    assert result.steps == 3 and time.monotonic() - started < 120
    ((worker, _),) = stopped
    assert f"{worker} returned no group within 4 s; replacing it" in capsys.readouterr().out
    lines = _metrics(result.run_dir)
    assert lines[-1]["groups/retried_total"] >= 1 and all(line["groups/lost"] == 0 for line in lines)
    _each_group_trained_once(result.run_dir, steps=3, batch_size=3, generations=2)


def test_a_dead_patient_worker_is_restarted_and_the_run_goes_on(ray_session, small_model_dir, tmp_path):
    """The patient worker actor is killed after step 1 (as by an out-of-memory kill): Ray restarts it,
    and the calls made meanwhile wait for it instead of failing; the run finishes with every episode
    scored. (A call that cannot wait fails its episode, which is then never scored.)"""

    def kill_the_patient(step: int, _metrics: dict) -> None:
        if step == 1:
            ray.kill(orchestrator.actors.patient, no_restart=False)

    orchestrator = Orchestrator(
        _config(small_model_dir, tmp_path), progress=False, on_step_end=kill_the_patient
    )
    try:
        result = orchestrator.train()
    finally:
        orchestrator.shutdown()
    assert result.steps == 3
    frame = pd.read_parquet(result.run_dir / "trajectories")
    assert frame["valid"].all() and frame["error"].isna().all()  # nothing lost to the restart


def test_a_run_through_an_api_failing_a_fifth_of_its_calls(ray_session, small_model_dir, tmp_path):
    """Patient and judge behind one loopback API that answers 20% of requests with a 429 (with
    Retry-After), a 500, a timeout, a dropped connection or malformed JSON: the run finishes, every
    failure is counted by kind as the server served it, no episode whose call failed is scored, and
    the key is in no file of the run."""
    secret = "sk-faults-0123456789abcdef"
    rng = random.Random(7)
    faults = [
        Fault("rate_limit", retry_after=0.05),
        Fault("server_error"),
        Fault("slow", delay=2.0),
        Fault("drop"),
        Fault("malformed"),
    ]
    with OpenAICompatibleServer() as server:
        extra = [
            "patient.kind=openai",
            f"patient.base_url={server.base_url}",
            "judge.kind=openai",
            f"judge.base_url={server.base_url}",
            "patient.client.max_retries=1",
            "judge.client.max_retries=1",
            "patient.client.timeout_s=1",
            "judge.client.timeout_s=1",
            "patient.client.backoff_base_s=0.05",
            "judge.client.backoff_base_s=0.05",
            "judge.invalid_answer_retries=0",
            "train.max_failed_share=1.0",
        ]
        orchestrator = Orchestrator(
            _config(small_model_dir, tmp_path, *extra), progress=False, api_key=SecretStr(secret)
        )
        server.reset()  # the start-up check's request is not the run's
        server.inject(*(rng.choice(faults) if rng.random() < 0.2 else Fault("ok") for _ in range(5000)))
        try:
            result = orchestrator.train()
        finally:
            orchestrator.shutdown()
        served = [r.fault.kind if r.fault else "ok" for r in server.requests]
    assert result.steps == 3
    lines = _metrics(result.run_dir)

    def counted(kind: str) -> float:
        return sum(
            line.get(f"api/{role}/failures_{kind}", 0.0) for line in lines for role in ("patient", "judge")
        )

    for fault, failure in [
        ("rate_limit", "rate_limited"),
        ("server_error", "server_error"),
        ("slow", "timeout"),
        ("drop", "connection"),
        ("malformed", "invalid_answer"),  # an empty patient reply, a judge answer that is not JSON
    ]:
        assert counted(failure) == served.count(fault), fault
    kinds_served = {kind for kind in served if kind != "ok"}
    assert len(kinds_served) >= 3, served  # the mix was exercised
    frame = pd.read_parquet(result.run_dir / "trajectories")
    assert (frame["valid"] == frame["error"].isna()).all() and frame.loc[
        ~frame["valid"], "reward"
    ].isna().all()
    patient_failures = sum(line["api/patient/calls_failed"] for line in lines)
    assert frame["error"].str.startswith("conversation: ApiError").sum() == patient_failures
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs to fill: a real "No space left on device" from the kernel."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); see test_storage")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory) -> None:
    with open(directory / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def test_a_full_disk_stops_the_run_and_the_last_checkpoint_resumes(ray_session, small_model_dir, small_disk):
    from grpodx.stopping import TrainingHalted

    def fill_the_disk(step: int, _metrics: dict) -> None:
        if step == 1:
            _fill(small_disk)

    config = _config(small_model_dir, small_disk, "train.save_steps=1")
    orchestrator = Orchestrator(config, progress=False, on_step_end=fill_the_disk)
    with pytest.raises(TrainingHalted) as halted:
        try:
            orchestrator.train()
        finally:
            orchestrator.shutdown()
    checkpoint = small_disk / "faults" / "checkpoints" / "step-000001"
    assert "No space left on device" in str(halted.value)
    assert (
        f"the last checkpoint is intact: free space, then resume with --load-checkpoint {checkpoint}"
        in str(halted.value)
    )
    (small_disk / "filler").unlink()
    resumed = Orchestrator(
        _config(small_model_dir, small_disk, "train.max_steps=2"),
        load_checkpoint=str(checkpoint),
        progress=False,
    )
    try:
        assert resumed.train().steps == 2  # the checkpoint passed every start-up check, and resumed
    finally:
        resumed.shutdown()
