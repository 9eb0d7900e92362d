"""Job submission: the submit/no-submit rule, what `grpodx train` sends, and real jobs on a local cluster.

The cluster tests start a one-node Ray cluster with its dashboard (the Jobs API) on 127.0.0.1, in a
temporary directory of their own and on free ports, and tear it down by killing exactly the processes
they started (never `ray stop`, which would stop every Ray cluster of this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from grpodx import submit as submit_module
from grpodx.cli import app
from grpodx.config import ConfigError
from grpodx.submit import (
    WORKING_DIR_EXCLUDES,
    JobRunner,
    SecretFilter,
    decide_submit,
    submit_training,
    train_entrypoint,
)

ROOT = Path(__file__).resolve().parents[1]
PHI4 = ROOT / "configs" / "phi4.yaml"
TINY = ROOT / "configs" / "tiny-cpu.yaml"
SECRET = "sk-grpodx-test-5f1c9a7e3b2d4c6a8e0f1a2b3c4d5e6f"
RUNNER = CliRunner()


# ---- the rule: submit exactly for a Jobs API address ----------------------------------------------
@pytest.mark.parametrize(
    ("address", "submits"),
    [
        (None, False),
        ("auto", False),
        ("127.0.0.1:6379", False),  # what Ray sets RAY_ADDRESS to inside a job: no re-submission
        ("ray://head:10001", False),
        ("http://head:8265", True),
        ("https://ray.example.org", True),
        ("HTTP://127.0.0.1:8265", True),
    ],
)
def test_submit_exactly_for_a_jobs_api_address(address, submits):
    assert decide_submit(address, None) is submits
    assert decide_submit(address, submits) is submits


@pytest.mark.parametrize(
    ("address", "flag"), [(None, True), ("10.0.0.1:6379", True), ("http://h:8265", False)]
)
def test_a_flag_contradicting_the_address_is_an_error(address, flag):
    with pytest.raises(ConfigError, match="--no-submit" if not flag else "--submit"):
        decide_submit(address, flag)


# ---- what `grpodx train` submits (no cluster) -----------------------------------------------------
@pytest.fixture
def captured_submission(monkeypatch):
    calls = []

    def fake_submit_training(address, train_args, *, env_vars=None, **_):
        calls.append({"address": address, "args": train_args, "env_vars": env_vars})
        return 0

    monkeypatch.setattr(submit_module, "submit_training", fake_submit_training)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return calls


def test_train_submits_when_ray_address_is_http(monkeypatch, captured_submission):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    result = RUNNER.invoke(
        app,
        [
            "train",
            "--config",
            str(PHI4),
            "--openai-api-key",
            SECRET,
            "--max-steps",
            "3",
            "--num-rollout-workers",
            "auto",
            "grpo.lr=1e-6",
            "episode.system_prompt=Be brief.",
        ],
    )
    assert result.exit_code == 0, result.output
    (call,) = captured_submission
    assert call["address"] == "http://127.0.0.1:8265"
    assert call["args"][:2] == ["--config", "configs/phi4.yaml"]
    assert {"train.max_steps=3", "ray.num_rollout_workers=auto", "grpo.lr=1e-6"} <= set(call["args"])
    # The key travels only in the runtime env, never in the command line Ray writes into the log.
    assert call["env_vars"] == {"OPENAI_API_KEY": SECRET}
    entrypoint = train_entrypoint(call["args"])
    assert SECRET not in entrypoint and SECRET not in result.output
    assert entrypoint.startswith("python -m grpodx.cli train --no-submit --config configs/phi4.yaml")
    assert shlex.split(entrypoint)[-1] == "episode.system_prompt=Be brief."
    assert "train.run_dir=runs is a directory on the cluster's nodes" in result.output


def test_ray_address_in_the_config_is_cleared_inside_the_job(monkeypatch, captured_submission):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = RUNNER.invoke(
        app, ["train", "--config", str(TINY), "ray.address=https://head:8265", "train.run_dir=s3://b/runs"]
    )
    assert result.exit_code == 0, result.output
    (call,) = captured_submission
    assert call["address"] == "https://head:8265"
    assert call["args"][-1] == "ray.address=null"  # the job then uses the RAY_ADDRESS Ray gives it
    assert call["env_vars"] is None  # no API backend: no key is sent, even if one is set
    assert "warning" not in result.output


@pytest.mark.parametrize(
    ("args", "env_address", "complaint"),
    [
        (["--no-submit"], "http://127.0.0.1:8265", "not the Jobs API address"),
        (["--submit"], None, "set RAY_ADDRESS (or ray.address) to the dashboard address"),
        (["--num-rollout-workers", "many"], None, "neither a number nor auto"),
    ],
)
def test_train_stops_on_a_bad_choice(monkeypatch, captured_submission, args, env_address, complaint):
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = RUNNER.invoke(app, ["train", "--config", str(TINY), *args])
    assert result.exit_code == 2
    assert complaint in re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # also through rich's error box
    assert captured_submission == []


# ---- secrets in streamed text -----------------------------------------------------------------------
def test_secret_filter_masks_a_secret_split_across_chunks():
    secret_filter = SecretFilter([SECRET])
    text = f"before {SECRET} middle {SECRET}\nafter\r"
    out = ""
    for start in range(0, len(text), 7):  # chunks cut through the secret
        out += secret_filter.feed(text[start : start + 7])
    out += secret_filter.flush()
    assert out == "before **** middle ****\nafter\r"
    assert SecretFilter([]).feed("sk-anything") == "sk-anything"


class _ClusterStarting:
    """A Jobs API client whose cluster has no job agent for its first ``refusals`` submissions."""

    def __init__(self, address: str, refusals: int):
        self.refusals, self.submitted = refusals, []

    def submit_job(self, *, entrypoint, runtime_env, submission_id, metadata):
        self.submitted.append(submission_id)
        if len(self.submitted) <= self.refusals:
            raise RuntimeError(
                "Request failed with status code 500: No available agent to submit job, please try again "
                f"later. runtime_env: {runtime_env}"
            )
        return submission_id


@pytest.mark.parametrize("refusals", [2, 1000])
def test_submit_waits_for_the_job_agent_of_a_starting_cluster(monkeypatch, refusals):
    import ray.job_submission

    monkeypatch.setattr(
        ray.job_submission, "JobSubmissionClient", lambda address: _ClusterStarting(address, refusals)
    )
    monkeypatch.setattr(submit_module, "AGENT_RETRY_S", 0.001)
    monkeypatch.setattr(submit_module, "AGENT_WAIT_S", 0.5)
    stream = io.StringIO()
    runner = JobRunner("http://127.0.0.1:8265", secret_values=[SECRET], stream=stream)
    runtime_env = {"env_vars": {"OPENAI_API_KEY": SECRET}}
    if refusals == 2:
        job_id = runner.submit("grpodx train", runtime_env)
        assert runner.client.submitted == [job_id] * 3  # one id: a refused submission created no job
        assert stream.getvalue().count("job agent is not up yet") == 2
    else:  # an agent that never comes: a clear error after the wait, the key kept out of it
        with pytest.raises(ConfigError, match="No available agent") as raised:
            runner.submit("grpodx train", runtime_env)
        assert SECRET not in str(raised.value) and len(set(runner.client.submitted)) == 1


def test_uploaded_package_leaves_out_venv_runs_and_data(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for name in [
        "pyproject.toml",
        "grpodx/cli.py",
        "configs/phi4.yaml",
        ".venv/bin/python",
        "runs/r1/metrics.jsonl",
        "grpodx/__pycache__/cli.cpython-311.pyc",
        "trajectories/step-1.parquet",
        ".git/HEAD",
        ".pytest_cache/v",
        "grpodx.egg-info/PKG-INFO",
        "checkpoint/adapter.safetensors",
    ]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, excludes=WORKING_DIR_EXCLUDES)
    files = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert files == {"pyproject.toml", "grpodx/cli.py", "configs/phi4.yaml"}


# ---- a real local cluster ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_process_tree(process: subprocess.Popen) -> None:
    """Terminate `ray start --block` and every process under it (all started by this test)."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def local_ray_cluster(auth_token_file: Path | None = None):
    """A one-node Ray cluster whose Jobs API answers at the yielded http://127.0.0.1:<port>.

    With ``auth_token_file`` it requires that token, as the nodes of cluster/config.yaml do; without,
    token authentication is off (a throwaway cluster on loopback).
    """
    temp_dir = tempfile.mkdtemp(prefix="gdx-ray-")  # short: Ray's socket paths have a length limit
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--temp-dir",
        temp_dir,
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        *[str(part) for item in ports.items() for part in item],
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    headers = {}
    if auth_token_file is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth_token_file))
        headers["Authorization"] = f"Bearer {auth_token_file.read_text().strip()}"
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                request = urllib.request.Request(f"{address}/api/version", headers=headers)
                if urllib.request.urlopen(request, timeout=5).status == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("local Ray cluster did not start:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(0.5)
        yield address
    finally:
        _stop_process_tree(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs_api():
    with local_ray_cluster() as address:
        yield address


class Terminal(io.StringIO):
    """A stand-in for the user's terminal that can react to what it has shown so far."""

    def __init__(self, on_write=None):
        super().__init__()
        self._on_write = on_write

    def write(self, text: str) -> int:
        written = super().write(text)
        if self._on_write is not None:
            self._on_write(self.getvalue())
        return written


# The job waits, after its first line, until the caller has seen that line (the caller then creates
# the file named by argv[1]): it can only finish if its logs are streamed while it runs.
JOB_SCRIPT = """
import hashlib, os, pathlib, sys, time
print('first line', flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.1)
print('caller saw the first line:', os.path.exists(sys.argv[1]))
print('uploaded:', ' '.join(sorted(p.name for p in pathlib.Path('.').iterdir())))
key = os.environ.get('OPENAI_API_KEY', '')
print('key sha256:', hashlib.sha256(key.encode()).hexdigest())
print('a careless print of the key:', key)
print('RAY_ADDRESS inside the job:', os.environ.get('RAY_ADDRESS'))
"""


def test_a_job_streams_its_logs_succeeds_and_keeps_the_key_secret(jobs_api, capsys, tmp_path):
    go_ahead = tmp_path / "first-line-seen"

    def on_write(shown: str) -> None:
        if "first line" in shown:
            go_ahead.touch()

    stream = Terminal(on_write)
    entrypoint = shlex.join(["python", "-c", JOB_SCRIPT, str(go_ahead)])
    secret_env = {"OPENAI_API_KEY": SECRET}
    code = submit_training(jobs_api, [], env_vars=secret_env, entrypoint=entrypoint, stream=stream)
    output = stream.getvalue()
    assert code == 0, output
    assert "succeeded" in output
    assert "caller saw the first line: True" in output  # streamed while the job ran
    # The working_dir upload is the project, without the virtualenv.
    uploaded = set(re.search(r"uploaded: (.*)", output).group(1).split())
    assert {"grpodx", "pyproject.toml", "configs", "cluster", "README.md"} <= uploaded
    assert not uploaded & {".venv", ".git", "runs", ".pytest_cache"}
    # The key reached the job's environment, and nowhere in what the caller saw.
    assert f"key sha256: {hashlib.sha256(SECRET.encode()).hexdigest()}" in output
    assert "a careless print of the key: ****" in output
    captured = capsys.readouterr()
    assert SECRET not in output + captured.out + captured.err
    # Inside a job RAY_ADDRESS is the cluster's host:port, so `grpodx train` there never submits.
    job_address = re.search(r"RAY_ADDRESS inside the job: (\S+)", output).group(1)
    assert decide_submit(job_address, None) is False


def test_a_failing_job_gives_a_nonzero_exit_code(jobs_api):
    stream = io.StringIO()
    entrypoint = shlex.join(["python", "-c", "print('about to fail'); raise SystemExit(3)"])
    code = submit_training(jobs_api, [], entrypoint=entrypoint, stream=stream)
    output = stream.getvalue()
    assert code == 1, output
    assert "about to fail" in output and "failed" in output


@pytest.mark.parametrize("installed", ["default", "a library's"])
def test_ctrl_c_stops_the_job(jobs_api, installed):
    """Whatever SIGINT handler the process had (a library may have replaced Python's default one, and
    then asyncio.run does not turn Ctrl-C into a cancellation), Ctrl-C while the logs stream stops the
    job, and the handler is the same one afterwards."""
    before = signal.getsignal(signal.SIGINT)
    if installed != "default":
        signal.signal(signal.SIGINT, lambda signum, frame: None)
    previous = signal.getsignal(signal.SIGINT)
    interrupted = []

    def press_ctrl_c_once_running(shown: str) -> None:
        if "job is running" in shown and not interrupted:
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    stream = Terminal(press_ctrl_c_once_running)
    script = "import time; print('job is running', flush=True); time.sleep(120)"
    entrypoint = shlex.join(["python", "-c", script])
    started = time.monotonic()
    try:
        code = submit_training(jobs_api, [], entrypoint=entrypoint, stream=stream)
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, before)
    output = stream.getvalue()
    assert code == 130, output
    assert "interrupted: stopping job" in output and "is stopped" in output
    assert time.monotonic() - started < 60


def test_train_runs_the_real_entrypoint_in_the_job(jobs_api, monkeypatch, tmp_path):
    """`grpodx train` against the Jobs API: the job runs `grpodx train --no-submit` from the upload."""
    monkeypatch.setenv("RAY_ADDRESS", jobs_api)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    missing = tmp_path / "no-such-run" / "checkpoints" / "step-000001"
    result = RUNNER.invoke(app, ["train", "--config", str(TINY), "--load-checkpoint", str(missing)])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "Running entrypoint for job" in output
    assert "python -m grpodx.cli train --no-submit --config configs/tiny-cpu.yaml --load-checkpoint" in output
    # The error of `grpodx train` itself, raised inside the job and streamed back.
    assert re.search(r"error: --load-checkpoint \S*no-such-run", output), output
    assert SECRET not in result.output


@pytest.mark.slow
def test_train_trains_as_a_job(jobs_api, monkeypatch, tmp_path, small_model_dir):
    """`grpodx train` with RAY_ADDRESS=http://...: one real GRPO step runs as a job on the cluster."""
    monkeypatch.setenv("RAY_ADDRESS", jobs_api)
    overrides = [
        f"model.name={small_model_dir}",
        f"train.run_dir={tmp_path}",
        "train.run_name=as-a-job",
        "train.eval_cases=0",
        "train.batch_size=1",
        "grpo.num_generations=2",
        "lora.rank=4",
        "episode.max_turns=1",
        "episode.sampling.max_new_tokens=6",
        "ray.num_rollout_workers=1",
        "ray.rollout_num_cpus=0.5",
        "ray.learner_num_cpus=0.5",
    ]
    result = RUNNER.invoke(app, ["train", "--config", str(TINY), "--max-steps", "1", *overrides])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    lines = (tmp_path / "as-a-job" / "metrics.jsonl").read_text().splitlines()
    assert any('"step": 1' in line and "reward/mean" in line for line in lines), lines


@pytest.mark.slow
def test_a_cluster_that_requires_a_token(tmp_path):
    """As cluster/config.yaml starts it: without the token `grpodx train` stops early; with it, runs."""
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(16))
    missing = tmp_path / "no-such-run" / "checkpoints" / "step-000001"
    command = [sys.executable, "-m", "grpodx.cli", "train", "--config", str(TINY)]
    command += ["--load-checkpoint", str(missing)]
    with local_ray_cluster(token_file) as address:
        base_env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
        base_env["RAY_ADDRESS"] = address
        without = subprocess.run(command, env=base_env, capture_output=True, text=True, timeout=120)
        token_env = {**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        with_token = subprocess.run(command, env=token_env, capture_output=True, text=True, timeout=240)
        # What the training job does first: connect to its cluster with ray.init.
        driver = "import ray; ray.init(); print('driver sees CPUs:', ray.cluster_resources().get('CPU'))"
        submit = (
            "import shlex, sys; from grpodx.submit import submit_training; "
            f"sys.exit(submit_training({address!r}, [], entrypoint=shlex.join(['python', '-c', {driver!r}])))"
        )
        connects = subprocess.run(
            [sys.executable, "-c", submit], env=token_env, capture_output=True, text=True, timeout=240
        )
    assert without.returncode == 2, without.stdout + without.stderr
    assert "set RAY_AUTH_MODE=token" in " ".join(without.stderr.split())
    output = with_token.stdout + with_token.stderr
    assert with_token.returncode == 1, output
    assert "Running entrypoint for job" in output
    assert re.search(r"error: --load-checkpoint \S*no-such-run", " ".join(output.split())), output
    assert connects.returncode == 0, connects.stdout + connects.stderr
    assert "driver sees CPUs: 2.0" in connects.stdout
