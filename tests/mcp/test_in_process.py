"""The fast tier: the endpoint in-process over the gateway harness (the app on a test
NATS, the limiter, cache and worker scripted), the SDK's client speaking to it over an
ASGI transport. The real-process suite is test_mcp.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from services.gateway.handlers.http.application import create_app
from services.gateway.handlers.http.mcp.endpoint import McpEndpoint
from services.gateway.handlers.http.mcp.mount import LazyMcpEndpoint
from services.gateway.handlers.http.middleware import Edge
from tests.gateway.harness import BASE_URL, Gateway, build_gateway


@pytest.fixture
async def gw(bus, tmp_path) -> AsyncIterator[tuple[Gateway, McpEndpoint, Edge]]:
    gateway = await build_gateway(bus, tmp_path)
    endpoint = McpEndpoint(gateway.deps)
    await endpoint.start()
    edge = Edge(create_app(gateway.deps, endpoint), gateway.deps.instruments)
    try:
        yield gateway, endpoint, edge
    finally:
        await endpoint.stop()
        await gateway.close()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_chat_through_the_endpoint_in_process(gw, mode: str) -> None:
    gateway, _endpoint, edge = gw
    http = httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=edge),
        headers={"Authorization": f"Bearer {gateway.secret}"},
        timeout=10,
    )
    transport = streamable_http_client(f"{BASE_URL}/mcp", http_client=http)
    async with http, Client(transport, mode=mode) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        result = await client.call_tool(
            "chat", {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert not result.is_error, result.content
        answer = result.structured_content
        # The scripted worker's answer, through the real chat path.
        assert answer["text"] == "Hello there"
        assert answer["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        assert answer["cost_usd"] == pytest.approx(0.00042)
        assert answer["sluice"]["provider"] == "simulator"


async def test_a_stopped_endpoint_answers_503(gw) -> None:
    gateway, endpoint, edge = gw
    await endpoint.stop()
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=edge)) as http:
        r = await http.post(
            f"{BASE_URL}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Authorization": f"Bearer {gateway.secret}"},
        )
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "service_unavailable" and r.headers["retry-after"]


async def test_the_gateway_loads_the_sdk_on_the_first_mcp_request(bus, tmp_path) -> None:
    """The gateway's own endpoint: nothing of the SDK started until ``/mcp`` is asked
    for; then it answers as the endpoint does, and once stopped answers 503."""
    gateway = await build_gateway(bus, tmp_path)
    lazy = LazyMcpEndpoint(gateway.deps)
    await lazy.start()
    edge = Edge(create_app(gateway.deps, lazy), gateway.deps.instruments)
    try:
        assert lazy.endpoint is None
        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=edge),
            headers={"Authorization": f"Bearer {gateway.secret}"},
            timeout=10,
        )
        transport = streamable_http_client(f"{BASE_URL}/mcp", http_client=http)
        async with http, Client(transport) as client:
            tools = await client.list_tools()
        assert "chat" in {tool.name for tool in tools.tools}
        assert lazy.endpoint is not None
        await lazy.stop()
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=edge)) as http:
            r = await http.post(
                f"{BASE_URL}/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"Authorization": f"Bearer {gateway.secret}"},
            )
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "service_unavailable"
    finally:
        await lazy.stop()
        await gateway.close()
