"""The client layer for OpenAI-compatible chat APIs: limits, retries, usage, and a key that never leaks.

One :class:`ApiClient` per worker actor wraps one ``openai.AsyncOpenAI`` (the SDK's own retries are off,
so every attempt passes through our limits and is counted). A call goes through four gates, in order:

1. a concurrency semaphore (``max_concurrency`` calls in flight),
2. a :class:`RateLimiter` (requests and tokens per minute, plus a shared pause after a ``Retry-After``),
3. a hard per-attempt deadline (``timeout_s``),
4. the retry policy: 429, 5xx, timeouts and connection errors are retried with exponential backoff and
   full jitter (a ``Retry-After`` header wins over the computed delay); any other 4xx fails at once.

A call either returns a :class:`ChatResult` or raises :class:`ApiError`, whose message is scrubbed of the
key; it is raised outside the SDK's ``except`` block, so no traceback or ``__context__`` drags the SDK
exception (whose request carries the ``Authorization`` header) along.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import openai
from pydantic import SecretStr

from grpodx.config import ApiClientConfig
from grpodx.redaction import MASK, redact

log = logging.getLogger(__name__)

FailureKind = Literal[
    "rate_limited", "server_error", "timeout", "connection", "client_error", "other", "invalid_answer"
]
# Kinds an HTTP attempt can fail with; ``invalid_answer`` is recorded by the patient or judge on top,
# for a response that arrived fine but did not say anything usable.
TRANSPORT_FAILURES: tuple[FailureKind, ...] = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "client_error",
    "other",
)
FAILURE_KINDS: tuple[FailureKind, ...] = (*TRANSPORT_FAILURES, "invalid_answer")
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "server_error", "timeout", "connection"})

# A Retry-After longer than this is a quota, not a hiccup: waiting it out would stall the whole run.
MAX_RETRY_AFTER_S = 60.0
# Rough size of a chat message's framing in tokens, for the estimate made before a call.
_TOKENS_PER_MESSAGE = 4
_CHARS_PER_TOKEN = 4
_MAX_ERROR_TEXT = 300
# Anything that looks like an OpenAI key or a bearer token, in case a server echoes a (masked) key.
_KEYLIKE = re.compile(r"(?:sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")
# The SDK prefixes status errors with "Error code: 429 - "; our message names the status already.
_SDK_PREFIX = re.compile(r"^Error code: \d+ - ")


def scrub(text: str, secret: str | None) -> str:
    """``text`` with the secret and anything key-like replaced, cut to a loggable length."""
    text = _KEYLIKE.sub(MASK, redact(text, [secret] if secret else []))
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "…"


class ApiError(RuntimeError):
    """A chat call failed for good (retries exhausted or not retryable); the message holds no key."""

    def __init__(
        self,
        message: str,
        kind: FailureKind,
        status_code: int | None = None,
        attempts: int = 1,
        reason: str = "",
    ):
        super().__init__(message)
        self.kind = kind
        self.status_code = status_code
        self.attempts = attempts
        self.reason = reason or message  # what the last attempt got, e.g. "HTTP 401: Incorrect API key"

    def __reduce__(self):
        # Keeps kind/status across pickling (Ray ships exceptions between processes).
        return (type(self), (str(self), self.kind, self.status_code, self.attempts, self.reason))


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class ApiUsage:
    """Counters of one client, all additive so that workers' snapshots can simply be summed.

    Invariants (exact, tested): ``requests == successes + cancelled + sum(failures_<transport kind>)``
    and ``calls == calls_ok + calls_failed + calls_cancelled``; ``retries == requests - calls``
    once no call is in flight. ``failures_invalid_answer`` counts answers that arrived (so are among
    the successes) but that the patient or judge rejected.
    """

    def __init__(self, input_cost_per_mtok: float, output_cost_per_mtok: float):
        self.input_cost_per_mtok = input_cost_per_mtok
        self.output_cost_per_mtok = output_cost_per_mtok
        self.counts: dict[str, float] = dict.fromkeys(self.keys(), 0.0)
        self._mark = dict(self.counts)

    @staticmethod
    def keys() -> list[str]:
        return [
            "calls",
            "calls_ok",
            "calls_failed",
            "calls_cancelled",
            "requests",
            "successes",
            "cancelled",
            "retries",
            *(f"failures_{kind}" for kind in FAILURE_KINDS),
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "rate_limit_wait_s",
            "backoff_wait_s",
            "cache_hits",
        ]

    def add(self, key: str, amount: float = 1.0) -> None:
        self.counts[key] += amount

    def record_failure(self, kind: FailureKind) -> None:
        self.counts[f"failures_{kind}"] += 1

    def record_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.counts["prompt_tokens"] += prompt_tokens
        self.counts["completion_tokens"] += completion_tokens
        self.counts["cost_usd"] += (
            prompt_tokens * self.input_cost_per_mtok + completion_tokens * self.output_cost_per_mtok
        ) / 1e6

    def snapshot(self) -> dict[str, float]:
        """Totals since the client was built."""
        return dict(self.counts)

    def delta(self) -> dict[str, float]:
        """What happened since the previous ``delta()`` (or since the start); moves the mark."""
        now = self.snapshot()
        change = {key: now[key] - self._mark[key] for key in now}
        self._mark = now
        return change


class TokenBucket:
    """A token bucket refilled at ``per_minute / 60`` per second, holding one second's worth.

    One second's worth (at least one unit) rather than a minute's: a fresh client may not fire a whole
    minute's quota in a burst, which OpenAI-style servers answer with 429s because they enforce limits
    over sub-minute windows. A cost larger than the capacity waits for a full bucket and leaves it in
    debt, so large requests still go through and the average rate holds.
    """

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self._updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, cost: float) -> float:
        self._refill()
        missing = min(cost, self.capacity) - self.level
        return max(0.0, missing / self.rate)

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost

    def give_back(self, amount: float) -> None:
        """Correct an estimate: positive when the call used fewer tokens than reserved."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets, and a pause every caller honours.

    Callers are served in arrival order (one lock), so a large request is not starved by small ones.
    ``pause_until`` is set from a 429's ``Retry-After``: the server told us to back off, which concerns
    every call of this client, not only the one that got the 429.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.paused_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> float:
        """Wait for room for one request of ``tokens`` estimated tokens; returns the seconds waited."""
        started = time.monotonic()
        async with self._lock:
            while True:
                wait = self.paused_until - time.monotonic()
                if self.requests is not None:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens is not None:
                    wait = max(wait, self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)
        return time.monotonic() - started

    def correct_tokens(self, estimated: int, actual: int) -> None:
        if self.tokens is not None:
            self.tokens.give_back(estimated - actual)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A tokenizer-free estimate (about four characters a token) used only until the real usage arrives."""
    chars = sum(len(message.get("content") or "") for message in messages)
    return chars // _CHARS_PER_TOKEN + _TOKENS_PER_MESSAGE * len(messages) + 3


def retry_after_seconds(headers: Any) -> float | None:
    """The server's requested wait: ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class _Failure:
    """What is kept of a failed attempt: never the SDK exception itself (its request holds the key)."""

    kind: FailureKind
    message: str
    status_code: int | None = None
    retry_after: float | None = None


