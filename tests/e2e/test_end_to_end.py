"""One request through every real service process, seen the way users and SREs see it:
the official SDK, curl-like raw HTTP, the trace, the metrics and the cost feed."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.telemetry import spans_dir
from sluice.topology import ServiceName

from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET_PROMPT = "zebra-violet-prompt-marker"


def sdk(e2e: RunningStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{e2e.gateway_url}/v1", api_key=DEV_KEY, max_retries=0)


def new_traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def load_trace(state_dir: Path, trace_id: str) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in spans_dir(state_dir).glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if trace_id in line:
                span = json.loads(line)
                if span["trace_id"] == trace_id:
                    spans.append(span)
    return spans


async def wait_for_trace(
    state_dir: Path, trace_id: str, services: set[str], timeout: float = 15
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        spans = load_trace(state_dir, trace_id)
        if services <= {s["service"] for s in spans}:
            return spans
        await asyncio.sleep(0.25)
    return spans


def scrape(text: str) -> dict[str, float]:
    """Sum of every sample of each metric family (labels folded)."""
    totals: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if match:
            totals[match.group(1)] += float(match.group(3))
    return totals


async def scrape_all(e2e: RunningStack) -> dict[ServiceName, dict[str, float]]:
    out: dict[ServiceName, dict[str, float]] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for name in ServiceName:
            resp = await http.get(f"http://127.0.0.1:{e2e.port(name)}/metrics")
            assert resp.status_code == 200, name
            out[name] = scrape(resp.text)
    return out


def family(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


async def test_openai_sdk_chat_non_streaming(e2e: RunningStack) -> None:
    client = sdk(e2e)
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "Say hello in five words."}],
        max_tokens=16,
        temperature=0.7,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-request-id"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", raw.headers["traceparent"])
    extra = completion.model_extra or {}
    meta = extra["sluice"]
    assert meta["model_served"] == "sim-fast"
    assert meta["provider"] == "simulator"
    assert meta["cache"] in {"miss", "bypass"}
    assert meta["usage"]["output_tokens"] == completion.usage.completion_tokens
    assert meta["cost_usd"] > 0
    for part in ("queue", "ttft", "total"):
        assert part in meta["latency_ms"]


async def test_openai_sdk_chat_streaming_with_usage(e2e: RunningStack) -> None:
    client = sdk(e2e)
    stream = await client.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=20,
        temperature=0.5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = [], []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert "".join(text)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert (last.model_extra or {})["sluice"]["model_served"] == "sim-fast"


async def test_raw_sse_has_ids_and_done(client: httpx.AsyncClient) -> None:
    body = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": "stream please"}],
        "stream": True,
        "temperature": 0.9,
        "max_tokens": 8,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        raw = (await resp.aread()).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert events[-1].strip() == "data: [DONE]"
    ids = [line[4:] for e in events for line in e.splitlines() if line.startswith("id: ")]
    assert ids, raw
    sequences = [int(i.rsplit(":", 1)[-1]) for i in ids]
    assert sequences == sorted(sequences)


async def test_one_request_is_one_trace_across_all_services(e2e: RunningStack) -> None:
    trace_id, parent = new_traceparent()
    async with httpx.AsyncClient(timeout=30) as http:
        # The key's first request in a while asks the limiter for itself and a lease.
        warm_up = await http.post(
            f"{e2e.gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {DEV_KEY}"},
            json={"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert warm_up.status_code == 200, warm_up.text
        resp = await http.post(
            f"{e2e.gateway_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {DEV_KEY}", "traceparent": parent},
            json={
                "model": "sim-fast",
                "messages": [{"role": "user", "content": "trace me"}],
                "temperature": 0,
                "max_tokens": 8,
                "seed": secrets.randbits(31),
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["traceparent"].split("-")[1] == trace_id
    assert resp.json()["sluice"]["trace_id"] == trace_id

    all_services = {str(s) for s in ServiceName}
    spans = await wait_for_trace(e2e.state_dir, trace_id, all_services)
    by_id = {s["span_id"]: s for s in spans}
    assert all_services <= {s["service"] for s in spans}, sorted({s["service"] for s in spans})

    def edge(parent_service: str, child_service: str) -> bool:
        return any(
            s["service"] == child_service
            and s["parent_span_id"] in by_id
            and by_id[s["parent_span_id"]]["service"] == parent_service
            for s in spans
        )

    # Admission from the lease the warm-up request obtained: a span in the gateway whose
    # link leads to the trace where the limiter, called by the gateway, granted it.
    (admit,) = [s for s in spans if s["name"] == "limiter.lease admit"]
    assert not edge("gateway", "limiter")
    (link,) = admit["links"]
    grant = await wait_for_trace(e2e.state_dir, link["trace_id"], {"gateway", "limiter"})
    granted = {s["span_id"]: s for s in grant}
    assert any(
        s["service"] == "limiter"
        and s["attributes"].get("sluice.limiter.lease_tokens", 0) > 0
        and granted.get(s["parent_span_id"], {}).get("service") == "gateway"
        for s in grant
    ), grant
    assert edge("gateway", "cache")
    assert edge("gateway", "inference-worker")
    assert edge("inference-worker", "cost-tracker")
    provider_calls = [
        s
        for s in spans
        if s["service"] == "inference-worker"
        and s["kind"] == "CLIENT"
        and s["name"].startswith("chat ")
    ]
    assert provider_calls, [s["name"] for s in spans]
    attrs = provider_calls[0]["attributes"]
    assert attrs["gen_ai.request.model"] == "sim-fast"
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["gen_ai.operation.name"] == "chat"
    assert not any("trace me" in json.dumps(s["attributes"]) for s in spans)

    tree = subprocess.run(
        [
            sys.executable,
            "-m",
            "sluice.devtools.cli",
            "trace",
            trace_id,
            "--state-dir",
            str(e2e.state_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for service in all_services:
        assert service in tree


async def test_a_job_is_one_trace_from_submission_to_its_cost(e2e: RunningStack) -> None:
    """A job crosses the work queue and comes back through the lifecycle stream; its
    trace runs on across both, as a chat completion's does."""
    trace_id, parent = new_traceparent()
    async with httpx.AsyncClient(timeout=30) as http:
        submitted = await http.post(
            f"{e2e.gateway_url}/v1/jobs",
            headers={"Authorization": f"Bearer {DEV_KEY}", "traceparent": parent},
            json={
                "request": {
                    "model": "sim-fast",
                    "messages": [{"role": "user", "content": "a job to trace"}],
                    "max_tokens": 8,
                }
            },
        )
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["trace_id"] == trace_id
        deadline = time.monotonic() + 30
        while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            job = (
                await http.get(
                    f"{e2e.gateway_url}/v1/jobs/{job['id']}",
                    headers={"Authorization": f"Bearer {DEV_KEY}"},
                )
            ).json()
    assert job["status"] == "completed", job

    all_services = {str(s) for s in ServiceName} - {"cache"}
    spans = await wait_for_trace(e2e.state_dir, trace_id, all_services)
    by_id = {s["span_id"]: s for s in spans}
    assert all_services <= {s["service"] for s in spans}, sorted({s["service"] for s in spans})

    def child_of(child: dict[str, Any], parent_service: str, parent_kind: str) -> bool:
        up = by_id.get(child["parent_span_id"])
        return up is not None and up["service"] == parent_service and up["kind"] == parent_kind

    # gateway (SERVER, then PRODUCER into the work queue) -> worker (CONSUMER) -> provider.
    (server,) = [s for s in spans if s["service"] == "gateway" and s["kind"] == "SERVER"]
    assert server["parent_span_id"] not in by_id  # the client's span, outside the trace
    (queued,) = [s for s in spans if s["name"] == "sluice.v1.infer.batch publish"]
    assert child_of(queued, "gateway", "SERVER")
    (took,) = [s for s in spans if s["name"] == "sluice.v1.infer.batch process"]
    assert took["service"] == "inference-worker" and child_of(took, "gateway", "PRODUCER")
    assert any(
        s["service"] == "inference-worker"
        and s["kind"] == "CLIENT"
        and s["name"].startswith("chat ")
        for s in spans
    )
    # The worker's usage event into the cost-tracker, its lifecycle events into the
    # gateway's job tracker.
    assert any(
        s["service"] == "cost-tracker" and child_of(s, "inference-worker", "PRODUCER")
        for s in spans
    )
    tracked = [
        s
        for s in spans
        if s["service"] == "gateway" and s["kind"] == "CONSUMER" and "lifecycle" in s["name"]
    ]
    assert tracked and all(child_of(s, "inference-worker", "PRODUCER") for s in tracked), [
        (s["service"], s["kind"], s["name"]) for s in spans
    ]
    assert not any("a job to trace" in json.dumps(s["attributes"]) for s in spans)


