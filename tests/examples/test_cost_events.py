"""examples/cost_events.py against a real NATS server: it prints one line per cost
event published, decoded from protobuf, with the trace id of its headers."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.topology import Subjects

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cost_events.py"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
AT_NANOS = 1_790_000_000_123_000_000  # 2026-09-21T14:13:20.123Z


def cost_event(key_id: str, request_id: str) -> cost_pb2.CostEvent:
    return cost_pb2.CostEvent(
        request_id=request_id,
        key_id=key_id,
        model="qwen2.5-coder-0.5b",
        usage=chat_pb2.Usage(input_tokens=12, output_tokens=30),
        total_cost_usd=0.000072,
        occurred_unix_nanos=AT_NANOS,
        outcome="completed",
    )


async def start(nats_url: str, *extra: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--nats",
        nats_url,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"listening for cost events on" in ready, ready
    return proc


@pytest.fixture
async def example(nats_server: EmbeddedNats) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip("\n")


async def test_it_prints_each_cost_event_as_it_happens(
    nats_server: EmbeddedNats, bus: Bus, example: list[asyncio.subprocess.Process]
) -> None:
    proc = await start(nats_server.url)
    example.append(proc)
    traceparent = f"00-{TRACE_ID}-b7ad6b7169203331-01"
    await bus.publish(
        Subjects.cost_recorded("key_a"),
        cost_event("key_a", "req_1"),
        headers={"traceparent": traceparent},
        traced=False,
    )
    await bus.publish(Subjects.cost_recorded("key_b"), cost_event("key_b", "req_2"), traced=False)

    assert await read_line(proc) == (
        "2026-09-21T14:13:20.123Z  key=key_a  model=qwen2.5-coder-0.5b  tokens=12+30  "
        f"usd=0.000072  trace={TRACE_ID}"
    )
    assert await read_line(proc) == (
        "2026-09-21T14:13:20.123Z  key=key_b  model=qwen2.5-coder-0.5b  tokens=12+30  "
        "usd=0.000072  trace=-"
    )

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_with_a_key_it_prints_that_key_only(
    nats_server: EmbeddedNats, bus: Bus, example: list[asyncio.subprocess.Process]
) -> None:
    proc = await start(nats_server.url, "--key", "key_a")
    example.append(proc)
    # In this order on one connection: a line for key_b would come first.
    await bus.publish(Subjects.cost_recorded("key_b"), cost_event("key_b", "req_3"), traced=False)
    await bus.publish(Subjects.cost_recorded("key_a"), cost_event("key_a", "req_4"), traced=False)
    assert "key=key_a" in await read_line(proc)
