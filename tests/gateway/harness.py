"""The gateway app on a real NATS server, with the test standing in for the limiter, the
cache and the inference worker."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2
from sluice.common.v1 import chat_pb2
from sluice.consumers import ConsumerBroker
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.metrics import instruments
from sluice.settings import CommonSettings
from sluice.telemetry import setup_telemetry
from sluice.topology import Buckets, Streams, Subjects

from services.gateway.adapters.readiness import Readiness
from services.gateway.app import Gateway as Assembled
from services.gateway.app import assemble
from services.gateway.domain.keys import hash_secret
from services.gateway.handlers.http.application import create_app
from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.direct import direct_routes
from services.gateway.handlers.http.middleware import Edge
from services.gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
BASE_URL = "http://gateway.test"

POLICIES = [
    limiter_pb2.PolicyState(
        name="tpm", quota=100000, remaining=99000, window_seconds=60, reset_ms=1200
    ),
    limiter_pb2.PolicyState(name="rpm", quota=600, remaining=599, window_seconds=60, reset_ms=100),
]

Scenario = Callable[[inference_pb2.InferenceWork, "FakeServices"], Coroutine[Any, Any, None]]


def answer(content: str = "Hello there", **kw) -> inference_pb2.Final:
    base: dict[str, Any] = dict(
        choices=[chat_pb2.Choice(index=0, content=content, finish_reason="stop")],
        usage=chat_pb2.Usage(input_tokens=12, output_tokens=3),
        model_served="sim-fast",
        provider="simulator",
        response_id="resp-1",
        created_unix=int(time.time()),
        cost_usd=0.00042,
        timing=chat_pb2.Timing(queue_wait_us=800, upstream_ttft_us=1000, upstream_total_us=3000),
    )
    base.update(kw)
    return inference_pb2.Final(**base)


async def reply_final(work: inference_pb2.InferenceWork, fake: FakeServices) -> None:
    await fake.emit(work, inference_pb2.StreamEvent(sequence=1, final=answer()))


@dataclass
class FakeServices:
    bus: Bus
    reserve: limiter_pb2.ReserveResponse = field(
        default_factory=lambda: limiter_pb2.ReserveResponse(
            allowed=True, reservation_id="p0.res-1", policies=POLICIES, reserved_tokens=100
        )
    )
    cache_answer: inference_pb2.Final | None = None
    # Set: the cache answers as a semantic hit of this similarity.
    cache_similarity: float | None = None
    cache_online: bool = True
    limiter_online: bool = True
    reserve_attempts: int = 0
    scenario: Scenario = reply_final
    reserves: list[limiter_pb2.ReserveRequest] = field(default_factory=list)
    commits: list[limiter_pb2.CommitRequest] = field(default_factory=list)
    lookups: list[cache_pb2.LookupRequest] = field(default_factory=list)
    work: list[inference_pb2.InferenceWork] = field(default_factory=list)
    work_headers: list[dict[str, str]] = field(default_factory=list)
    reserve_headers: list[dict[str, str]] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        nc = self.bus.nc

        async def on_reserve(msg):
            self.reserve_attempts += 1
            if not self.limiter_online:
                return
            req = limiter_pb2.ReserveRequest()
            req.ParseFromString(msg.data)
            self.reserves.append(req)
            self.reserve_headers.append(dict(msg.headers or {}))
            await msg.respond(self.reserve.SerializeToString())

        async def on_commit(msg):
            req = limiter_pb2.CommitRequest()
            req.ParseFromString(msg.data)
            self.commits.append(req)
            await msg.respond(limiter_pb2.CommitResponse(found=True).SerializeToString())

        async def on_lookup(msg):
            if not self.cache_online:
                return
            req = cache_pb2.LookupRequest()
            req.ParseFromString(msg.data)
            self.lookups.append(req)
            reply = cache_pb2.LookupResponse(hit=self.cache_answer is not None)
            if self.cache_answer is not None:
                reply.answer.CopyFrom(self.cache_answer)
                if self.cache_similarity is not None:
                    reply.semantic, reply.similarity = True, self.cache_similarity
            await msg.respond(reply.SerializeToString())

        async def on_work(msg):
            work = inference_pb2.InferenceWork()
            work.ParseFromString(msg.data)
            self.work.append(work)
            self.work_headers.append(dict(msg.headers or {}))
            task: asyncio.Task[None] = asyncio.create_task(self.scenario(work, self))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._subs = [
            await nc.subscribe(Subjects.LIMITER_RESERVE_ALL, cb=on_reserve),
            await nc.subscribe(Subjects.LIMITER_COMMIT_ALL, cb=on_commit),
            await nc.subscribe(Subjects.CACHE_LOOKUP, cb=on_lookup),
            await nc.subscribe(Subjects.infer("interactive"), cb=on_work),
        ]
        await nc.flush()

    async def emit(
        self, work: inference_pb2.InferenceWork, event: inference_pb2.StreamEvent
    ) -> None:
        event.request_id = work.request_id
        await self.bus.nc.publish(work.stream_subject, event.SerializeToString())

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        # Work items stay in the work-queue stream; other suites' workers must not get them.
        await self.bus.js.purge_stream(Streams.INFER.name, subject=Subjects.INFER_ALL)

    async def usage_events(self, key_id: str) -> list[cost_pb2.UsageEvent]:
        sub = await self.bus.js.subscribe(Subjects.usage(key_id), ordered_consumer=True)
        events = []
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                event = cost_pb2.UsageEvent()
                event.ParseFromString(msg.data)
                events.append(event)
        except Exception:
            pass
        finally:
            await sub.unsubscribe()
        return events


@dataclass
class Gateway:
    edge: Edge
    deps: ApiDeps
    parts: Assembled
    fake: FakeServices
    secret: str
    record: keys_pb2.ApiKeyRecord

    async def close(self) -> None:
        """What the service's stop does for the parts a test starts: the scripted
        services stop, the lease ledger and the audit trail drain (their tasks end
        with the test's event loop, not after it)."""
        await self.fake.stop()
        await self.parts.limiter.drain()
        await self.parts.audit.drain()

    def http(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.edge),
            base_url=BASE_URL,
            headers=headers,
            timeout=10,
        )

    def authed(self) -> httpx.AsyncClient:
        return self.http(authorization=f"Bearer {self.secret}")

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{BASE_URL}/v1",
            api_key=self.secret,
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.edge)),
        )