async def test_metrics_move_after_one_streamed_request(e2e: RunningStack) -> None:
    before = await scrape_all(e2e)
    client = sdk(e2e)
    stream = await client.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "metrics"}],
        max_tokens=8,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    await asyncio.sleep(1.5)
    after = await scrape_all(e2e)

    def moved(service: ServiceName, prefix: str) -> bool:
        return family(after[service], prefix) > family(before[service], prefix)

    gw = ServiceName.GATEWAY
    assert moved(gw, "sluice_requests"), "requests by route and status"
    assert moved(gw, "sluice_errors"), "errors by code"
    assert moved(gw, "sluice_request_duration_seconds_count"), "total latency histogram"
    assert any(k.startswith("sluice_streams_open") for k in after[gw]), "open streams gauge"
    assert any(k.startswith("sluice_in_flight") for k in after[gw]), "in-flight gauge"
    worker = ServiceName.INFERENCE_WORKER
    assert moved(worker, "sluice_queue_wait_seconds_count"), "queue wait histogram"
    assert moved(worker, "gen_ai_server_time_to_first_token_seconds_count"), "ttft histogram"
    assert moved(worker, "gen_ai_client_token_usage"), "token usage histogram"
    assert any(k.startswith("sluice_jetstream_pending") for k in after[worker]), "queue depth"
    assert moved(ServiceName.COST_TRACKER, "sluice_cost"), "USD cost by model and key"


