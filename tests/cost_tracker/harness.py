"""An in-process cost-tracker against the suite's real NATS server, and usage builders.

Each tracker gets its own durable consumer name: the NATS server (and so SLUICE_USAGE,
with earlier tests' events) is shared by the session, and a shared durable would split
messages between trackers. Its ledger lives in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from nats.js.api import PubAck
from opentelemetry import trace
from sluice import grpc_edge
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.consumers import ConsumerBroker
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.settings import CommonSettings
from sluice.topology import ConsumerSpec, Streams, Subjects

from services.cost_tracker.app import CostTracker
from services.cost_tracker.settings import CostTrackerSettings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"
SERVICE_TOKEN = "cost-tracker-test-token"

PRICES_YAML = """\
models:
  sim-fast:
    input_per_mtok: 0.10
    output_per_mtok: 0.40
    cached_input_per_mtok: 0.05
  big-model:
    input_per_mtok: 3
    output_per_mtok: 15
"""


def write_prices(directory: Path) -> Path:
    path = directory / "prices.yaml"
    path.write_text(PRICES_YAML, encoding="utf-8")
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def usage_event(
    key_id: str,
    *,
    request_id: str | None = None,
    model: str = "sim-fast",
    input_tokens: int = 1000,
    output_tokens: int = 500,
    cached: int = 0,
    reasoning: int = 0,
    cache_hit: bool = False,
    outcome: str = "completed",
    team_id: str = "team-a",
    occurred_unix_nanos: int | None = None,
    trace_id: str = "",
) -> cost_pb2.UsageEvent:
    return cost_pb2.UsageEvent(
        request_id=request_id or unique("req"),
        key_id=key_id,
        team_id=team_id,
        model_requested=model,
        model_served=model,
        provider="sim",
        usage=chat_pb2.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached,
            reasoning_tokens=reasoning,
        ),
        occurred_unix_nanos=occurred_unix_nanos or time.time_ns(),
        cache_hit=cache_hit,
        outcome=outcome,
        trace_id=trace_id,
    )


async def publish_usage(
    bus: Bus,
    event: cost_pb2.UsageEvent,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> PubAck:
    """Publish as the worker does: JetStream, deduplicated by request id."""
    all_headers = {"Nats-Msg-Id": msg_id or event.request_id, **(headers or {})}
    return await bus.js.publish(
        Subjects.usage(event.key_id), event.SerializeToString(), headers=all_headers
    )


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


@dataclass
class RunningTracker:
    tracker: CostTracker
    bus: Bus
    broker: ConsumerBroker
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    stub: Any  # UsageServiceAsyncStub
    settings: CostTrackerSettings

    async def stop(self) -> None:
        # In the runtime's order: the consumers' broker (the batch in hand settled), then
        # the tracker's own stop.
        await self.broker.stop()
        await self.tracker.stop()
        await self.channel.close()
        await self.server.stop(grace=1)
        consumer = self.tracker.consumer
        if consumer is not None:
            # Best effort: a leftover test consumer only costs the server a little memory.
            with contextlib.suppress(Exception):
                await self.bus.js.delete_consumer(Streams.USAGE.name, consumer.spec.durable)


def tracker_settings(tmp_path: Path, **overrides: Any) -> CostTrackerSettings:
    # The in-process tracker is handed the test's bus, so no NATS URL is needed here.
    values: dict[str, Any] = {
        "ledger_path": tmp_path / "ledger.sqlite3",
        "prices_path": write_prices(tmp_path),
        "consumer_durable": unique("cost-test"),
        "fetch_timeout_seconds": 0.2,
        "common": CommonSettings(state_dir=tmp_path),
    }
    values.update(overrides)
    return CostTrackerSettings(**values)


async def start_tracker(
    bus: Bus,
    tmp_path: Path,
    *,
    tracer: trace.Tracer | None = None,
    consumer_spec: ConsumerSpec | None = None,
    **overrides: Any,
) -> RunningTracker:
    settings = tracker_settings(tmp_path, **overrides)
    tracker = CostTracker(settings, tracer=tracer)
    # Behind the edge, as the runtime serves it: spans, errors and the token.
    server = grpc_edge.server(SERVICE_TOKEN, tracer=tracer)
    tracker.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    broker = ConsumerBroker(bus, graceful_timeout=10)
    await tracker.start(bus, broker, consumer_spec=consumer_spec)
    channel = grpc_edge.channel(f"127.0.0.1:{port}", SERVICE_TOKEN)
    stub = cost_pb2_grpc.UsageServiceStub(channel)
    return RunningTracker(tracker, bus, broker, server, channel, stub, settings)