class ApiClient:
    """One OpenAI-compatible endpoint for one worker actor: limits, retries, usage accounting.

    Build it inside the process that uses it (it holds a live connection pool and the key), and
    ``await aclose()`` it when done. It refuses to be pickled so that it cannot end up in a checkpoint,
    a Ray object or an actor argument by accident.
    """

    def __init__(
        self,
        config: ApiClientConfig,
        *,
        model: str,
        api_key: SecretStr,
        base_url: str | None = None,
        max_concurrency: int = 64,
        name: str = "api",
        warn_on_failure: bool = True,
    ):
        self.config = config
        self.model = model
        self.base_url = base_url
        self.name = name
        self.usage = ApiUsage(config.input_cost_per_mtok, config.output_cost_per_mtok)
        self.limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        # Failure kinds already logged at warning level (all of them when the caller reports failures).
        self._warned: set[str] = set() if warn_on_failure else set(FAILURE_KINDS)
        # Kept as a SecretStr (masked in any repr); the plain value lives only inside the SDK client.
        self._api_key = api_key
        # max_retries=0: every attempt must pass our limiter and be counted, so retries are ours.
        self._client = openai.AsyncOpenAI(
            api_key=api_key.get_secret_value(), base_url=base_url, max_retries=0, timeout=config.timeout_s
        )

    def __repr__(self) -> str:
        return f"ApiClient(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    def __getstate__(self):
        raise TypeError(
            "ApiClient holds an API key and a connection pool and cannot be pickled; "
            "build it inside the worker with make_patient / make_judge"
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One chat completion, retried as the config says; raises :class:`ApiError` when it gives up."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            request["seed"] = seed
        if response_format is not None:
            request["response_format"] = response_format
        estimated = estimate_prompt_tokens(messages) + max_tokens
        self.usage.add("calls")
        attempts = 0
        try:
            while True:
                attempts += 1
                async with self._semaphore:
                    self.usage.add("rate_limit_wait_s", await self.limiter.acquire(estimated))
                    outcome = await self._attempt(request, estimated)
                if isinstance(outcome, ChatResult):
                    self.usage.add("calls_ok")
                    return outcome
                if outcome.kind not in RETRYABLE or attempts > self.config.max_retries:
                    break
                delay = self._retry_delay(outcome, attempts)
                log.debug(
                    "%s call: %s, retry %d/%d in %.2f s",
                    self.name,
                    outcome.message,
                    attempts,
                    self.config.max_retries,
                    delay,
                )
                self.usage.add("retries")
                self.usage.add("backoff_wait_s", delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.usage.add("calls_cancelled")
            raise
        self.usage.add("calls_failed")
        endpoint = self.base_url or "the OpenAI API"
        message = f"{self.name} API call to {endpoint} failed after {attempts} attempt(s): {outcome.message}"
        # Once per kind at warning level: a dead server fails every call, and the step's failure report
        # on the console counts the rest.
        if outcome.kind not in self._warned:
            self._warned.add(outcome.kind)
            log.warning("%s (further %s failures are counted, not logged)", message, outcome.kind)
        else:
            log.debug("%s", message)
        # Raised here, outside any ``except`` block, so the SDK exception is not chained to it.
        raise ApiError(message, outcome.kind, outcome.status_code, attempts, outcome.message)

    async def _attempt(self, request: dict[str, Any], estimated: int) -> ChatResult | _Failure:
        """One HTTP attempt; counts it and turns every SDK failure into a scrubbed :class:`_Failure`."""
        self.usage.add("requests")
        try:
            async with asyncio.timeout(self.config.timeout_s):
                response = await self._client.chat.completions.create(**request)
        except asyncio.CancelledError:
            self.usage.add("cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified and counted below
            failure = self._classify(exc)
        else:
            self.usage.add("successes")
            return self._result(response, request, estimated)
        self.usage.record_failure(failure.kind)
        if failure.retry_after is not None:
            self.limiter.pause(min(failure.retry_after, MAX_RETRY_AFTER_S))
        return failure

    def _result(self, response: Any, request: dict[str, Any], estimated: int) -> ChatResult:
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice is not None and choice.message else None) or ""
        usage = response.usage
        if usage is not None and usage.prompt_tokens is not None:
            prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens or 0
        else:
            # Some compatible servers omit usage; the estimate is better than counting nothing.
            prompt_tokens = estimate_prompt_tokens(request["messages"])
            completion_tokens = len(text) // _CHARS_PER_TOKEN + 1
        self.usage.record_tokens(prompt_tokens, completion_tokens)
        self.limiter.correct_tokens(estimated, prompt_tokens + completion_tokens)
        return ChatResult(text, prompt_tokens, completion_tokens, choice.finish_reason if choice else None)

    def _classify(self, exc: Exception) -> _Failure:
        # Order matters: the SDK's timeout error is a connection error, and 429 is a status error.
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            return _Failure("timeout", f"timeout: no answer within {self.config.timeout_s:g} s")
        if isinstance(exc, openai.APIConnectionError):
            return _Failure("connection", f"connection error: {self._scrub(str(exc))}")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            text = _SDK_PREFIX.sub("", getattr(exc, "message", "") or str(exc))
            detail = f"HTTP {status}: {self._scrub(text)}"
            if status == 429:
                return _Failure("rate_limited", detail, status, retry_after_seconds(exc.response.headers))
            if status >= 500:
                # A 503 may say when to come back, too.
                return _Failure("server_error", detail, status, retry_after_seconds(exc.response.headers))
            return _Failure("client_error", detail, status)
        return _Failure("other", f"{type(exc).__name__}: {self._scrub(str(exc))}")

    def _retry_delay(self, failure: _Failure, attempt: int) -> float:
        """Full jitter (uniform in [0, min(max, base * 2**(attempt-1))]); a Retry-After is a floor."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0.0, ceiling)
        if failure.retry_after is not None:
            # At least what the server asked for, plus a little jitter so that callers paused together
            # do not all come back in the same instant.
            wait = min(failure.retry_after, MAX_RETRY_AFTER_S)
            delay = wait + random.uniform(0.0, 0.1 * wait)
        return delay

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key.get_secret_value())


class ApiBacked:
    """What an API-backed patient and judge share: one client per worker, its usage, its shutdown."""

    client: ApiClient

    @staticmethod
    def make_client(config, api_key, name: str) -> ApiClient:
        """The client for a ``PatientConfig`` or ``JudgeConfig`` (same fields for both)."""
        return ApiClient(
            config.client,
            model=config.model,
            api_key=api_key,
            base_url=config.base_url,
            max_concurrency=config.max_concurrency,
            name=name,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client!r})"

    @property
    def usage(self) -> ApiUsage:
        """This worker's API counters; see :class:`ApiUsage` for the keys."""
        return self.client.usage

    async def aclose(self) -> None:
        await self.client.aclose()