async def test_cost_event_reaches_a_grpc_watcher(e2e: RunningStack) -> None:
    async with e2e.stack.grpc_channel(ServiceName.COST_TRACKER) as channel:
        stub = cost_pb2_grpc.UsageServiceStub(channel)
        call = stub.WatchCostEvents(cost_pb2.WatchCostEventsRequest())
        await asyncio.sleep(0.3)  # the watch is registered before the request is sent
        completion = await sdk(e2e).chat.completions.create(
            model="sim-fast",
            messages=[{"role": "user", "content": "bill me"}],
            max_tokens=8,
            temperature=0.8,
        )
        request_id = (completion.model_extra or {})["sluice"]["request_id"]

        async def first_matching() -> cost_pb2.CostEvent:
            async for event in call:
                if event.request_id == request_id:
                    return event
            raise AssertionError("feed ended")

        event = await asyncio.wait_for(first_matching(), timeout=15)
        call.cancel()
    assert event.model == "sim-fast"
    assert event.usage.output_tokens == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert event.total_cost_usd == pytest.approx(
        (completion.model_extra or {})["sluice"]["cost_usd"], rel=1e-9, abs=1e-12
    )


async def test_identical_deterministic_request_is_served_from_cache(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"cache {secrets.token_hex(4)}"}],
        "temperature": 0,
        "max_tokens": 8,
    }
    first = await client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200 and first.headers["x-sluice-cache"] == "miss"
    second = None
    for _ in range(20):  # the store is asynchronous
        second = await client.post("/v1/chat/completions", json=body)
        if second.headers["x-sluice-cache"] == "hit":
            break
        await asyncio.sleep(0.1)
    assert second is not None and second.headers["x-sluice-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["sluice"]["cost_usd"] == 0


BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "malformed json",
        {"content": b'{"model": "sim-fast", "messages": [', "auth": True},
        400,
        "invalid_json",
    ),
    (
        "wrong types",
        {"json": {"model": "sim-fast", "messages": "hi " + SECRET_PROMPT}, "auth": True},
        400,
        "invalid_request",
    ),
    ("missing messages", {"json": {"model": "sim-fast"}, "auth": True}, 400, "invalid_request"),
    (
        "unknown model",
        {
            "json": {"model": "nope", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            "auth": True,
        },
        404,
        "model_not_found",
    ),
    (
        "missing key",
        {
            "json": {"model": "sim-fast", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            "auth": False,
        },
        401,
        "unauthorized",
    ),
    (
        "wrong key",
        {
            "json": {"model": "sim-fast", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            "auth": "sk-wrong",
        },
        401,
        "unauthorized",
    ),
    (
        "too large",
        {
            "content": b'{"model":"sim-fast","messages":[{"role":"user","content":"'
            + b"a" * (11 * 1024 * 1024)
            + b'"}]}',
            "auth": True,
        },
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("case", "spec", "status", "code"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
async def test_bad_input_gets_the_problem_envelope(
    e2e: RunningStack, case: str, spec: dict[str, Any], status: int, code: str
) -> None:
    headers = {"content-type": "application/json"}
    if spec["auth"] is True:
        headers["authorization"] = f"Bearer {DEV_KEY}"
    elif isinstance(spec["auth"], str):
        headers["authorization"] = f"Bearer {spec['auth']}"
    async with httpx.AsyncClient(base_url=e2e.gateway_url, timeout=60) as http:
        kwargs: dict[str, Any] = {"headers": headers}
        if "json" in spec:
            kwargs["content"] = json.dumps(spec["json"]).encode()
        else:
            kwargs["content"] = spec["content"]
        resp = await http.post("/v1/chat/completions", **kwargs)
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"])
    assert problem["detail"] and problem["title"] and problem["type"].endswith(code)
    assert problem["error"]["code"] == code and problem["error"]["message"]
    assert SECRET_PROMPT not in resp.text
    assert "Traceback" not in resp.text


async def test_unknown_route_and_wrong_method(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    wrong = await client.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == "method_not_allowed"


async def test_models_health_and_readiness(e2e: RunningStack, client: httpx.AsyncClient) -> None:
    models = await sdk(e2e).models.list()
    ids = {m.id for m in models.data}
    assert {"sim-fast", "qwen2.5-coder-0.5b"} <= ids
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert (await client.get("/docs/openapi.json")).status_code == 200
