"""``/mcp`` through every real process, with the official SDK's own client over
Streamable HTTP, on both protocol revisions the gateway speaks: 2025-11-25 (the
``initialize`` handshake) and 2026-07-28 (``server/discover`` and per-request envelopes).
Tools answer from the real data path (the simulated provider behind the worker); keys,
scopes and tenancy are the HTTP API's."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import jsonschema
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import PROTOCOL_VERSION_META_KEY, CallToolResult
from sluice.telemetry import spans_dir

from tests.mcp.conftest import McpStack
from tests.support.full_stack import DEV_KEY, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEGACY = "2025-11-25"
MODERN = "2026-07-28"
# How the SDK's client is made to ask for each revision: the handshake offers its newest
# handshake revision (2025-11-25); "auto" probes server/discover at 2026-07-28.
MODES = {LEGACY: "legacy", MODERN: "auto"}
TOOLS = {
    "chat",
    "submit_job",
    "get_job",
    "cancel_job",
    "estimate_cost",
    "my_usage",
    "list_models",
}
TERMINAL = {"completed", "failed", "cancelled"}
CHAT = {
    "model": "sim-fast",
    "messages": [{"role": "user", "content": "Say hello to the agent."}],
    "max_tokens": 8,
}


class Session:
    def __init__(
        self, client: Client, versions: list[str | None], requests: list[dict[str, Any]]
    ) -> None:
        self.client = client
        # MCP-Protocol-Version of every request the client sent, and its JSON-RPC body.
        self.versions = versions
        self.requests = requests

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result = await self.client.call_tool(name, arguments or {})
        assert not result.is_error, result.content
        assert isinstance(result.structured_content, dict)
        # The text block carries the same JSON for clients that read only text.
        assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
        return result.structured_content

    async def fail(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result: CallToolResult = await self.client.call_tool(name, arguments)
        assert result.is_error, result
        problem: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
        assert re.fullmatch(r"[0-9a-f]{32}", problem["trace_id"]), problem
        assert problem["instance"].startswith("/mcp#req_")
        return problem


@asynccontextmanager
async def session(stack: McpStack, revision: str, key: str = DEV_KEY) -> AsyncIterator[Session]:
    versions: list[str | None] = []
    requests: list[dict[str, Any]] = []

    async def record(request: httpx2.Request) -> None:
        if request.method == "POST":
            versions.append(request.headers.get("mcp-protocol-version"))
            requests.append(json.loads(request.content))

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx2.Timeout(30, read=60),
        event_hooks={"request": [record]},
    )
    transport = streamable_http_client(stack.url, http_client=http)
    async with http, Client(transport, mode=MODES[revision]) as client:
        yield Session(client, versions, requests)


@pytest.fixture(params=[LEGACY, MODERN])
def revision(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_round_trip_on_each_protocol_revision(mcp_stack: McpStack, revision: str) -> None:
    async with session(mcp_stack, revision) as s:
        client = s.client
        # The revision asked for is the one negotiated.
        assert client.protocol_version == revision
        if revision == LEGACY:
            init = client.session.initialize_result
            assert init is not None and init.protocol_version == LEGACY
            assert init.server_info.name == "sluice"
            assert init.capabilities.tools is not None
        else:
            found = client.session.discover_result
            assert found is not None
            assert MODERN in found.supported_versions

        listed = await client.list_tools()
        tools = {t.name: t for t in listed.tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description
            assert tool.input_schema["type"] == "object"
            assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert set(tools["chat"].input_schema["required"]) == {"model", "messages"}
        assert tools["get_job"].annotations is not None
        assert tools["get_job"].annotations.read_only_hint is True

        models = await s.call("list_models")
        assert "sim-fast" in {m["id"] for m in models["models"]}

        answer = await s.call("chat", CHAT)
        # The client checked the result against the output schema; so does the test.
        jsonschema.validate(answer, tools["chat"].output_schema)
        assert answer["text"].strip()
        assert answer["model"] == "sim-fast"
        assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
        sluice = answer["sluice"]
        assert sluice["request_id"].startswith("req_") and sluice["provider"]
        assert re.fullmatch(r"[0-9a-f]{32}", sluice["trace_id"])
        assert answer["cost_usd"] == sluice["cost_usd"]

        estimate = await s.call("estimate_cost", CHAT)
        jsonschema.validate(estimate, tools["estimate_cost"].output_schema)
        assert estimate["input_tokens"] == answer["usage"]["prompt_tokens"]
        assert estimate["output_tokens"]["max"] == 8

        job = await s.call("submit_job", {**CHAT, "metadata": {"via": "mcp"}})
        jsonschema.validate(job, tools["submit_job"].output_schema)
        assert job["id"].startswith("job_") and job["status"] in ("queued", "in_progress")
        assert job["metadata"] == {"via": "mcp"}

        async def done() -> dict[str, Any] | None:
            polled = await s.call("get_job", {"job_id": job["id"]})
            return polled if polled["status"] in TERMINAL else None

        finished = await wait_for(done, timeout=30, interval=0.2, what="the job to end")
        jsonschema.validate(finished, tools["get_job"].output_schema)
        assert finished["status"] == "completed", finished
        assert finished["result"]["choices"][0]["message"]["content"]
        assert finished["usage"]["completion_tokens"] > 0

        usage = await s.call("my_usage", {"group_by": ["model"]})
        jsonschema.validate(usage, tools["my_usage"].output_schema)
        assert usage["team_id"] and usage["group_by"] == ["model"]

    # After the handshake (legacy) or from the first request on (modern), every request
    # named the negotiated revision.
    if revision == LEGACY:
        # The handshake asked for 2025-11-25 (and the server agreed, above).
        assert s.requests[0]["method"] == "initialize"
        assert s.requests[0]["params"]["protocolVersion"] == LEGACY
        assert s.versions[0] is None
        assert set(s.versions[1:]) == {LEGACY}
    else:
        # Every request, the discover probe first, asked for 2026-07-28 in its envelope.
        assert s.requests[0]["method"] == "server/discover"
        asked = {
            r.get("params", {}).get("_meta", {}).get(PROTOCOL_VERSION_META_KEY) for r in s.requests
        }
        assert asked == {MODERN}
        assert set(s.versions) == {MODERN}


async def test_tool_errors_are_problems_with_a_code_and_a_trace_id(
    mcp_stack: McpStack, revision: str
) -> None:
    async with session(mcp_stack, revision) as s:
        bad = await s.fail("chat", {"model": "sim-fast", "messages": []})
        assert bad["code"] == "invalid_request" and "messages" in bad["detail"]
        unknown = await s.fail("chat", {**CHAT, "model": "no-such-model"})
        assert unknown["code"] == "model_not_found" and unknown["error"]["param"] == "model"
        missing = await s.fail("get_job", {"job_id": "job_does_not_exist"})
        assert missing["code"] == "not_found"
        text = json.dumps([bad, unknown, missing])
        assert "Traceback" not in text and DEV_KEY not in text


async def test_a_wrong_key_or_none_is_refused_before_mcp(mcp_stack: McpStack) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY,
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    }
    headers = {"accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=10) as http:
        for extra in ({}, {"authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}):
            r = await http.post(mcp_stack.url, json=init, headers={**headers, **extra})
            assert r.status_code == 401, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            body = r.json()
            assert body["code"] == "unauthorized"
            assert re.fullmatch(r"[0-9a-f]{32}", body["trace_id"])
            assert r.headers["x-request-id"] == body["instance"].split("#", 1)[1]
        # Stateless: no GET stream and no session to DELETE, as the transport allows.
        for method in ("GET", "DELETE"):
            r = await http.request(
                method, mcp_stack.url, headers={**headers, "authorization": f"Bearer {DEV_KEY}"}
            )
            assert r.status_code == 405, r.text
            assert r.json()["code"] == "method_not_allowed" and r.headers["allow"] == "POST"
        # A body over the gateway's limit is its 413, before the SDK reads anything.
        r = await http.post(
            mcp_stack.url,
            content=b"x" * (10 * 1024 * 1024 + 1),
            headers={**headers, "authorization": f"Bearer {DEV_KEY}"},
        )
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "payload_too_large"
        # x-api-key works as Authorization does.
        r = await http.post(mcp_stack.url, json=init, headers={**headers, "x-api-key": DEV_KEY})
        assert r.status_code == 200, r.text
        assert r.json()["result"]["protocolVersion"] == LEGACY

    # The SDK's client gets no session with a wrong key, on either revision.
    for revision in (LEGACY, MODERN):
        with pytest.raises(BaseExceptionGroup) as caught:
            async with session(mcp_stack, revision, key="sk-wrong") as s:
                await s.client.list_tools()
        # The transport's task group reports the refused request as the SDK's error.
        assert caught.value.subgroup(MCPError) is not None, caught.value


async def test_a_retried_submission_with_its_idempotency_key_is_one_job(
    mcp_stack: McpStack, revision: str
) -> None:
    key = f"agent-retry-{secrets.token_hex(4)}"
    async with session(mcp_stack, revision) as s:
        first = await s.call("submit_job", {**CHAT, "idempotency_key": key})
        again = await s.call("submit_job", {**CHAT, "idempotency_key": key})
        assert again["id"] == first["id"]
        other = await s.call("submit_job", CHAT)
        assert other["id"] != first["id"]
        # The same key for other arguments is the HTTP API's 422, as a tool error.
        reused = await s.fail("submit_job", {**CHAT, "max_tokens": 9, "idempotency_key": key})
        assert reused["code"] == "idempotency_key_reused"


async def test_a_key_without_the_jobs_scope_cannot_submit_jobs(mcp_stack: McpStack) -> None:
    key = await mcp_stack.new_key(["chat"])
    async with session(mcp_stack, MODERN, key=key["secret"]) as s:
        assert (await s.call("chat", CHAT))["text"]
        refused = await s.fail("submit_job", CHAT)
        assert refused["code"] == "insufficient_scope"
        assert refused["details"]["scope"] == "jobs"


async def test_one_tenant_never_gets_another_tenants_job(
    mcp_stack: McpStack, revision: str
) -> None:
    one = await mcp_stack.new_key(["chat", "jobs"])
    two = await mcp_stack.new_key(["chat", "jobs"])
    async with session(mcp_stack, revision, key=one["secret"]) as a:
        job = await a.call("submit_job", CHAT)
        assert (await a.call("get_job", {"job_id": job["id"]}))["id"] == job["id"]
    async with session(mcp_stack, revision, key=two["secret"]) as b:
        # Another team's job is as missing as one that never was.
        seen = await b.fail("get_job", {"job_id": job["id"]})
        assert seen["code"] == "not_found"
        cancelled = await b.fail("cancel_job", {"job_id": job["id"]})
        assert cancelled["code"] == "not_found"
        assert job["id"] in seen["detail"] and one["team_id"] not in json.dumps(seen)
        # Its usage is its own team's.
        assert (await b.call("my_usage"))["team_id"] == two["team_id"]

    # Each call is in the team's audit trail as the request it was, the refused ones too.
    async def trail() -> list[dict[str, Any]] | None:
        async with mcp_stack.stack.client(mcp_stack.admin_key) as admin:
            r = await admin.get(
                "/v1/admin/audit/", params={"team_id": two["team_id"], "action": "request"}
            )
        records: list[dict[str, Any]] = r.json()["data"]
        return records if len(records) >= 3 else None

    records = await wait_for(trail, timeout=10, what="the audit records")
    assert {r["route"] for r in records} == {"/mcp"}
    assert {r["actor"] for r in records} == {two["key_id"]}
    # A tool error is recorded with its code (the HTTP status of the call is 200).
    assert "not_found" in {r.get("code") for r in records}, records


def load_spans(stack: McpStack, trace_id: str) -> list[dict[str, Any]]:
    return [
        span
        for path in spans_dir(stack.stack.stack.state_dir).glob("*.jsonl")
        for line in path.read_text(encoding="utf-8").splitlines()
        if trace_id in line and (span := json.loads(line))["trace_id"] == trace_id
    ]


async def call_trace(stack: McpStack, trace_id: str) -> list[dict[str, Any]]:
    """The spans of ``trace_id`` once the gateway, worker and cost-tracker wrote theirs;
    checks that the work is one tree under the SDK's span of the call."""

    async def spans() -> list[dict[str, Any]] | None:
        found = load_spans(stack, trace_id)
        services = {span["service"] for span in found}
        return found if {"gateway", "inference-worker", "cost-tracker"} <= services else None

    found: list[dict[str, Any]] = await wait_for(
        spans, timeout=15, interval=0.25, what="the call's spans"
    )
    by_id = {span["span_id"]: span for span in found}
    (call,) = [x for x in found if x["name"] == "tools/call chat"]
    (publish,) = [x for x in found if x["name"] == "sluice.v1.infer.interactive publish"]
    assert publish["parent_span_id"] == call["span_id"]
    (provider,) = [x for x in found if x["name"] == "chat sim-fast"]
    chain = [provider]
    while chain[-1]["parent_span_id"] in by_id:
        chain.append(by_id[chain[-1]["parent_span_id"]])
    assert call in chain and publish in chain
    return found


