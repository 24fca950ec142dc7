"""A stream of its own for each test, the consumer's spans in memory, and the reads
that say what the server did with each message (consumer state, ack and term traffic
seen by a second connection)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.localtrace import LocalTracerProvider
from sluice.topology import ConsumerSpec, StreamSpec


@dataclass
class ScratchStream:
    """A JetStream stream (and the consumer spec on it) that no other test uses."""

    spec: StreamSpec
    bus: Bus

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def subject_prefix(self) -> str:
        return self.spec.subjects[0].removesuffix(".>")

    def consumer(self, durable: str = "c", **fields: Any) -> ConsumerSpec:
        fields.setdefault("ack_wait_seconds", 5.0)
        fields.setdefault("max_deliver", -1)
        return ConsumerSpec(
            stream=self.name, durable=durable, filter_subject=self.spec.subjects[0], **fields
        )

    async def publish(self, request_ids: list[str], headers: dict[str, str] | None = None) -> None:
        for rid in request_ids:
            event = cost_pb2.UsageEvent(request_id=rid, key_id="key")
            await self.bus.js.publish(
                f"{self.subject_prefix}.key", event.SerializeToString(), headers=headers
            )

    async def publish_raw(self, payload: bytes) -> None:
        await self.bus.js.publish(f"{self.subject_prefix}.key", payload)

    async def info(self, durable: str = "c") -> ConsumerInfo:
        return await self.bus.js.consumer_info(self.name, durable)


@pytest.fixture
async def stream(bus: Bus) -> AsyncIterator[ScratchStream]:
    name = f"TEST_{secrets.token_hex(4).upper()}"
    spec = StreamSpec(name=name, subjects=(f"test.{name.lower()}.>",))
    await bus.ensure_stream(spec)
    yield ScratchStream(spec, bus)
    await bus.js.delete_stream(name)


@dataclass
class AckTraffic:
    """Every ack, nak and term the consumers send for one stream, seen from a second
    connection: acknowledgements are plain messages on the reply subject of each
    delivery (``$JS.ACK.<stream>.<consumer>...``)."""

    acks: int = 0
    naks: list[float | None] = field(default_factory=list)
    terms: int = 0

    def seen(self, msg: Msg) -> None:
        body = msg.data
        if body in (b"", b"+ACK"):
            self.acks += 1
        elif body.startswith(b"-NAK"):
            rest = body[4:].strip()
            self.naks.append(orjson.loads(rest)["delay"] / 1e9 if rest else None)
        elif body.startswith(b"+TERM"):
            self.terms += 1


@pytest.fixture
async def ack_traffic(
    nats_server: EmbeddedNats, stream: ScratchStream
) -> AsyncIterator[AckTraffic]:
    watcher: NatsClient = await nats.connect(nats_server.url, name="ack-watcher")
    traffic = AckTraffic()

    async def on_ack(msg: Msg) -> None:
        traffic.seen(msg)

    await watcher.subscribe(f"$JS.ACK.{stream.name}.>", cb=on_ack)
    await watcher.flush()
    yield traffic
    await watcher.close()


@pytest.fixture
def spans() -> Iterator[tuple[LocalTracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = LocalTracerProvider(Resource.create({"service.name": "consumer-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
