"""An agent's first minutes with Sluice over MCP, with the official ``mcp`` SDK's client:
discover the tools, price a request, ask a model, run the same request as a job and poll
it, read the team's spend.

    .venv/bin/python examples/mcp_agent.py [--url http://127.0.0.1:8080/mcp]
        [--key-file .sluice/dev-key] [--model qwen2.5-coder-0.5b] [--legacy]

``--legacy`` speaks protocol revision 2025-11-25 (the ``initialize`` handshake) instead of
2026-07-28. The key may also come from ``SLUICE_API_KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def call(agent: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    result = await agent.call_tool(tool, arguments)
    if result.is_error:
        # The gateway's problem object: code, detail with a fix, trace id.
        sys.exit(f"{tool} failed: {result.content[0].text}")  # type: ignore[union-attr]
    out: dict[str, Any] = result.structured_content
    return out


async def main(url: str, key: str, model: str, legacy: bool) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    transport = streamable_http_client(url, http_client=http)
    async with http, Client(transport, mode="legacy" if legacy else "auto") as agent:
        print(f"protocol {agent.protocol_version}")
        tools = await agent.list_tools()
        print("tools:", ", ".join(t.name for t in tools.tools))

        request = {
            "model": model,
            "messages": [{"role": "user", "content": "Name one prime number."}],
            "max_tokens": 16,
        }
        estimate = await call(agent, "estimate_cost", request)
        print(f"estimate: {estimate['input_tokens']} input tokens, cost {estimate['cost_usd']}")

        answer = await call(agent, "chat", request)
        print(f"chat: {answer['text'].strip()!r}")
        print(f"  {answer['usage']['total_tokens']} tokens, ${answer['cost_usd']}, ", end="")
        print(f"trace {answer['sluice']['trace_id']}")

        job = await call(agent, "submit_job", request)
        while job["status"] not in ("completed", "failed", "cancelled"):
            await asyncio.sleep(0.2)
            job = await call(agent, "get_job", {"job_id": job["id"]})
        print(f"job {job['id']}: {job['status']}")

        usage = await call(agent, "my_usage", {"group_by": ["model"]})
        print(f"team {usage['team_id']}: {usage['totals']['requests']} requests, ", end="")
        print(f"${usage['totals']['cost_usd']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/mcp")
    parser.add_argument("--key-file", type=Path, default=Path(".sluice/dev-key"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--legacy", action="store_true", help="protocol revision 2025-11-25")
    args = parser.parse_args()
    secret = os.environ.get("SLUICE_API_KEY") or args.key_file.read_text().strip()
    asyncio.run(main(args.url, secret, args.model, args.legacy))
