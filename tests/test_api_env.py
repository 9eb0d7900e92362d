"""The OpenAI-compatible patient and judge, through the real ``openai`` SDK against our loopback server.

Every test talks HTTP to ``grpodx/testing/loopback.py`` on 127.0.0.1; faults are injected there, so what is
tested is the whole path: our limits and retries, the SDK's error mapping, and the counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import random
import re
import time
import traceback
from contextlib import aclosing

import pytest
from pydantic import SecretStr

from grpodx.api_client import TRANSPORT_FAILURES, ApiError, RateLimiter, retry_after_seconds
from grpodx.config import ApiClientConfig, Config, ConfigError, JudgeConfig, PatientConfig
from grpodx.env import make_judge, make_patient
from grpodx.env.api_judge import JUDGE_RUBRIC, SCHEMA_FORMAT, OpenAIJudge, parse_answer
from grpodx.env.api_patient import OpenAIPatient, PatientError
from grpodx.env.judge import IcdJudge, JudgeError, Verdict
from grpodx.env.patient import Message, ScriptedPatient
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.testing.loopback import Fault

KB = load_knowledge_base()
CASE = CaseSampler(KB).case_at(0)
SECRET = "sk-test-" + "Zq9xW" * 8
KEY = SecretStr(SECRET)
# Fast retries so that the tests measure our logic, not sleeps.
FAST = {"timeout_s": 2.0, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05}


def config(server, patient: dict | None = None, judge: dict | None = None, **client) -> Config:
    settings = ApiClientConfig(**{**FAST, **client})
    return Config(
        patient=PatientConfig(
            kind="openai", model="patient-sim", base_url=server.base_url, client=settings, **(patient or {})
        ),
        judge=JudgeConfig(
            kind="openai", model="judge-sim", base_url=server.base_url, client=settings, **(judge or {})
        ),
    )


def patient_for(server, patient: dict | None = None, **client) -> OpenAIPatient:
    patient = make_patient(config(server, patient=patient, **client), KEY)
    assert isinstance(patient, OpenAIPatient)
    return patient


def judge_for(server, judge: dict | None = None, **client) -> OpenAIJudge:
    made = make_judge(config(server, judge=judge, **client), KEY)
    assert isinstance(made, OpenAIJudge)
    return made


def kinds(kind: str) -> list[str]:
    return [s for s in (*CASE.present, *CASE.absent) if KB.symptom(s).kind == kind]


HAVE = next(s for s in CASE.present if KB.symptom(s).kind == "symptom")
NOT = next(s for s in CASE.absent if KB.symptom(s).kind == "symptom")
FINDING = kinds("finding")[0]
OPENING = ScriptedPatient(KB).opening_text(CASE)


def ask(question: str) -> list[Message]:
    return [Message("patient", OPENING), Message("doctor", question)]


def question_about(symptom_id: str) -> str:
    return f"Have you noticed {KB.symptom(symptom_id).phrase}?"


TRANSCRIPT = [
    Message("patient", OPENING),
    Message("doctor", "Do you have a fever?"),
    Message("patient", "Yes."),
]


def check_invariants(snapshot: dict[str, float]) -> None:
    transport = sum(snapshot[f"failures_{kind}"] for kind in TRANSPORT_FAILURES)
    assert snapshot["requests"] == snapshot["successes"] + snapshot["cancelled"] + transport
    assert snapshot["calls"] == snapshot["calls_ok"] + snapshot["calls_failed"] + snapshot["calls_cancelled"]
    assert snapshot["retries"] == snapshot["requests"] - snapshot["calls"]


# -- patient -----------------------------------------------------------------------------------------
async def test_patient_answers_from_the_card(server):
    async with aclosing(patient_for(server)) as patient:
        assert await patient.opening(CASE) == OPENING  # local: no request
        assert server.requests == []
        have = await patient.reply(CASE, ask(question_about(HAVE)))
        absent = await patient.reply(CASE, ask(question_about(NOT)))
        finding = await patient.reply(CASE, ask(question_about(FINDING)))
        unknown = await patient.reply(CASE, ask("Do you collect stamps?"))
    assert have.startswith("Yes") and absent.startswith("No")
    assert "don't know" in finding and "not sure" in unknown
    first = server.requests[0]
    assert first.authorization == f"Bearer {SECRET}"  # the key did arrive where it belongs
    body = first.body
    assert body["model"] == "patient-sim" and body["seed"] == CASE.seed % (2**31 - 1)
    assert body["temperature"] == 0.7 and body["max_tokens"] == 200
    assert [m["role"] for m in body["messages"]] == ["system", "assistant", "user"]
    assert body["messages"][1]["content"] == OPENING
    assert "response_format" not in body


async def test_patient_seed_can_be_left_out_for_servers_that_mishandle_it(server):
    async with aclosing(patient_for(server, patient={"send_seed": False})) as patient:
        assert (await patient.reply(CASE, ask(question_about(HAVE)))).startswith("Yes")
    assert "seed" not in server.requests[0].body


def test_patient_prompt_is_the_card_without_the_condition():
    patient = OpenAIPatient(PatientConfig(), client=None, kb=KB)  # type: ignore[arg-type]
    seen = set()
    for index in range(150):
        case = CaseSampler(KB).case_at(index)
        prompt = patient.system_prompt(case)
        assert prompt == patient.system_prompt(case)  # a pure function of the card
        seen.add(case.condition)
        for name in KB.condition(case.condition).all_names():
            assert not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, re.IGNORECASE), name
        assert case.icd10 not in prompt
        assert f"{case.age}-year-old" in prompt
        for symptom_id in case.present:
            phrase = KB.symptom(symptom_id).phrase
            # A finding is listed without its value: the patient cannot know it.
            listed_as = "cannot know" if KB.symptom(symptom_id).kind == "finding" else "you have:"
            section = prompt.split(listed_as)[1].split("\n\n")[0]
            assert f"- {phrase}\n" in section + "\n"
    assert len(seen) > 40


async def test_patient_reply_naming_the_condition_is_rejected(server):
    leak = Fault("content", content=f"My neighbour says it is {CASE.condition.lower()}.")
    server.inject(leak)
    async with aclosing(patient_for(server)) as patient:
        reply = await patient.reply(CASE, ask(question_about(HAVE)))
        assert reply.startswith("Yes")
        seeds = [r.body["seed"] for r in server.requests]
        assert seeds == [CASE.seed % (2**31 - 1), (CASE.seed + 1) % (2**31 - 1)]
        server.inject(leak, times=3)
        with pytest.raises(PatientError, match="names the hidden condition") as error:
            await patient.reply(CASE, ask(question_about(HAVE)))
        assert CASE.condition.lower() not in str(error.value).lower()
        assert patient.usage.snapshot()["failures_invalid_answer"] == 4


# -- judge -------------------------------------------------------------------------------------------
async def test_judge_verdicts_and_structured_request(server):
    synonym = KB.condition(CASE.condition).synonyms[0]
    async with aclosing(judge_for(server)) as judge:
        right = await judge.score(CASE, synonym, TRANSCRIPT)
        wrong = await judge.score(CASE, "Migraine", TRANSCRIPT)
    assert right == Verdict(1.0, "exact", right.rationale, CASE.icd10)
    assert (wrong.score, wrong.category) == (0.0, "wrong")
    body = server.requests[0].body
    assert body["response_format"] == SCHEMA_FORMAT and body["temperature"] == 0.0
    system, user = (m["content"] for m in body["messages"])
    assert JUDGE_RUBRIC in system
    assert f"Hidden condition: {CASE.condition}" in user and f"ICD-10-CM code: {CASE.icd10}" in user
    assert synonym in user and f"<diagnosis>{synonym}</diagnosis>" in user
    assert "Doctor: Do you have a fever?" in user and "Patient: Yes." in user


async def test_judge_without_diagnosis_makes_no_call(server):
    async with aclosing(judge_for(server)) as judge:
        none = Verdict(0.0, "none", "no final diagnosis was given")
        assert await judge.score(CASE, None, TRANSCRIPT) == none
        assert (await judge.score(CASE, "  ", TRANSCRIPT)).category == "none"
    assert server.requests == []


async def test_judge_json_object_mode_when_structured_output_is_off(server):
    async with aclosing(judge_for(server, judge={"structured_output": False})) as judge:
        assert (await judge.score(CASE, CASE.condition, TRANSCRIPT)).score == 1.0
    assert server.requests[0].body["response_format"] == {"type": "json_object"}


async def test_judge_falls_back_to_json_object_once(server):
    server.supports_json_schema = False
    async with aclosing(judge_for(server)) as judge:
        assert (await judge.score(CASE, CASE.condition, TRANSCRIPT)).score == 1.0
        assert (await judge.score(CASE, "Migraine", TRANSCRIPT)).score == 0.0
        assert not judge.use_schema
        usage = judge.usage.snapshot()
    formats = [r.body["response_format"]["type"] for r in server.requests]
    assert formats == ["json_schema", "json_object", "json_object"]
    assert usage["failures_client_error"] == 1 and usage["retries"] == 0


async def test_judge_400_about_something_else_keeps_the_schema_and_fails_fast(server):
    server.inject("bad_request", times=2)
    async with aclosing(judge_for(server)) as judge:
        started = time.monotonic()
        with pytest.raises(ApiError) as error:
            await judge.score(CASE, CASE.condition, TRANSCRIPT)
        assert time.monotonic() - started < 0.5
        assert judge.use_schema
    assert error.value.status_code == 400 and error.value.kind == "client_error"
    assert len(server.requests) == 2


async def test_malformed_answer_is_retried_with_the_reason(server):
    server.inject("malformed")
    async with aclosing(judge_for(server)) as judge:
        verdict = await judge.score(CASE, CASE.condition, TRANSCRIPT)
        assert verdict.score == 1.0
        assert judge.usage.snapshot()["failures_invalid_answer"] == 1
    retry = server.requests[1].body["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[3]["content"].startswith("That answer was not valid")


async def test_out_of_range_score_is_invalid(server):
    server.inject("out_of_range")
    async with aclosing(judge_for(server)) as judge:
        assert (await judge.score(CASE, CASE.condition, TRANSCRIPT)).score == 1.0
        assert judge.usage.snapshot()["failures_invalid_answer"] == 1


async def test_always_malformed_raises_judge_error_and_counts(server):
    server.inject("malformed", "out_of_range", "malformed")
    async with aclosing(judge_for(server, judge={"invalid_answer_retries": 2})) as judge:
        with pytest.raises(JudgeError, match="no valid verdict in 3 tries"):
            await judge.score(CASE, CASE.condition, TRANSCRIPT)
        usage = judge.usage.snapshot()
    assert len(server.requests) == 3
    assert usage["failures_invalid_answer"] == 3 and usage["calls_ok"] == 3


@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"score": 0.6, "category": "partial", "rationale": "Same category."}', True),
        ('```json\n{"score": 1, "category": "exact", "rationale": "Same."}\n```', True),
        ('{"score": 1.2, "category": "exact", "rationale": "Too high."}', False),
        ('{"score": -0.1, "category": "wrong", "rationale": "Too low."}', False),
        ('{"score": "0.6", "category": "partial", "rationale": "A string."}', False),
        ('{"score": 0.6, "category": "exact", "rationale": "Contradiction."}', False),
        ('{"score": 0.3, "category": "wrong", "rationale": "Contradiction."}', False),
        ('{"score": 0.5, "category": "maybe", "rationale": "Unknown category."}', False),
        ('{"score": 0.5, "category": "partial", "rationale": ""}', False),
        ('{"score": 0.5, "category": "partial"}', False),
        ("The diagnosis is right.", False),
    ],
)
def test_answer_validation(text, ok):
    if ok:
        parse_answer(text)
    else:
        with pytest.raises(ValueError):
            parse_answer(text)


async def test_blend_with_the_offline_icd_score(server):
    icd = IcdJudge(KB)
    case, near = next(
        (case, condition.name)
        for case in (CaseSampler(KB).case_at(i) for i in range(30))
        for condition in KB.conditions
        if condition.name != case.condition and icd.verdict(case, condition.name).score > 0
    )
    async with aclosing(judge_for(server, judge={"icd_blend_weight": 0.5})) as judge:
        verdict = await judge.score(case, near, TRANSCRIPT)
    assert verdict.category == "wrong"  # the scripted model says wrong (0.0)
    assert verdict.score == pytest.approx(0.5 * icd.verdict(case, near).score)
    assert "blended" in verdict.rationale and verdict.predicted_code is not None


async def test_disk_cache_of_identical_requests(server, tmp_path):
    settings = {"cache_dir": str(tmp_path)}
    async with aclosing(judge_for(server, judge=settings)) as judge:
        first = await judge.score(CASE, CASE.condition, TRANSCRIPT)
        assert await judge.score(CASE, CASE.condition, TRANSCRIPT) == first
        assert judge.usage.snapshot()["cache_hits"] == 1
    async with aclosing(judge_for(server, judge=settings)) as judge:  # persisted across workers
        assert await judge.score(CASE, CASE.condition, TRANSCRIPT) == first
        await judge.score(CASE, "Migraine", TRANSCRIPT)  # a different request is not a hit
    assert len(server.requests) == 2
    files = list(tmp_path.iterdir())
    assert len(files) == 2 and all(SECRET not in f.read_text() and SECRET not in f.name for f in files)


# -- transport: retries, timeouts, limits --------------------------------------------------------------
async def test_429_retry_after_is_honoured(server):
    server.inject(Fault("rate_limit", retry_after=0.4), times=2)
    async with aclosing(patient_for(server)) as patient:
        started = time.monotonic()
        assert (await patient.reply(CASE, ask(question_about(HAVE)))).startswith("Yes")
        elapsed = time.monotonic() - started
        usage = patient.usage.snapshot()
    arrivals = [r.arrived for r in server.requests]
    assert elapsed >= 0.8 and all(b - a >= 0.4 for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert usage["failures_rate_limited"] == 2 and usage["retries"] == 2 and usage["backoff_wait_s"] >= 0.8


async def test_server_errors_are_retried_then_succeed(server):
    server.inject("server_error", times=3)
    async with aclosing(patient_for(server)) as patient:
        assert (await patient.reply(CASE, ask(question_about(HAVE)))).startswith("Yes")
        usage = patient.usage.snapshot()
    assert len(server.requests) == 4 and usage["failures_server_error"] == 3 and usage["calls_ok"] == 1


async def test_retries_exhausted_raise(server):
    server.inject("server_error", times=3)
    async with aclosing(patient_for(server, max_retries=2)) as patient:
        with pytest.raises(ApiError, match="failed after 3 attempt") as error:
            await patient.reply(CASE, ask(question_about(HAVE)))
        check_invariants(patient.usage.snapshot())
    assert (error.value.kind, error.value.status_code, error.value.attempts) == ("server_error", 500, 3)


async def test_timeout_then_success(server):
    server.inject(Fault("slow", delay=3.0))
    async with aclosing(patient_for(server, timeout_s=0.6)) as patient:
        started = time.monotonic()
        assert (await patient.reply(CASE, ask(question_about(HAVE)))).startswith("Yes")
        assert time.monotonic() - started < 2.5  # the slow answer was not waited for
        assert patient.usage.snapshot()["failures_timeout"] >= 1
    assert server.requests[0].fault == Fault("slow", delay=3.0) and server.requests[-1].status == 200


async def test_dropped_connection_is_retried(server):
    server.inject("drop")
    async with aclosing(patient_for(server)) as patient:
        assert (await patient.reply(CASE, ask(question_about(HAVE)))).startswith("Yes")
        assert patient.usage.snapshot()["failures_connection"] == 1
    assert [r.status for r in server.requests] == [None, 200]


async def test_non_retryable_400_fails_fast(server):
    server.inject("bad_request")
    async with aclosing(patient_for(server)) as patient:
        with pytest.raises(ApiError, match="HTTP 400") as error:
            await patient.reply(CASE, ask(question_about(HAVE)))
        usage = patient.usage.snapshot()
    assert error.value.attempts == 1 and len(server.requests) == 1
    assert usage["failures_client_error"] == 1 and usage["retries"] == 0


async def test_requests_per_minute_holds(server):
    # 120/min = 2/s with a bucket of one second's worth (2): 6 calls need at least (6 - 2) / 2 = 2 s.
    async with aclosing(patient_for(server, requests_per_minute=120)) as patient:
        # A first request pays one-off costs (connection, SDK set-up) after the limiter let it go, which
        # would blur its arrival time; warm up, then let the bucket refill (1 s) before measuring.
        await patient.reply(CASE, ask(question_about(HAVE)))
        await asyncio.sleep(1.0)
        server.reset()
        started = time.monotonic()
        await asyncio.gather(*(patient.reply(CASE, ask(question_about(HAVE))) for _ in range(6)))
        elapsed = time.monotonic() - started
    arrivals = sorted(r.arrived for r in server.requests)
    assert elapsed >= 1.95
    # Requests i..j (j - i + 1 of them) need (j - i + 1 - 2) / 2 s; the slack is the transit jitter of a
    # loaded machine (unlimited, all six arrive within about 0.1 s).
    for i in range(len(arrivals)):
        for j in range(i + 1, len(arrivals)):
            assert arrivals[j] - arrivals[i] >= (j - i + 1 - 2) / 2 - 0.15


async def test_token_bucket_paces_and_corrects():
    limiter = RateLimiter(None, tokens_per_minute=600)  # 10 tokens/s, bucket of 10
    started = time.monotonic()
    for _ in range(4):
        await limiter.acquire(5)
    assert time.monotonic() - started >= 0.95  # 20 tokens: 10 at once, then 10 at 10/s
    await asyncio.sleep(1.0)
    await limiter.acquire(10)
    limiter.correct_tokens(estimated=10, actual=2)  # the call used less: 8 come back
    assert await limiter.acquire(8) < 0.3  # no pacing wait (the bound allows for a busy machine)


async def test_concurrency_limit(server):
    server.latency_s = 0.2
    async with aclosing(patient_for(server, patient={"max_concurrency": 2})) as patient:
        started = time.monotonic()
        await asyncio.gather(*(patient.reply(CASE, ask(question_about(HAVE))) for _ in range(6)))
        assert time.monotonic() - started >= 0.55
    assert server.max_in_flight == 2


async def test_cancelled_call_is_counted(server):
    server.inject(Fault("slow", delay=1.0))
    async with aclosing(patient_for(server)) as patient:
        task = asyncio.create_task(patient.reply(CASE, ask(question_about(HAVE))))
        while not server.requests:  # cancel while the request is at the server
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        usage = patient.usage.snapshot()
    assert usage["calls_cancelled"] == 1 and usage["cancelled"] == 1
    check_invariants(usage)


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.5 < retry_after_seconds({"retry-after": http_date}) <= 5.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


# -- accounting and secrecy ----------------------------------------------------------------------------
async def test_usage_and_cost(server):
    prices = {"input_cost_per_mtok": 1.0, "output_cost_per_mtok": 2.0}
    async with aclosing(patient_for(server, **prices)) as patient:
        await patient.reply(CASE, ask(question_about(HAVE)))
        await patient.reply(CASE, ask(question_about(NOT)))
        first = patient.usage.delta()
        await patient.reply(CASE, ask(question_about(FINDING)))
        second = patient.usage.delta()
        total = patient.usage.snapshot()
    served = [r.usage for r in server.requests]
    prompt = sum(u["prompt_tokens"] for u in served)
    completion = sum(u["completion_tokens"] for u in served)
    assert (total["prompt_tokens"], total["completion_tokens"]) == (prompt, completion)
    assert total["cost_usd"] == pytest.approx(prompt * 1e-6 + completion * 2e-6)
    assert first["calls"] == 2 and second["calls"] == 1
    assert second["prompt_tokens"] == served[2]["prompt_tokens"]
    assert all(first[key] + second[key] == pytest.approx(total[key]) for key in total)
    check_invariants(total)


async def test_the_key_never_leaks(server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    server.inject("echo_key")  # a 401 whose message repeats "Bearer <key>"
    server.inject("server_error", times=2)
    server.inject("malformed", times=2)
    patient = patient_for(server, max_retries=1)
    judge = judge_for(server, judge={"invalid_answer_retries": 1, "cache_dir": str(tmp_path)})
    async with aclosing(patient), aclosing(judge):
        for call in (
            patient.reply(CASE, ask(question_about(HAVE))),
            patient.reply(CASE, ask(question_about(HAVE))),
            judge.score(CASE, CASE.condition, TRANSCRIPT),
        ):
            try:
                await call
            except (ApiError, JudgeError) as error:
                errors.append(error)
        texts = [repr(patient), repr(judge), repr(patient.client), repr(vars(patient.client)), repr(KEY)]
        texts += [json.dumps(patient.usage.snapshot()), json.dumps(judge.usage.snapshot())]
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(patient)
    assert [type(e).__name__ for e in errors] == ["ApiError", "ApiError", "JudgeError"]
    assert server.requests[0].authorization == f"Bearer {SECRET}"
    for error in errors:
        assert error.__cause__ is None and error.__context__ is None
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
        texts.append(f"{type(error).__name__}: {error}")  # how EpisodeResult.error records it
        assert SECRET.encode() not in pickle.dumps(error)
    assert "HTTP 401" in str(errors[0]) and "***" in str(errors[0])
    texts.append(caplog.text)
    texts += [f.read_text() for f in tmp_path.iterdir()]
    for text in texts:
        assert SECRET not in text and SECRET[8:30] not in text


def test_api_backends_need_a_key():
    for role in ("patient", "judge"):
        settings = Config.model_validate({role: {"kind": "openai"}})
        factory = make_patient if role == "patient" else make_judge
        with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
            factory(settings)
    assert isinstance(make_patient(Config()), ScriptedPatient)
    assert isinstance(make_judge(Config()), IcdJudge)


async def test_nothing_lost_under_random_faults(server):
    """K concurrent patient and judge calls under random faults: each ends once, every attempt counted."""
    rng = random.Random(5)
    menu = [
        Fault("ok"),
        Fault("ok"),
        Fault("ok"),
        Fault("rate_limit", retry_after=0.05),
        Fault("rate_limit"),
        Fault("server_error"),
        Fault("slow", delay=1.5),
        Fault("drop"),
        Fault("malformed"),
    ]
    server.inject(*(rng.choice(menu) for _ in range(400)))
    # A realistic concurrency cap and a generous timeout keep a busy 2-core machine from timing out
    # healthy requests, which would make the timeout count differ from the slow faults served.
    limits = {"max_retries": 2, "timeout_s": 1.0}
    patient = patient_for(server, patient={"max_concurrency": 8}, **limits)
    judge = judge_for(server, judge={"invalid_answer_retries": 1, "max_concurrency": 8}, **limits)
    async with aclosing(patient), aclosing(judge):
        calls = [patient.reply(CASE, ask(question_about(HAVE))) for _ in range(30)]
        calls += [judge.score(CASE, CASE.condition, TRANSCRIPT) for _ in range(20)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        usages = [patient.usage.snapshot(), judge.usage.snapshot()]
    replies, verdicts = outcomes[:30], outcomes[30:]
    assert all(isinstance(r, str | ApiError | PatientError) for r in replies)
    assert all(isinstance(v, Verdict | ApiError | JudgeError) for v in verdicts)
    assert all(v.score == 1.0 for v in verdicts if isinstance(v, Verdict))
    failed = sum(isinstance(o, Exception) for o in outcomes)
    assert 0 < failed < len(outcomes)  # the mix exercised both ends
    for usage in usages:
        check_invariants(usage)
    assert usages[0]["calls_failed"] == sum(isinstance(r, ApiError) for r in replies)
    assert usages[1]["calls_failed"] == sum(isinstance(v, ApiError) for v in verdicts)
    # The server's record and the clients' counters tell the same story, kind by kind.
    total = {key: usages[0][key] + usages[1][key] for key in usages[0]}
    served = [(r, r.fault.kind if r.fault else "ok") for r in server.requests]
    assert total["requests"] == len(served)
    fault_to_failure = {
        "rate_limit": "rate_limited",
        "server_error": "server_error",
        "slow": "timeout",
        "drop": "connection",
        "malformed": "invalid_answer",
    }
    for fault, failure in fault_to_failure.items():
        assert total[f"failures_{failure}"] == sum(kind == fault for _, kind in served), fault
    delivered = [r.usage for r, kind in served if r.usage is not None and kind != "slow"]
    assert total["prompt_tokens"] == sum(u["prompt_tokens"] for u in delivered)
    assert total["completion_tokens"] == sum(u["completion_tokens"] for u in delivered)
