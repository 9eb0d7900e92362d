"""A loopback OpenAI-compatible Chat Completions server: a test and benchmark double, never production.

It serves the scripted patient and judge over real HTTP on ``127.0.0.1`` only (a free port), so that
the project's API-backed patient and judge are exercised through the real ``openai`` SDK: the tests
inject faults into it, and ``grpodx bench`` injects latency (``latency_s``) to measure how rollouts
overlap API calls. ``POST /v1/chat/completions`` answers like a real endpoint
(``choices[0].message.content`` and ``usage``). The aiohttp app runs in a background thread with its
own event loop, so the caller's event loop and the server's never block each other.

Behind it are two scripted models, picked by the request's shape:

- with a ``response_format``: a judge that compares the ``<diagnosis>`` with the ``Hidden condition``
  and ``Synonyms`` lines of the first user message and answers exact (1.0) or wrong (0.0) as JSON;
- without: a patient that reads the "Symptoms you have / do NOT have / cannot know" lists of the system
  prompt and answers the last user message from them.

Faults are queued by the caller (:meth:`OpenAICompatibleServer.inject`) and consumed one per request in
arrival order. Every request is recorded with its arrival time, body, ``Authorization`` header, the
fault it got and the status sent (None when the connection was dropped).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

FaultKind = Literal[
    "ok",  # no fault: a normal answer (a placeholder in a random fault sequence)
    "rate_limit",  # 429, with Retry-After when ``retry_after`` is set
    "server_error",  # 500
    "slow",  # a normal answer after ``delay`` seconds (beyond the client's timeout)
    "malformed",  # 200 whose content is not valid JSON
    "out_of_range",  # 200 whose JSON score is 1.7
    "drop",  # the socket is closed without any response
    "reject_schema",  # 400 if the request asks for json_schema output (else a normal answer)
    "bad_request",  # 400, always
    "echo_key",  # 401 whose message repeats the Authorization header, as careless servers do
    "content",  # 200 with ``content`` as the answer text
]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    retry_after: float | None = None
    delay: float = 2.0
    content: str = ""


@dataclass
class RecordedRequest:
    arrived: float  # time.monotonic() in the server's process (the test's clock too)
    body: dict[str, Any]
    authorization: str | None
    fault: Fault | None
    status: int | None = None  # None: dropped, or still being answered
    usage: dict[str, int] | None = None  # what a 200 reported


@dataclass
class _State:
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


class OpenAICompatibleServer:
    """Start with ``with OpenAICompatibleServer() as server:``; point a client at ``server.base_url``."""

    def __init__(
        self, latency_s: float = 0.0, supports_json_schema: bool = True, served_models: set[str] | None = None
    ):
        # A fixed delay added to every request (for benchmarks of concurrency and throughput).
        self.latency_s = latency_s
        # When set, a request for any other model gets OpenAI's 404 (None: every name is served).
        self.served_models = served_models
        # False makes every json_schema request a 400, like a server without structured output.
        self.supports_json_schema = supports_json_schema
        self._defaults = (latency_s, supports_json_schema)
        self._state = _State()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> OpenAICompatibleServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loopback-openai-server", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> OpenAICompatibleServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- test controls ---------------------------------------------------------------------------
    def inject(self, *faults: Fault | FaultKind, times: int = 1) -> None:
        """Queue faults for the next requests, in order (a bare kind is ``Fault(kind)``), ``times`` over."""
        with self._lock:
            for _ in range(times):
                self._state.faults.extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._state.faults)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was answering at the same moment since the last reset."""
        with self._lock:
            return self._state.max_in_flight

    def reset(self) -> None:
        """Forget requests and queued faults, and go back to the constructor's latency and schema support."""
        with self._lock:
            self._state = _State()
        self.latency_s, self.supports_json_schema = self._defaults

    # -- serving ---------------------------------------------------------------------------------
    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        # A short shutdown: handlers still sleeping on a "slow" fault must not hold up the test session.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _arrive(self, body: dict[str, Any], authorization: str | None) -> tuple[_State, RecordedRequest]:
        with self._lock:
            state = self._state
            fault = self._state.faults.popleft() if self._state.faults else None
            record = RecordedRequest(time.monotonic(), body, authorization, fault)
            state.requests.append(record)
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        return state, record

    def _leave(self, state: _State) -> None:
        with self._lock:
            state.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        # Recorded as soon as the headers are in, so that a client that gives up while the body is
        # being read (a timeout under load) is still seen here, like every attempt the client counts.
        state, record = self._arrive({}, request.headers.get("Authorization"))
        try:
            record.body = json.loads(await request.read())
        except ConnectionError:
            self._leave(state)
            return web.Response(status=499, text="client went away")  # nobody is left to read it
        except json.JSONDecodeError:
            self._leave(state)
            record.status = 400
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        body = record.body
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            response = await self._respond(body, record.fault, record.authorization or "")
        finally:
            self._leave(state)
        record.status = None if response is None else response.status
        if response is not None and response.status == 200:
            record.usage = json.loads(response.text)["usage"]
        if response is None:
            # Close the socket with nothing written; the client sees "server disconnected".
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200, text="never sent")
        return response

    async def _respond(
        self, body: dict[str, Any], fault: Fault | None, authorization: str
    ) -> web.Response | None:
        kind = fault.kind if fault else None
        if self.served_models is not None and body.get("model") not in self.served_models:
            message = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return _error(404, message, "model_not_found")
        wants_schema = (body.get("response_format") or {}).get("type") == "json_schema"
        if kind == "drop":
            return None
        if kind == "rate_limit":
            assert fault is not None
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return _error(429, "Rate limit reached for requests", "rate_limit_exceeded", headers)
        if kind == "server_error":
            return _error(500, "The server had an error while processing your request", "server_error")
        if kind == "bad_request":
            return _error(400, "Invalid request: something is wrong with it", "invalid_request_error")
        if kind == "echo_key":
            return _error(401, f"Incorrect API key provided: {authorization}", "invalid_api_key")
        if wants_schema and (kind == "reject_schema" or not self.supports_json_schema):
            message = "response_format json_schema is not supported by this model"
            return _error(400, message, "invalid_request_error")
        if kind == "slow":
            assert fault is not None
            await asyncio.sleep(fault.delay)
        if kind == "content":
            assert fault is not None
            content = fault.content
        elif body.get("response_format"):
            content = scripted_judge(body["messages"])
            if kind == "malformed":
                content = '{"score": 1.0, "category": "exact", "rationale": "cut off'
            elif kind == "out_of_range":
                content = json.dumps({"score": 1.7, "category": "exact", "rationale": "Far too sure."})
        else:
            content = scripted_patient(body["messages"])
            if kind in ("malformed", "out_of_range"):
                content = ""
        return web.json_response(_completion(body, content))


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    payload = {"error": {"message": message, "type": code, "code": code, "param": None}}
    return web.json_response(payload, status=status, headers=headers)


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
    prompt_tokens, completion_tokens = prompt_chars // 4 + 1, len(content) // 4 + 1
    return {
        "id": f"chatcmpl-test-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "test"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# -- the scripted models ---------------------------------------------------------------------------
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def _key(text: str) -> str:
    return _ARTICLE.sub("", " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()))


def _section(prompt: str, heading: str) -> list[str]:
    """The ``- item`` lines after a line starting with ``heading``, up to the next blank line."""
    lines = prompt.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(heading):
            items = []
            for item in lines[index + 1 :]:
                if not item.startswith("- "):
                    break
                items.append(item[2:].strip())
            return [item for item in items if item != "(none)"]
    return []


def scripted_patient(messages: list[dict[str, str]]) -> str:
    """Answers the last doctor question from the lists in the system prompt; the longest match wins."""
    prompt = next((m["content"] for m in messages if m["role"] == "system"), "")
    question = _key(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    lists = {
        "have": _section(prompt, "Symptoms you have"),
        "not": _section(prompt, "Symptoms you do NOT have"),
        "unknown": _section(prompt, "Things you cannot know"),
    }
    best: tuple[int, str, str] | None = None
    for kind, phrases in lists.items():
        for phrase in phrases:
            key = _key(phrase)
            if key and re.search(rf"\b{re.escape(key)}\b", question) and (best is None or len(key) > best[0]):
                best = (len(key), kind, phrase)
    if best is None:
        return "I'm not sure, I haven't noticed anything like that."
    _, kind, phrase = best
    if kind == "have":
        return f"Yes, I have {phrase}."
    if kind == "not":
        return f"No, I don't have {phrase}."
    return "I don't know, nobody has checked that."


def scripted_judge(messages: list[dict[str, str]]) -> str:
    """Exact (1.0) when the diagnosis is the hidden condition or a synonym, else wrong (0.0)."""
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    hidden = re.search(r"^Hidden condition:\s*(.+)$", user, re.MULTILINE)
    synonyms = re.search(r"^Synonyms:\s*(.+)$", user, re.MULTILINE)
    diagnosis = re.search(r"<diagnosis>(.*?)</diagnosis>", user, re.DOTALL)
    names = [hidden.group(1)] if hidden else []
    if synonyms and synonyms.group(1) != "(none)":
        names += synonyms.group(1).split(";")
    said = _key(diagnosis.group(1)) if diagnosis else ""
    if said and said in {_key(name) for name in names}:
        verdict = {"score": 1.0, "category": "exact", "rationale": "It names the hidden condition."}
    else:
        verdict = {"score": 0.0, "category": "wrong", "rationale": "The diagnosis is a different condition."}
    return json.dumps(verdict)
