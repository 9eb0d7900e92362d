"""Bad settings and damaged checkpoints stop `grpodx train` with one sentence before Ray starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grpodx.cli import app
from grpodx.config import load_config
from grpodx.learner import Learner
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.storage import RunDirectoryInUse, RunLock, RunStorage

RUNNER = CliRunner()


def _train(*args: str):
    return RUNNER.invoke(app, ["train", *args])


def _assert_one_sentence(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def test_a_lora_rank_wider_than_the_model_stops_before_a_run_directory_is_made(small_model_dir, tmp_path):
    runs = tmp_path / "runs"
    result = _train("--lora-rank", "100000", f"model.name={small_model_dir}", f"train.run_dir={runs}")
    _assert_one_sentence(result, "lora.rank=100000", "at most 32")
    assert not runs.exists() or not list(runs.iterdir())


def test_lora_targets_the_model_lacks_are_named(small_model_dir, tmp_path):
    result = _train(
        f"model.name={small_model_dir}", "lora.target_modules=[q_proj]", f"train.run_dir={tmp_path}"
    )
    _assert_one_sentence(result, "lora.target_modules=['q_proj']")


@pytest.mark.parametrize(
    ("run_dir", "complaint"),
    [
        ("{file}/runs", "train.run_dir="),
        ("foo://bar", "train.run_dir='foo://bar' cannot be opened"),
        ("/proc/grpodx-runs", "train.run_dir=/proc/grpodx-runs: cannot create"),
    ],
)
def test_an_unusable_run_directory_is_named(small_model_dir, tmp_path, run_dir, complaint):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("not a directory")
    result = _train(f"model.name={small_model_dir}", f"train.run_dir={run_dir.format(file=regular_file)}")
    _assert_one_sentence(result, complaint)


def test_a_model_directory_without_weights_config_or_tokenizer_is_named(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = _train(f"model.name={empty}", f"train.run_dir={tmp_path / 'runs'}")
    _assert_one_sentence(result, f"model.name={empty}", "config.json", "tokenizer")


def test_a_hub_model_that_is_not_here_is_named(tmp_path):
    # conftest makes the Hub offline: gpt2 is neither cached nor downloadable.
    result = _train("model.name=gpt2", f"train.run_dir={tmp_path / 'runs'}")
    _assert_one_sentence(result, "model.name=gpt2", "cannot load its config or tokenizer")


# ---- damaged checkpoints ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_files(small_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """The files of a real rank-4 checkpoint of the small doctor, to damage one at a time."""
    config = load_config(None, [f"model.name={small_model_dir}", "lora.rank=4"])
    directory = tmp_path_factory.mktemp("checkpoint")
    learner = Learner(config, str(small_model_dir))
    learner.version = 1  # as after one step, matching orchestrator.json
    learner.save(directory)
    sampler = CaseSampler(load_knowledge_base(), "train", config.train.seed)
    state = {"step": 1, "sampler": {**sampler.state_dict(), "position": 2}, "adapter_version": 1}
    (directory / "orchestrator.json").write_text(json.dumps(state))
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _write_checkpoint(files: dict[str, bytes], run_dir: Path) -> Path:
    checkpoint = run_dir / "checkpoints" / "step-000001"
    for name, data in files.items():
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(data)
    return checkpoint


def _without_half_the_tensors(data: bytes) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    return save(dict(sorted(tensors.items())[: len(tensors) // 2]))


WEIGHTS, STATE = "adapter/adapter_model.safetensors", "learner_state.pt"


@pytest.mark.parametrize(
    ("damage", "extra", "complaint"),
    [
        (lambda f: {**f, WEIGHTS: f[WEIGHTS][: len(f[WEIGHTS]) // 2]}, [], "is not a whole safetensors file"),
        (lambda f: {**f, WEIGHTS: os.urandom(4096)}, [], "is not a whole safetensors file"),
        (lambda f: {**f, WEIGHTS: _without_half_the_tensors(f[WEIGHTS])}, [], "LoRA tensors missing"),
        (lambda f: {**f, "orchestrator.json": b"{step: 1"}, [], "orchestrator.json is not valid JSON"),
        (lambda f: {**f, STATE: f[STATE][:-100]}, [], "learner_state.pt is damaged"),
        (lambda f: f, ["--lora-rank", "8"], "has LoRA rank 4 but lora.rank is 8; pass --lora-rank 4"),
    ],
    ids=["truncated", "garbage", "half-the-tensors", "state-not-json", "learner-state-cut", "other-rank"],
)
def test_a_damaged_or_foreign_checkpoint_stops_before_ray(
    checkpoint_files, small_model_dir, tmp_path, damage, extra, complaint
):
    checkpoint = _write_checkpoint(damage(checkpoint_files), tmp_path / "run")
    rank = extra or ["lora.rank=4"]
    result = _train("--load-checkpoint", str(checkpoint), f"model.name={small_model_dir}", *rank)
    _assert_one_sentence(result, complaint)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]  # nothing written


def test_the_undamaged_checkpoint_passes_the_checks(checkpoint_files, small_model_dir, tmp_path):
    """The damage above is what the tests detect, not the checkpoint they start from."""
    from grpodx.orchestrator import Orchestrator

    checkpoint = _write_checkpoint(checkpoint_files, tmp_path / "run")
    config = load_config(None, [f"model.name={small_model_dir}", "lora.rank=4"])
    orchestrator = Orchestrator(config, load_checkpoint=str(checkpoint), progress=False)
    assert orchestrator._resume_state["step"] == 1


# ---- one writer per run directory -------------------------------------------------------------
def test_a_second_writer_of_a_run_directory_is_refused_until_the_first_is_gone(tmp_path):
    storage = RunStorage(tmp_path)
    first = RunLock(storage)
    with pytest.raises(RunDirectoryInUse, match=f"in use by grpodx train \\(pid {os.getpid()}"):
        RunLock(storage)
    first.release()
    RunLock(storage).release()


def test_a_run_killed_with_sigkill_leaves_no_lock_behind(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, time\nfrom grpodx.storage import RunLock, RunStorage\n"
        "lock = RunLock(RunStorage(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse):
            RunLock(RunStorage(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    RunLock(RunStorage(tmp_path)).release()  # the kernel dropped the dead holder's lock


# ---- API backends: checked with one request before anything starts ----------------------------
SECRET = "sk-preflight-0123456789abcdef"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: connections to it are refused


def _api_train(monkeypatch, tmp_path, small_model_dir, *overrides: str):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return _train(f"model.name={small_model_dir}", f"train.run_dir={tmp_path / 'runs'}", *overrides)


def test_a_base_url_that_is_not_http_is_refused_by_the_config():
    result = _train("patient.kind=openai", "patient.base_url=ftp://x")
    _assert_one_sentence(result, "patient.base_url=ftp://x", "http:// or https://")


def test_a_server_that_refuses_connections_stops_the_run_with_its_url(monkeypatch, tmp_path, small_model_dir):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    result = _api_train(monkeypatch, tmp_path, small_model_dir, "judge.kind=openai", f"judge.base_url={url}")
    _assert_one_sentence(result, f"judge.base_url={url}: the judge API does not answer")
    assert not (tmp_path / "runs").exists()


def test_a_refused_key_stops_the_run_and_is_never_printed(monkeypatch, tmp_path, small_model_dir):
    from grpodx.testing.loopback import OpenAICompatibleServer

    with OpenAICompatibleServer() as server:
        server.inject("echo_key", times=2)  # a 401 whose message repeats the Authorization header
        url = server.base_url
        result = _api_train(
            monkeypatch, tmp_path, small_model_dir, "patient.kind=openai", f"patient.base_url={url}"
        )
    _assert_one_sentence(result, f"the patient API at {url} refuses the key", "HTTP 401")
    assert SECRET not in result.output and SECRET[:12] not in result.output


def test_a_model_the_server_does_not_serve_is_named(monkeypatch, tmp_path, small_model_dir):
    from grpodx.testing.loopback import OpenAICompatibleServer

    with OpenAICompatibleServer(served_models={"gpt-4o-mini"}) as server:
        overrides = ["judge.kind=openai", f"judge.base_url={server.base_url}", "judge.model=no-such-model"]
        result = _api_train(monkeypatch, tmp_path, small_model_dir, *overrides)
    _assert_one_sentence(result, "judge.model=no-such-model: the judge API at", "does not exist")


def test_the_key_can_come_from_a_file(monkeypatch, tmp_path, small_model_dir):
    from grpodx.testing.loopback import OpenAICompatibleServer

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    with OpenAICompatibleServer() as server:
        args = [
            "eval",
            "--cases",
            "2",
            "--openai-api-key-file",
            str(key_file),
            f"model.name={small_model_dir}",
        ]
        args += ["episode.max_turns=2", "patient.kind=openai", f"patient.base_url={server.base_url}"]
        args += ["--out", str(tmp_path / "eval")]
        result = RUNNER.invoke(app, args)
        requests = server.requests
    assert result.exit_code == 0, result.output
    assert len(requests) > 1 and all(r.authorization == f"Bearer {SECRET}" for r in requests)
    key_file.write_text("\n")
    _assert_one_sentence(RUNNER.invoke(app, [*args, "--cases", "1"]), "the file is empty")