async def build_gateway(bus: Bus, tmp: Path, **overrides) -> Gateway:
    setup_telemetry("gateway", tmp)
    settings = GatewaySettings(
        common=CommonSettings(state_dir=tmp, config_dir=REPO / "config"),
        admission_lease_requests=overrides.pop("admission_lease_requests", 0),
        request_timeout_seconds=overrides.pop("request_timeout_seconds", 5.0),
        cache_timeout_seconds=0.2,
        limiter_timeout_seconds=0.3,
        limiter_wait_seconds=overrides.pop("limiter_wait_seconds", 1.0),
        **overrides,
    )
    kv = await bus.kv(Buckets.API_KEYS)
    secret = "sk-test-" + secrets.token_hex(8)
    record = keys_pb2.ApiKeyRecord(
        key_id="k" + secrets.token_hex(4),
        secret_sha256=hash_secret(secret),
        team_id="team-" + secrets.token_hex(3),
        tokens_per_minute=5000,
        requests_per_minute=60,
        scopes=["*"],
    )
    await kv.put(record.secret_sha256, record.SerializeToString())
    inst = instruments()
    # Leases off: the scripted limiter answers each reserve itself. The job tracker and
    # webhook sender are not started: no worker here reports lifecycle events.
    parts = await assemble(settings, bus, ConsumerBroker(bus), inst)
    parts.api.readiness = Readiness(bus, settings.readiness_cache_seconds, timeout=0.2)
    fake = FakeServices(bus)
    await fake.start()
    # The answer routes as the service serves them: straight from the edge.
    edge = Edge(create_app(parts.api), inst, parts.audit, direct=direct_routes(parts.api))
    return Gateway(edge, parts.api, parts, fake, secret, record)
