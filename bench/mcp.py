"""MCP: what a chat costs through ``/mcp`` (the SDK's client, a session held open) beside
the same chat through ``POST /v1/chat/completions``, one call at a time, the three kinds
of call interleaved so that the machine's noise falls on each alike. Every prompt is its
own and the temperature above 0, so no answer comes from the cache; the simulator
answers at once (16 tokens), so the times are the gateway's path."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.load import median, percentile
from bench.report import table


def _chat(i: int, kind: str) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"mcp bench {kind} {i}: say something"}],
        "max_tokens": 16,
        "temperature": 0.7,
    }


async def _timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def mcp_table(gateway: str, api_key: str, *, calls: int) -> str:
    headers = {"Authorization": f"Bearer {api_key}"}
    samples: dict[str, list[float]] = {"HTTP /v1/chat/completions": []}
    modes = {"MCP chat tool, 2025-11-25": "legacy", "MCP chat tool, 2026-07-28": "auto"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        AsyncExitStack() as opened,
    ):
        clients: dict[str, Client] = {}
        for label, mode in modes.items():
            transport = streamable_http_client(f"{gateway}/mcp", http_client=http)
            clients[label] = await opened.enter_async_context(Client(transport, mode=mode))
            samples[label] = []

        async def over_http(i: int) -> None:
            r = await http.post(f"{gateway}/v1/chat/completions", json=_chat(i, "http"))
            if r.status_code != 200:
                raise RuntimeError(f"chat over HTTP answered {r.status_code}: {r.text}")

        def over_mcp(client: Client, i: int, kind: str) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                result = await client.call_tool("chat", _chat(i, kind))
                if result.is_error:
                    raise RuntimeError(f"chat over MCP failed: {result.content}")

            return call

        for i in range(-5, calls):  # five rounds of warm-up, not counted
            http_ms = await _timed(partial(over_http, i))
            mcp_ms = {
                label: await _timed(over_mcp(client, i, mode))
                for (label, client), mode in zip(clients.items(), modes.values(), strict=True)
            }
            if i >= 0:
                samples["HTTP /v1/chat/completions"].append(http_ms)
                for label, ms in mcp_ms.items():
                    samples[label].append(ms)
    base = median(samples["HTTP /v1/chat/completions"])
    rows = [
        [
            label,
            len(ms),
            median(ms),
            percentile(ms, 90),
            percentile(ms, 99),
            median(ms) - base,
        ]
        for label, ms in samples.items()
    ]
    return table(["call", "n", "p50 ms", "p90 ms", "p99 ms", "p50 over HTTP ms"], rows)