def prompt() -> dict[str, Any]:
    # A prompt of its own: never a cache hit, so the worker runs it.
    text = f"Say hello to trace {secrets.token_hex(4)}."
    return {**CHAT, "messages": [{"role": "user", "content": text}]}


async def test_a_tool_call_through_the_sdk_is_one_trace(mcp_stack: McpStack, revision: str) -> None:
    async with session(mcp_stack, revision) as s:
        args = prompt()
        answer = await s.call("chat", args)
    # The trace the caller is told is the one the work is in, whether the SDK's client
    # traced the call itself (then its span is the call's parent) or not.
    found = await call_trace(mcp_stack, answer["sluice"]["trace_id"])
    assert args["messages"][0]["content"] not in json.dumps([x["attributes"] for x in found])


async def test_the_call_joins_the_trace_its_meta_names_and_links_the_request(
    mcp_stack: McpStack,
) -> None:
    """Raw JSON-RPC on 2025-11-25 (stateless: no handshake needed), so that the test alone
    decides whether the call carries trace context in ``_meta``."""
    headers = {
        "authorization": f"Bearer {DEV_KEY}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": LEGACY,
    }

    async def tools_call(meta: dict[str, str]) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"name": "chat", "arguments": prompt()}
        if meta:
            params["_meta"] = meta
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(mcp_stack.url, json=body, headers=headers)
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        assert not result.get("isError"), result
        return r.headers["traceparent"].split("-")[1], result["structuredContent"]

    # No trace context in the call: one tree from the edge's span down.
    http_trace, answer = await tools_call({})
    assert answer["sluice"]["trace_id"] == http_trace
    found = await call_trace(mcp_stack, http_trace)
    (server,) = [x for x in found if x["name"] == "POST /mcp"]
    (call,) = [x for x in found if x["name"] == "tools/call chat"]
    assert call["parent_span_id"] == server["span_id"] and not call["links"]

    # The client's own trace in _meta: the work joins it, under the client's span, and
    # the call's span links the HTTP request's.
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    http_trace, answer = await tools_call({"traceparent": f"00-{client_trace}-{client_span}-01"})
    assert answer["sluice"]["trace_id"] == client_trace != http_trace
    found = await call_trace(mcp_stack, client_trace)
    (call,) = [x for x in found if x["name"] == "tools/call chat"]
    assert call["parent_span_id"] == client_span
    (server,) = load_spans(mcp_stack, http_trace)
    assert server["name"] == "POST /mcp"
    assert call["links"] == [{"trace_id": http_trace, "span_id": server["span_id"]}]
