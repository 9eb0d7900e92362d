"""Submit a training run to a Ray cluster as a Ray job, and follow it until it ends.

A cluster started with ``ray up cluster/config.yaml`` is driven through Ray's Jobs API, the dashboard's
HTTP server (``http://<head>:8265``): the project directory is uploaded as the job's ``working_dir``,
the head node runs ``python -m grpodx.cli train --no-submit <args>`` inside it, and this module streams
the job's output to the terminal until the job ends. A ``host:port``, ``auto`` or ``ray://`` address is
not a Jobs API address: with one, ``grpodx train`` connects directly with ``ray.init`` as on one
machine. Inside a job Ray sets ``RAY_ADDRESS`` to the cluster's own ``host:port`` address, and the
entrypoint says ``--no-submit``, so a job never submits itself again.

Secrets (the OpenAI key) travel only in the runtime environment's ``env_vars``: never in the
entrypoint, which Ray writes into the job's log, and never in what this module prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

from grpodx.config import ConfigError
from grpodx.redaction import redact

JOBS_API_SCHEMES = ("http://", "https://")

# Never uploaded with the job (gitignore syntax, relative to the project directory). Ray also honours
# the project's .gitignore; these hold even if it changes. The code needs none of them.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".cache",
    "*.egg-info",
    "build",
    "dist",
    "*.parquet",
    "*.safetensors",
    "*.pt",
]

SUCCEEDED = "SUCCEEDED"
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_INTERRUPTED = 130


def is_jobs_api_address(address: str | None) -> bool:
    return bool(address) and address.strip().lower().startswith(JOBS_API_SCHEMES)


def decide_submit(address: str | None, submit: bool | None) -> bool:
    """Whether ``grpodx train`` submits a job (True) or runs its driver here (False).

    The rule: submit exactly when the Ray address is a Jobs API address (``http(s)://``); ``--submit``
    and ``--no-submit`` only confirm it, and contradicting it is an error, because ``ray.init`` cannot
    connect to an ``http://`` address and the Jobs API cannot be reached at any other.
    """
    jobs_api = is_jobs_api_address(address)
    if submit is None:
        return jobs_api
    if submit and not jobs_api:
        raise ConfigError(
            "--submit sends the run to Ray's Jobs API; set RAY_ADDRESS (or ray.address) to the "
            "dashboard address, e.g. http://<head>:8265" + (f", not {address!r}" if address else "")
        )
    if not submit and jobs_api:
        raise ConfigError(
            f"--no-submit connects with ray.init, which needs the cluster address (host:port, auto or "
            f"ray://...), not the Jobs API address {address!r}; leave out --no-submit to submit a job"
        )
    return submit


def project_root() -> Path:
    """The project directory (the one holding pyproject.toml): what the job uploads."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "grpodx").is_dir():
        raise ConfigError(
            f"submitting a job uploads the project's source tree, but grpodx is installed from {root}; "
            "install it from the repository (pip install -e .) and submit from there"
        )
    return root


def path_in_project(path: str | Path, root: Path) -> str:
    """``path`` relative to the project directory, as the job (whose cwd is that directory) sees it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(
            f"{path} is outside the project directory {root}, so the job would not have it; "
            "put the config under configs/"
        ) from None


def train_entrypoint(args: Iterable[str]) -> str:
    """The job's shell command. Arguments are quoted; secrets are never among them."""
    return shlex.join(["python", "-m", "grpodx.cli", "train", "--no-submit", *args])


def job_runtime_env(working_dir: Path, env_vars: Mapping[str, str] | None = None) -> dict:
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def new_submission_id() -> str:
    return f"grpodx-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class SecretFilter:
    """Replaces every secret in streamed text by ``****``, also when one is split across two chunks.

    The rule: text is passed on as soon as no secret can still end inside it; a tail that could be the
    start of a secret is held back until the next chunk (or ``flush``) decides.
    """

    MASK = "****"

    def __init__(self, secret_values: Iterable[str]):
        self._secrets = sorted({s for s in secret_values if s}, key=len, reverse=True)
        self._held = ""

    def redact(self, text: str) -> str:
        return redact(text, self._secrets, self.MASK)

    def feed(self, chunk: str) -> str:
        text = self.redact(self._held + chunk)
        hold = self._possible_secret_start(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _possible_secret_start(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a secret."""
        longest = 0
        for secret in self._secrets:
            for size in range(min(len(secret) - 1, len(text)), longest, -1):
                if text.endswith(secret[:size]):
                    longest = size
                    break
        return longest


# Ray's Jobs API answers this (HTTP 500) until the head's job agent has started.
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 60.0
AGENT_RETRY_S = 2.0


class JobRunner:
    """Submits one job, streams its logs, and turns its final status into an exit code.

    Events: ``submit`` (the job exists), ``follow`` (logs until the job ends), ``on_interrupt`` (Ctrl-C:
    stop the job). The exit code is 0 only when the job's final status is SUCCEEDED.
    """

    def __init__(self, address: str, *, secret_values: Iterable[str] = (), stream: TextIO | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.stream = stream if stream is not None else sys.stdout
        self._filter = SecretFilter(secret_values)
        self.job_id: str | None = None
        try:
            self.client = JobSubmissionClient(address)
        except Exception as exc:
            reason = " ".join(str(exc).split())
            if "Authentication" in reason:
                raise ConfigError(
                    f"Ray's Jobs API at {address} wants the cluster's token ({reason}); set "
                    "RAY_AUTH_MODE=token here, with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                ) from None
            raise ConfigError(
                f"cannot reach Ray's Jobs API at {address} ({reason}); start the cluster and its port "
                "forward (`ray up cluster/config.yaml`, `ray dashboard cluster/config.yaml`) or fix "
                "RAY_ADDRESS"
            ) from None

    def say(self, message: str) -> None:
        self.stream.write(f"[grpodx] {self._filter.redact(message)}\n")
        self.stream.flush()

    def submit(self, entrypoint: str, runtime_env: dict, metadata: dict[str, str] | None = None) -> str:
        submission_id = new_submission_id()
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                self.job_id = self.client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=submission_id,
                    metadata=metadata or {},
                )
                break
            except Exception as exc:  # the message may echo the runtime env: redact it
                reason = self._filter.redact(str(exc))
                # A cluster that has just started answers before its job agent is up: no job was
                # created, so the same submission id can be sent again.
                if NO_AGENT_YET in reason and time.monotonic() < deadline:
                    self.say(f"the cluster's job agent is not up yet; trying again in {AGENT_RETRY_S:g} s")
                    time.sleep(AGENT_RETRY_S)
                    continue
                raise ConfigError(f"could not submit the job to {self.address}: {reason}") from None
        self.say(
            f"submitted job {self.job_id} to {self.address}; its logs follow. Elsewhere: "
            f"`ray job logs -f {self.job_id}`, `ray job status {self.job_id}`; Ctrl-C stops it."
        )
        return self.job_id

    async def _tail(self) -> None:
        async for chunk in self.client.tail_job_logs(self.job_id):
            self.stream.write(self._filter.feed(chunk))
            self.stream.flush()
        self.stream.write(self._filter.flush())
        self.stream.flush()

    def follow(self, poll_s: float = 0.5, settle_s: float = 60.0) -> int:
        try:
            if self._stream_logs():
                return self.on_interrupt()
        except KeyboardInterrupt:
            return self.on_interrupt()
        except Exception as exc:
            self.say(
                f"lost the log stream of job {self.job_id} ({self._filter.redact(str(exc))}); the job may "
                f"still run: `ray job status {self.job_id}`, `ray job stop {self.job_id}`"
            )
        try:
            status = self._final_status(poll_s, settle_s)
        except KeyboardInterrupt:
            return self.on_interrupt()
        return self.on_finished(status)

    def _stream_logs(self) -> bool:
        """Copy the job's logs here until they end (False) or the user presses Ctrl-C (True).

        Ctrl-C is caught by a handler of our own while the logs stream, not left to ``asyncio.run``,
        which turns it into a cancellation of the log task only when the default handler is installed
        and then depends on the websocket read passing the cancellation on: a Ctrl-C was once lost that
        way, and the job ran to its end.
        """
        if threading.current_thread() is not threading.main_thread():
            asyncio.run(self._tail())  # signal handlers can only be set in the main thread
            return False
        pressed = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
        try:
            return asyncio.run(self._tail_until(pressed))
        finally:
            signal.signal(signal.SIGINT, previous)

    async def _tail_until(self, pressed: threading.Event) -> bool:
        tail = asyncio.ensure_future(self._tail())
        while not tail.done():
            if pressed.is_set():
                tail.cancel()
                await asyncio.wait({tail}, timeout=2.0)
                if not tail.done():
                    # The stream held on to the cancellation; it ends when the job does, so stop the job
                    # now rather than wait for it to finish by itself (asyncio.run waits for the task).
                    await asyncio.to_thread(self.client.stop_job, self.job_id)
                return True
            await asyncio.wait({tail}, timeout=0.1)
        tail.result()  # a broken log stream is reported by follow()
        return False

    def on_finished(self, status: str | None) -> int:
        if status is None:
            self.say(f"job {self.job_id} has not ended; check it with `ray job status {self.job_id}`")
            return 1
        if status == SUCCEEDED:
            self.say(f"job {self.job_id} succeeded")
            return 0
        message = ""
        with contextlib.suppress(Exception):  # the status is what matters; the message is a courtesy
            message = self.client.get_job_info(self.job_id).message or ""
        self.say(f"job {self.job_id} {status.lower()}" + (f": {message.strip()}" if message else ""))
        return 1

    def on_interrupt(self, wait_s: float = 30.0) -> int:
        self.say(f"interrupted: stopping job {self.job_id}")
        try:
            self.client.stop_job(self.job_id)
            status = self._final_status(0.5, wait_s)
        except KeyboardInterrupt:  # a second Ctrl-C: the stop is requested, stop waiting for it
            status = None
        except Exception as exc:
            reason = self._filter.redact(str(exc))
            self.say(f"could not stop job {self.job_id} ({reason}); run `ray job stop {self.job_id}`")
            return EXIT_INTERRUPTED
        self.say(f"job {self.job_id} is {str(status).lower() if status else 'still stopping'}")
        return EXIT_INTERRUPTED

    def _final_status(self, poll_s: float, settle_s: float) -> str | None:
        deadline = time.monotonic() + settle_s
        while True:
            status = str(self.client.get_job_status(self.job_id))
            if status in TERMINAL_STATUSES:
                return status
            if time.monotonic() > deadline:
                return None
            time.sleep(poll_s)


def submit_training(
    address: str,
    train_args: list[str],
    *,
    env_vars: Mapping[str, str] | None = None,
    entrypoint: str | None = None,
    working_dir: Path | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run ``grpodx train <train_args>`` as a Ray job on the cluster at ``address``; its exit code.

    ``env_vars`` (the OpenAI key) reach the job only through its runtime environment and are masked
    in everything printed here. ``entrypoint`` replaces the training command (tests run a small one).
    """
    working_dir = working_dir or project_root()
    runner = JobRunner(address, secret_values=(env_vars or {}).values(), stream=stream)
    runner.submit(
        entrypoint or train_entrypoint(train_args),
        job_runtime_env(working_dir, env_vars),
        metadata={"launched_by": "grpodx train"},
    )
    return runner.follow()
