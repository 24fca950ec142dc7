"""The Litestar app end to end on a real NATS server: the test answers the limiter and
cache subjects and plays the inference worker."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import openai
import pytest
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import Buckets

from tests.gateway.harness import POLICIES, REPO, Gateway, answer, build_gateway

SECRET = "zebra-violet-prompt-marker"
CHAT = "/v1/chat/completions"


def chat_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim-fast", "messages": [{"role": "user", "content": SECRET}]}
    body.update(kw)
    return body


def assert_problem(resp, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = resp.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"].endswith("/" + code)
    assert problem["title"] and problem["detail"]
    assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"]), problem["trace_id"]
    assert problem["request_id"] == resp.headers["x-request-id"]
    assert problem["instance"].startswith(resp.request.url.path)
    assert problem["error"]["code"] == code and problem["error"]["message"]
    assert SECRET not in resp.text and "Traceback" not in resp.text
    return problem


# --- the happy paths --------------------------------------------------------------


async def test_non_streaming_completion(gw: Gateway):
    async with gw.authed() as http:
        resp = await http.post(
            CHAT, json=chat_body(temperature=0.7, max_tokens=16, reasoning_effort="low")
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"]["total_tokens"] == 15
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", resp.headers["traceparent"])
    assert resp.headers["x-request-id"].startswith("req_")
    assert resp.headers["x-sluice-cache"] == "bypass"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "99000"
    assert resp.headers["ratelimit-policy"] == '"tpm";q=100000;w=60, "rpm";q=600;w=60'
    s = body["sluice"]
    assert s["request_id"] == resp.headers["x-request-id"]
    assert s["trace_id"] == resp.headers["traceparent"].split("-")[1]
    assert (s["model_served"], s["provider"], s["cache"]) == ("sim-fast", "simulator", "bypass")
    assert s["cost_usd"] == 0.00042
    # What the gateway asked of the others.
    reserve = gw.fake.reserves[-1]
    assert reserve.key_id == gw.record.key_id and reserve.team_id == gw.record.team_id
    assert reserve.max_output_tokens == 16 and reserve.input_tokens > 5
    assert (reserve.tokens_per_minute, reserve.requests_per_minute) == (5000, 60)
    work = gw.fake.work[-1]
    assert work.request_id == s["request_id"]
    assert work.priority == chat_pb2.PRIORITY_INTERACTIVE
    assert work.reservation_id == "p0.res-1"
    assert work.request.extra_json == '{"reasoning_effort":"low"}'
    assert work.deadline_unix_nanos > work.enqueued_unix_nanos
    assert work.cache_key == ""  # temperature 0.7: not cacheable
    headers = gw.fake.work_headers[-1]
    assert headers["Nats-Msg-Id"] == work.request_id
    assert headers["traceparent"].split("-")[1] == s["trace_id"]
    assert not gw.fake.lookups


async def test_client_traceparent_is_continued(gw: Gateway):
    trace_id = secrets.token_hex(16)
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json=chat_body(),
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
    assert resp.status_code == 200
    assert resp.headers["traceparent"].split("-")[1] == trace_id
    assert resp.json()["sluice"]["trace_id"] == trace_id
    assert gw.fake.reserve_headers[-1]["traceparent"].split("-")[1] == trace_id


async def test_openai_sdk_parses_non_stream_and_stream(gw: Gateway):
    async def stream_scenario(work, fake):
        for seq, text in enumerate(["Hel", "lo", " world"], start=1):
            await fake.emit(
                work,
                inference_pb2.StreamEvent(sequence=seq, delta=inference_pb2.Delta(content=text)),
            )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(sequence=4, delta=inference_pb2.Delta(finish_reason="stop")),
        )
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=5, final=answer("Hello world", choices=[]))
        )

    client = gw.sdk()
    completion = await client.chat.completions.create(
        model="sim-fast", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert completion.choices[0].message.content == "Hello there"
    assert completion.usage is not None and completion.usage.prompt_tokens == 12
    assert (completion.model_extra or {})["sluice"]["provider"] == "simulator"

    gw.fake.scenario = stream_scenario
    stream = await client.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 3
    assert (last.model_extra or {})["sluice"]["model_served"] == "sim-fast"
    assert gw.fake.work[-1].request.stream and gw.fake.work[-1].request.include_usage


async def test_raw_sse_ids_headers_duplicates_and_done(gw: Gateway):
    async def scenario(work, fake):
        for seq, text in [(1, "a"), (2, "b"), (2, "b"), (1, "a"), (3, "c")]:
            await fake.emit(
                work,
                inference_pb2.StreamEvent(sequence=seq, delta=inference_pb2.Delta(content=text)),
            )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=4, final=answer("abc")))

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body(stream=True, temperature=1))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["x-request-id"] and resp.headers["traceparent"]
    events = [e for e in resp.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    rid = resp.headers["x-request-id"]
    ids = [line[4:] for e in events for line in e.splitlines() if line.startswith("id: ")]
    assert ids[:3] == [f"{rid}:1", f"{rid}:2", f"{rid}:3"]
    chunks = [
        json.loads(line[6:])
        for e in events[:-1]
        for line in e.splitlines()
        if line.startswith("data: ")
    ]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "abc"
    assert "sluice" in chunks[-1] and all("sluice" not in c for c in chunks[:-1])
    assert chunks[-1]["sluice"]["latency_ms"]["ttft"] > 0


async def test_stream_failure_mid_way_ends_with_error_event(gw: Gateway):
    async def scenario(work, fake):
        await fake.emit(
            work, inference_pb2.StreamEvent(sequence=1, delta=inference_pb2.Delta(content="par"))
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=2,
                failure=inference_pb2.Failure(
                    problem=chat_pb2.Problem(
                        code="upstream_stream_interrupted",
                        message="provider hung up",
                        http_status=502,
                    ),
                    partial_usage=chat_pb2.Usage(input_tokens=12, output_tokens=1),
                ),
            ),
        )

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body(stream=True))
    assert resp.status_code == 200
    events = [e for e in resp.text.split("\n\n") if e.strip()]
    assert "data: [DONE]" not in resp.text
    last = events[-1].splitlines()
    assert "event: error" in last
    problem = json.loads(next(line[6:] for line in last if line.startswith("data: ")))
    assert problem["code"] == "upstream_stream_interrupted" and problem["status"] == 502
    assert problem["details"]["partial_usage"]["output_tokens"] == 1
    assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"])


async def test_failure_before_any_token_is_a_real_http_error(gw: Gateway):
    async def scenario(work, fake):
        problem = chat_pb2.Problem(
            code="upstream_unavailable",
            message="No provider answered.",
            http_status=503,
            retry_after_ms=2000,
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(sequence=1, failure=inference_pb2.Failure(problem=problem)),
        )

    gw.fake.scenario = scenario
    async with gw.authed() as http:
        for stream in (False, True):
            resp = await http.post(CHAT, json=chat_body(stream=stream))
            assert_problem(resp, 503, "upstream_unavailable")
            assert resp.headers["retry-after"] == "2"
            assert resp.headers["x-ratelimit-limit-requests"] == "600"


async def test_silent_worker_times_out_with_504(bus, tmp_path):
    gw = await build_gateway(bus, tmp_path, request_timeout_seconds=0.4)

    async def silent(work, fake):
        return None

    gw.fake.scenario = silent
    try:
        async with gw.authed() as http:
            problem = assert_problem(await http.post(CHAT, json=chat_body()), 504, "model_timeout")
            # How long it ran and what the deadline was (the request timeout here).
            assert problem["details"]["deadline_ms"] == 400
            assert problem["details"]["elapsed_ms"] >= 400
            resp = await http.post(CHAT, json=chat_body(stream=True))
            assert_problem(resp, 504, "model_timeout")
    finally:
        await gw.close()


async def test_tool_call_stream(gw: Gateway):
    async def scenario(work, fake):
        call = chat_pb2.ToolCall(
            index=0, id="call_9", type="function", name="get_weather", arguments=""
        )
        await fake.emit(
            work,
            inference_pb2.StreamEvent(sequence=1, delta=inference_pb2.Delta(tool_calls=[call])),
        )
        more = chat_pb2.ToolCall(index=0, arguments='{"city":"Oslo"}')
        await fake.emit(
            work,
            inference_pb2.StreamEvent(
                sequence=2, delta=inference_pb2.Delta(tool_calls=[more], finish_reason="tool_calls")
            ),
        )
        await fake.emit(work, inference_pb2.StreamEvent(sequence=3, final=answer(choices=[])))

    gw.fake.scenario = scenario
    stream = await gw.sdk().chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": {"type": "object"}},
            }
        ],
        stream=True,
    )
    chunks = [c async for c in stream]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_9"
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == '{"city":"Oslo"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert gw.fake.work[-1].request.tools[0].name == "get_weather"


# --- cache ----------------------------------------------------------------------------


async def test_cache_hit_answers_without_work_and_bills_zero(gw: Gateway):
    gw.fake.cache_answer = answer("From the cache")
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body(temperature=0))
        stream = await http.post(
            CHAT, json=chat_body(temperature=0, stream=True, stream_options={"include_usage": True})
        )
    assert resp.status_code == 200
    assert resp.headers["x-sluice-cache"] == "hit"
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "From the cache"
    assert body["sluice"]["cache"] == "hit" and body["sluice"]["cost_usd"] == 0
    assert not gw.fake.work
    lookup = gw.fake.lookups[0]
    assert len(lookup.cache_key) == 64 and lookup.request_id == body["sluice"]["request_id"]

    assert stream.headers["x-sluice-cache"] == "hit"
    assert "From the cache" in stream.text and stream.text.endswith("data: [DONE]\n\n")

    events = await gw.fake.usage_events(gw.record.key_id)
    hit = next(e for e in events if e.request_id == body["sluice"]["request_id"])
    assert hit.cache_hit and hit.outcome == "completed" and hit.reservation_id == "p0.res-1"
    assert hit.usage.output_tokens == 3 and hit.team_id == gw.record.team_id


async def test_cache_miss_passes_the_store_key_and_no_store_is_honoured(gw: Gateway):
    async with gw.authed() as http:
        miss = await http.post(CHAT, json=chat_body(seed=5))
        no_store = await http.post(
            CHAT, json=chat_body(seed=5), headers={"cache-control": "no-store"}
        )
        no_cache = await http.post(
            CHAT, json=chat_body(seed=5), headers={"cache-control": "no-cache"}
        )
    assert miss.headers["x-sluice-cache"] == "miss" and miss.json()["sluice"]["cache"] == "miss"
    first, second, third = gw.fake.work
    assert len(first.cache_key) == 64 and first.cache_ttl_seconds > 0
    assert second.cache_key == "" and no_store.headers["x-sluice-cache"] == "miss"
    assert third.cache_key == first.cache_key and no_cache.headers["x-sluice-cache"] == "bypass"
    assert len(gw.fake.lookups) == 2


async def test_silent_cache_is_bypassed_and_says_why(gw: Gateway):
    gw.fake.cache_online = False
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body(temperature=0))
    assert resp.status_code == 200
    assert resp.headers["x-sluice-cache"] == "bypass"
    assert resp.headers["x-sluice-cache-reason"] == "unavailable"
    assert resp.json()["sluice"]["cache"] == "bypass"
    assert gw.fake.work


# --- limiter ----------------------------------------------------------------------------


async def test_rate_limited_gets_429_with_headers_and_no_work(gw: Gateway):
    gw.fake.reserve = limiter_pb2.ReserveResponse(
        allowed=False,
        denied_by="tpm",
        retry_after_ms=2500,
        policies=[
            limiter_pb2.PolicyState(
                name="tpm", quota=1000, remaining=0, window_seconds=60, reset_ms=2500
            ),
            POLICIES[1],
        ],
    )
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
    problem = assert_problem(resp, 429, "rate_limited")
    assert problem["error"]["type"] == "rate_limit_error"
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["ratelimit"] == '"tpm";r=0;t=3'
    assert resp.headers["ratelimit-policy"].startswith('"tpm";q=1000;w=60')
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert resp.headers["x-ratelimit-reset-tokens"] == "2.5s"
    assert not gw.fake.work
    with pytest.raises(openai.RateLimitError):
        await gw.sdk().chat.completions.create(
            model="sim-fast", messages=[{"role": "user", "content": "x"}]
        )


async def test_a_refusal_by_a_team_limit_names_it_in_the_problem_and_headers(gw: Gateway):
    team = limiter_pb2.PolicyState(
        name="team.output_tokens_per_minute",
        quota=500,
        remaining=20,
        window_seconds=60,
        reset_ms=4000,
        unit="output_tokens",
    )
    gw.fake.reserve = limiter_pb2.ReserveResponse(
        allowed=False,
        denied_by=team.name,
        retry_after_ms=4000,
        policies=[*POLICIES, team],
    )
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
    problem = assert_problem(resp, 429, "rate_limited")
    assert problem["details"] == {
        "policy": "team.output_tokens_per_minute",
        "retry_after_ms": 4000,
        "limit": 500,
        "unit": "output_tokens",
    }
    assert "team.output_tokens_per_minute" in problem["detail"]
    assert resp.headers["retry-after"] == "4"
    assert resp.headers["ratelimit"] == '"team.output_tokens_per_minute";r=20;t=4'
    assert '"team.output_tokens_per_minute";q=500;w=60' in resp.headers["ratelimit-policy"]
    # The tightest token policy is the team's output tokens: OpenAI's token headers show it.
    assert resp.headers["x-ratelimit-limit-tokens"] == "500"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "20"
    assert not gw.fake.work


async def test_a_spent_budget_is_budget_exceeded_not_rate_limited(gw: Gateway):
    day = limiter_pb2.PolicyState(
        name="key.usd_per_day",
        quota=1_000_000_000,
        remaining=0,
        window_seconds=86_400,
        reset_ms=3_600_000,
        unit="usd_nanos",
    )
    gw.fake.reserve = limiter_pb2.ReserveResponse(
        allowed=False,
        denied_by=day.name,
        retry_after_ms=3_600_000,
        budget_exceeded=True,
        policies=[*POLICIES, day],
    )
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
    problem = assert_problem(resp, 429, "budget_exceeded")
    assert problem["details"]["policy"] == "key.usd_per_day"
    assert problem["details"]["unit"] == "usd_nanos"
    assert resp.headers["retry-after"] == "3600"
    # A budget is money, not a rate: not a RateLimit policy; past 80 % it is a warning.
    assert "usd_per_day" not in resp.headers["ratelimit-policy"]
    assert resp.headers["x-sluice-budget-warning"] == "key.usd_per_day=1.00"
    assert not gw.fake.work


async def test_an_admitted_request_warns_when_a_budget_is_past_80_percent(gw: Gateway):
    def month(remaining: int) -> limiter_pb2.PolicyState:
        return limiter_pb2.PolicyState(
            name="team.usd_per_month",
            quota=100_000,
            remaining=remaining,
            window_seconds=30 * 86_400,
            reset_ms=1,
            unit="usd_nanos",
        )

    gw.fake.reserve = limiter_pb2.ReserveResponse(
        allowed=True, reservation_id="r-1", policies=[*POLICIES, month(25_000)]
    )
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
        assert resp.status_code == 200
        assert "x-sluice-budget-warning" not in resp.headers
        gw.fake.reserve = limiter_pb2.ReserveResponse(
            allowed=True, reservation_id="r-2", policies=[*POLICIES, month(15_000)]
        )
        resp = await http.post(CHAT, json=chat_body())
    assert resp.status_code == 200
    assert resp.headers["x-sluice-budget-warning"] == "team.usd_per_month=0.85"


async def test_silent_limiter_fails_closed_with_503(gw: Gateway):
    # A key outside any tiered team fails closed (the default).
    gw.fake.limiter_online = False
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
    assert_problem(resp, 503, "limiter_unavailable")
    assert resp.headers["retry-after"] == "1"
    assert not gw.fake.work
    # The partition was asked again for the whole wait; the next request asks it once.
    waited = gw.fake.reserve_attempts
    assert waited > 1
    async with gw.authed() as http:
        assert_problem(await http.post(CHAT, json=chat_body()), 503, "limiter_unavailable")
        assert gw.fake.reserve_attempts == waited + 1
        gw.fake.limiter_online = True
        assert (await http.post(CHAT, json=chat_body())).status_code == 200


# --- bad input --------------------------------------------------------------------------


BAD = [
    ("malformed json", b'{"model": "sim-fast", "messages": [', 400, "invalid_json"),
    (
        "wrong types",
        json.dumps({"model": "sim-fast", "messages": "hi " + SECRET}).encode(),
        400,
        "invalid_request",
    ),
    ("missing messages", b'{"model": "sim-fast"}', 400, "invalid_request"),
    (
        "bad role",
        json.dumps(chat_body(messages=[{"role": "wizard", "content": SECRET}])).encode(),
        400,
        "invalid_request",
    ),
    ("not an object", b'"just a string"', 400, "invalid_request"),
    ("unknown model", json.dumps(chat_body(model="nope")).encode(), 404, "model_not_found"),
    (
        "max_tokens over the model limit",
        json.dumps(chat_body(max_tokens=10**6)).encode(),
        400,
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(("case", "raw", "status", "code"), BAD, ids=[c[0] for c in BAD])
async def test_bad_input_gets_the_problem_envelope(gw: Gateway, case, raw, status, code):
    async with gw.authed() as http:
        resp = await http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert_problem(resp, status, code)
    assert not gw.fake.reserves


async def test_wrong_types_list_the_field_locations(gw: Gateway):
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={
                "model": "sim-fast",
                "messages": [{"role": "user"}],
                "temperature": "hot",
                "n": 0,
            },
        )
    problem = assert_problem(resp, 400, "invalid_request")
    locs = {e["loc"] for e in problem["details"]["errors"]}
    assert {"temperature", "n"} <= locs


async def test_prompt_over_the_context_window(gw: Gateway):
    long = "word " * 40000  # about 40k tokens, over sim-fast's 32k window
    async with gw.authed() as http:
        resp = await http.post(
            CHAT, json={"model": "sim-fast", "messages": [{"role": "user", "content": long}]}
        )
    problem = assert_problem(resp, 400, "context_length_exceeded")
    assert problem["details"]["context_window"] == 32768
    assert "word word" not in resp.text


@pytest.mark.parametrize(
    ("headers", "detail_hint"),
    [
        ({}, "No API key"),
        ({"authorization": "Bearer sk-wrong"}, "not valid"),
        ({"authorization": "Basic abc"}, "Bearer"),
        ({"x-api-key": "sk-wrong"}, "not valid"),
    ],
)
async def test_missing_or_wrong_key_is_401(gw: Gateway, headers, detail_hint):
    async with gw.http(**headers) as http:
        resp = await http.post(CHAT, json=chat_body())
    problem = assert_problem(resp, 401, "unauthorized")
    assert detail_hint in problem["detail"]
    assert problem["error"]["type"] == "authentication_error"


async def test_a_key_that_cuts_gives_the_worker_the_spend_ceiling(gw: Gateway, bus):
    ceiling = limiter_pb2.ReserveResponse(
        allowed=True,
        reservation_id="p0.r-9",
        policies=POLICIES,
        spend_ceiling_usd_nanos=123_456,
    )
    gw.fake.reserve = ceiling
    async with gw.authed() as http:
        assert (await http.post(CHAT, json=chat_body())).status_code == 200
    # finish (the default): the request runs to its end whatever the ceiling.
    assert gw.fake.work[-1].spend_ceiling_usd_nanos == 0
    from services.gateway.domain.keys import hash_secret

    secret = "sk-cut-" + secrets.token_hex(4)
    record = keys_pb2.ApiKeyRecord()
    record.CopyFrom(gw.record)
    record.key_id, record.secret_sha256 = "cut" + secrets.token_hex(3), hash_secret(secret)
    record.on_budget_exhausted = "cut"
    await (await bus.kv(Buckets.API_KEYS)).put(record.secret_sha256, record.SerializeToString())
    async with gw.http(authorization=f"Bearer {secret}") as http:
        assert (await http.post(CHAT, json=chat_body())).status_code == 200
    assert gw.fake.work[-1].spend_ceiling_usd_nanos == 123_456


async def test_x_api_key_and_disabled_keys(gw: Gateway, bus):
    async with gw.http(**{"x-api-key": gw.secret}) as http:
        assert (await http.post(CHAT, json=chat_body())).status_code == 200
    kv = await bus.kv(Buckets.API_KEYS)
    secret = "sk-disabled-" + secrets.token_hex(4)
    from services.gateway.domain.keys import hash_secret

    await kv.put(
        hash_secret(secret),
        keys_pb2.ApiKeyRecord(
            key_id="d", secret_sha256=hash_secret(secret), disabled=True
        ).SerializeToString(),
    )
    async with gw.http(authorization=f"Bearer {secret}") as http:
        assert_problem(await http.post(CHAT, json=chat_body()), 401, "unauthorized")


async def test_body_over_the_limit_is_413(bus, tmp_path):
    gw = await build_gateway(bus, tmp_path, max_body_bytes=1024)
    try:
        async with gw.authed() as http:
            resp = await http.post(
                CHAT, json=chat_body(messages=[{"role": "user", "content": SECRET + "a" * 4096}])
            )
        assert_problem(resp, 413, "payload_too_large")
    finally:
        await gw.close()


async def test_wrong_content_type_is_415(gw: Gateway):
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            content=b"model=sim-fast",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert_problem(resp, 415, "unsupported_media_type")


async def test_unknown_route_and_wrong_method(gw: Gateway):
    async with gw.authed() as http:
        missing = await http.get("/v1/nothing-here")
        wrong = await http.get(CHAT)
    assert_problem(missing, 404, "not_found")
    assert_problem(wrong, 405, "method_not_allowed")
    assert "POST" in wrong.headers["allow"]


async def test_openai_sdk_sees_errors(gw: Gateway):
    with pytest.raises(openai.NotFoundError) as info:
        await gw.sdk().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.code == "model_not_found"
    bad = gw.sdk()
    bad.api_key = "sk-wrong"
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()


async def test_unexpected_exception_is_a_500_envelope(gw: Gateway, monkeypatch):
    async def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(gw.deps.chat, "complete", boom)
    async with gw.authed() as http:
        resp = await http.post(CHAT, json=chat_body())
    assert_problem(resp, 500, "internal_error")
    assert "secret internals" not in resp.text


# --- other routes -----------------------------------------------------------------------


async def test_models_health_readiness_metrics_docs(gw: Gateway, bus):
    models = await gw.sdk().models.list()
    assert {"sim-fast", "qwen2.5-coder-0.5b"} <= {m.id for m in models.data}
    async with gw.http() as http:
        assert_problem(await http.get("/v1/models"), 401, "unauthorized")
        health = await http.get("/healthz")
        assert health.status_code == 200 and "traceparent" not in health.headers
        # Nobody answers the health subjects here: not ready, and says who is missing.
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["details"]["services"]["limiter"] is False
        await http.post(CHAT, json=chat_body())
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "sluice_requests" in metrics.text and "sluice_errors" in metrics.text
        docs = await http.get("/docs/openapi.json")
        assert docs.status_code == 200
        ops = {op["operationId"] for path in docs.json()["paths"].values() for op in path.values()}
        assert {"createChatCompletion", "listModels", "getHealth", "getReadiness"} <= ops
        # The events' document, as committed (a test elsewhere keeps that file current).
        asyncapi = await http.get("/docs/asyncapi")
        assert asyncapi.status_code == 200
        document = asyncapi.json()
        assert document == json.loads((REPO / "docs" / "asyncapi.json").read_text())
        assert {c["address"] for c in document["channels"].values()} >= {
            "sluice.v1.cost.recorded.{key_id}",
            "sluice.v1.usage.{key_id}",
        }


async def test_readiness_when_every_service_answers(gw: Gateway, bus):
    from sluice.topology import ALL_SERVICES, Subjects

    subs = []
    for name in ALL_SERVICES:
        status = chat_pb2.ServiceStatus(service=str(name), ready=True).SerializeToString()

        async def answer_health(msg, status=status):
            await msg.respond(status)

        subs.append(await bus.nc.subscribe(Subjects.health(name), cb=answer_health))
    try:
        async with gw.http() as http:
            resp = await http.get("/readyz")
        assert resp.status_code == 200, resp.text
        assert all(resp.json()["services"].values())
    finally:
        for sub in subs:
            await sub.unsubscribe()
