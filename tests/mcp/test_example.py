"""examples/mcp_agent.py, as the README shows it, against the real gateway on each
protocol revision."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.mcp.conftest import McpStack
from tests.support.full_stack import DEV_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp_agent.py"


@pytest.mark.parametrize(("flags", "revision"), [([], "2026-07-28"), (["--legacy"], "2025-11-25")])
async def test_the_agent_example_runs(mcp_stack: McpStack, flags: list[str], revision: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--url",
        mcp_stack.url,
        "--model",
        "sim-fast",
        *flags,
        env={**os.environ, "SLUICE_API_KEY": DEV_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert text.startswith(f"protocol {revision}\n")
    assert (
        "tools: chat, submit_job, get_job, cancel_job, estimate_cost, my_usage, list_models" in text
    )
    assert re.search(r"^chat: '.+'$", text, re.M)
    assert re.search(r"trace [0-9a-f]{32}$", text, re.M)
    assert re.search(r"^job job_\S+: completed$", text, re.M)
    assert re.search(r"^team dev: \d+ requests", text, re.M), text
