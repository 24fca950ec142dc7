from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2
from sluice.catalog import Catalog
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import free_port
from sluice.devtools.simulator import SIMULATOR_KEY, Simulator, start_simulator
from sluice.inference.v1 import inference_pb2
from sluice.localtrace import LocalTracerProvider
from sluice.metrics import instruments
from sluice.pricing import PriceTable
from sluice.settings import CommonSettings
from sluice.telemetry import setup_telemetry
from sluice.topology import PriorityClass, Streams, Subjects

from services.inference_worker.adapters.breakers import SharedBreakers
from services.inference_worker.adapters.providers import ProviderPool
from services.inference_worker.adapters.sink import NatsEventSink
from services.inference_worker.domain.circuit import BreakerPolicy, CircuitRegistry
from services.inference_worker.domain.engine import InferenceEngine
from services.inference_worker.handlers.nats import WorkConsumer
from services.inference_worker.settings import RetrySettings, WorkerSettings
from tests.support.stack import REPO

PROVIDERS_YAML = """
providers:
  sim:
    kind: openai
    base_url: {sim}
    timeout_seconds: 2
    connect_timeout_seconds: 1
  sim-backup:
    kind: openai
    base_url: {sim}
    timeout_seconds: 2
  dead:
    kind: openai
    base_url: http://127.0.0.1:{dead_port}/v1
    connect_timeout_seconds: 0.5
  keyless:
    kind: openai
    base_url: {sim}
    api_key_env: SLUICE_TEST_KEY_NEVER_SET
models:
  sim-fast:
    provider: sim
    upstream_model: sim-fast
  sim-chain:
    provider: sim
    upstream_model: sim-primary
    fallbacks: [sim-backup]
  sim-backup:
    provider: sim-backup
    upstream_model: sim-backup
  dead-chain:
    provider: dead
    upstream_model: nothing
    fallbacks: [sim-fast]
  keyless-chain:
    provider: keyless
    upstream_model: sim-fast
    fallbacks: [sim-fast]
  keyless:
    provider: keyless
    upstream_model: sim-fast
  route-chain:
    deadline_seconds: 8
    chain:
      - name: rc-slow
        provider: sim
        upstream_model: sim-fast
        ttft_timeout_seconds: 0.3
        timeout_seconds: 0.5
        attempts: 1
        params: {{sim: {{ttft_ms: 1500, output_tokens: 8}}}}
      - name: rc-ok
        provider: sim-backup
        upstream_model: sim-fast
  route-cut:
    chain:
      - name: cut-first
        provider: sim
        upstream_model: sim-fast
        params: {{sim: {{fault: cut, cut_after: 3, output_tokens: 12}}}}
      - name: cut-spare
        provider: sim-backup
        upstream_model: sim-fast
  route-resort:
    last_resort: {{template: "Busy; try later.", cache: true}}
    chain:
      - {{name: rr-dead, provider: dead, upstream_model: x, attempts: 1}}
  route-client:
    last_resort: {{template: "Busy; try later."}}
    chain:
      - {{name: rcl-sim, provider: sim, upstream_model: sim-fast}}
  route-503:
    last_resort: {{cache: false, retry_after_seconds: 9}}
    chain:
      - {{name: r503-dead, provider: dead, upstream_model: x, attempts: 1}}
  route-deadline:
    deadline_seconds: 0.6
    chain:
      - name: rd-slow
        provider: sim
        upstream_model: sim-fast
        params: {{sim: {{ttft_ms: 3000}}}}
  route-budget:
    retry_budget: {{seconds: 0}}
    chain:
      - name: rb-fail
        provider: sim
        upstream_model: sim-fast
        attempts: 3
        params: {{sim: {{fault: "500"}}}}
      - {{name: rb-ok, provider: sim-backup, upstream_model: sim-fast}}
  route-usd:
    retry_budget: {{usd: 0}}
    chain:
      - name: ru-fail
        provider: sim
        upstream_model: sim-fast
        attempts: 1
        params: {{sim: {{fault: "503"}}}}
      - {{name: ru-ok, provider: sim-backup, upstream_model: sim-fast}}
"""


@pytest.fixture(scope="session")
def spans(tmp_path_factory: pytest.TempPathFactory) -> InMemorySpanExporter:
    """Finished spans of this process (the SDK provider is process-wide: reuse it)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider | LocalTracerProvider):
        # prometheus=True: other suites in this process read the metrics registry.
        setup_telemetry("inference-worker", tmp_path_factory.mktemp("state"))
        provider = trace.get_tracer_provider()
    # The lean local tracer hands its spans to the SDK's processors as they are.
    assert isinstance(provider, TracerProvider | LocalTracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="session")
async def sim_runner() -> AsyncIterator[web.AppRunner]:
    runner = await start_simulator(free_port())
    yield runner
    await runner.cleanup()


@pytest.fixture(scope="session")
def sim_url(sim_runner: web.AppRunner) -> str:
    return next(iter(sim_runner.sites)).name.rstrip("/") + "/v1"


@pytest.fixture(scope="session")
def simulator(sim_runner: web.AppRunner) -> Simulator:
    return sim_runner.app[SIMULATOR_KEY]


@pytest.fixture
def config_dir(tmp_path: Path, sim_url: str) -> Path:
    (tmp_path / "providers.yaml").write_text(
        PROVIDERS_YAML.format(sim=sim_url, dead_port=free_port()), encoding="utf-8"
    )
    shutil.copy(REPO / "config" / "prices.yaml", tmp_path / "prices.yaml")
    return tmp_path


@dataclass
class Worker:
    """A worker built from its parts on the shared test bus (no gRPC, no metrics port)."""

    bus: Bus
    settings: WorkerSettings
    catalog: Catalog
    circuits: CircuitRegistry
    pool: ProviderPool
    engine: InferenceEngine
    consumer: WorkConsumer
    shared: SharedBreakers | None = None
    stopped: bool = False

    async def stop(self, grace: float = 5.0) -> None:
        if not self.stopped:
            self.stopped = True
            await self.consumer.stop(grace)
            if self.shared is not None:
                await self.shared.stop()
            await self.pool.close()


@dataclass
class Result:
    events: list[inference_pb2.StreamEvent] = field(default_factory=list)

    @property
    def last(self) -> inference_pb2.StreamEvent:
        return self.events[-1]

    @property
    def deltas(self) -> list[inference_pb2.Delta]:
        return [e.delta for e in self.events if e.WhichOneof("body") == "delta"]

    @property
    def final(self) -> inference_pb2.Final:
        assert self.last.WhichOneof("body") == "final", self.last
        return self.last.final

    @property
    def failure(self) -> inference_pb2.Failure:
        assert self.last.WhichOneof("body") == "failure", self.last
        return self.last.failure


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def make_worker(
    bus: Bus, config_dir: Path, spans: InMemorySpanExporter
) -> AsyncIterator[WorkerFactory]:
    made: list[Worker] = []

    async def make(**overrides: Any) -> Worker:
        retry = overrides.pop("retry", RetrySettings(attempts=2, base_delay_ms=10, max_delay_ms=50))
        # Opt in: the bucket outlives a test on the session's server.
        share = overrides.pop("shared_breakers", False)
        settings = WorkerSettings(
            concurrency=overrides.pop("concurrency", 8),
            # Short polls: a stopping test worker waits for its open pulls to expire.
            long_poll_seconds=overrides.pop("long_poll_seconds", 0.5),
            retry=retry,
            circuit_failure_threshold=overrides.pop("circuit_failure_threshold", 3),
            common=CommonSettings(
                config_dir=config_dir,
                nats_url=bus.nc.connected_url.geturl() if bus.nc.connected_url else "",
            ),
            **overrides,
        )
        catalog = Catalog.load(config_dir / "providers.yaml")
        circuits = CircuitRegistry(
            BreakerPolicy(
                window=settings.circuit_window,
                min_calls=settings.circuit_min_calls,
                failure_rate=settings.circuit_failure_rate,
                consecutive=settings.circuit_failure_threshold,
                cooldown_seconds=settings.circuit_cooldown_seconds,
                probes=settings.circuit_probes,
            )
        )
        shared = None
        if share:
            shared = SharedBreakers(bus, circuits, settings.common.instance_id)
            await shared.start()
        pool = ProviderPool(catalog)
        engine = InferenceEngine(
            catalog=catalog,
            prices=PriceTable.load(config_dir / "prices.yaml"),
            pool=pool,
            circuits=circuits,
            retry=settings.retry,
            max_deliveries=settings.max_deliveries,
            sink=NatsEventSink(bus, usage_timeout=2, usage_attempts=3),
            instruments=instruments(),
        )
        consumer = WorkConsumer(bus, engine, settings)
        await consumer.start()
        worker = Worker(bus, settings, catalog, circuits, pool, engine, consumer, shared)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        await worker.stop()


def new_work(
    *,
    model: str = "sim-fast",
    stream: bool = False,
    sim: dict[str, Any] | None = None,
    text: str = "hello worker",
    cache_key: str = "",
    deadline_s: float | None = 30.0,
    priority: chat_pb2.Priority.ValueType = chat_pb2.PRIORITY_INTERACTIVE,
) -> inference_pb2.InferenceWork:
    request_id = f"req-{uuid.uuid4().hex}"
    request = chat_pb2.ChatRequest(
        model=model,
        messages=[chat_pb2.Message(role="user", text=text)],
        stream=stream,
        include_usage=stream,
    )
    request.sampling.max_tokens = 64
    if sim is not None:
        import json

        request.extra_json = json.dumps({"sim": sim})
    now = time.time_ns()
    return inference_pb2.InferenceWork(
        request_id=request_id,
        key_id=f"key-{uuid.uuid4().hex[:12]}",
        team_id="team-test",
        request=request,
        priority=priority,
        stream_subject=Subjects.stream(request_id),
        reservation_id=f"res-{uuid.uuid4().hex[:8]}",
        enqueued_unix_nanos=now,
        deadline_unix_nanos=now + int(deadline_s * 1e9) if deadline_s is not None else 0,
        cache_key=cache_key,
        cache_ttl_seconds=60 if cache_key else 0,
    )


class Tap:
    """Collects the stream events of one request, from before its work is published."""

    def __init__(self, bus: Bus, work: inference_pb2.InferenceWork) -> None:
        self.bus = bus
        self.work = work
        self.result = Result()
        self._done = asyncio.Event()

    async def __aenter__(self) -> Tap:
        async def on_event(msg: Any) -> None:
            event = inference_pb2.StreamEvent()
            event.ParseFromString(msg.data)
            self.result.events.append(event)
            if event.WhichOneof("body") in {"final", "failure"}:
                self._done.set()

        self._sub = await self.bus.nc.subscribe(self.work.stream_subject, cb=on_event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def wait(self, timeout: float = 10) -> Result:
        await asyncio.wait_for(self._done.wait(), timeout)
        return self.result


async def publish_work(
    bus: Bus,
    work: inference_pb2.InferenceWork,
    cls: PriorityClass = PriorityClass.INTERACTIVE,
    msg_id: str | None = None,
) -> None:
    await bus.js.publish(
        Subjects.infer(cls),
        work.SerializeToString(),
        headers={"Nats-Msg-Id": msg_id or work.request_id},
    )


async def run(
    bus: Bus,
    work: inference_pb2.InferenceWork,
    cls: PriorityClass = PriorityClass.INTERACTIVE,
    timeout: float = 10,
) -> Result:
    async with Tap(bus, work) as tap:
        await publish_work(bus, work, cls)
        return await tap.wait(timeout)


async def usage_events(
    bus: Bus, key_id: str, expect: int = 1, timeout: float = 3
) -> list[cost_pb2.UsageEvent]:
    """Every usage event stored for ``key_id`` (an ephemeral consumer reads them all)."""
    deadline = time.monotonic() + timeout
    sub = await bus.js.pull_subscribe(
        Subjects.usage(key_id),
        stream=Streams.USAGE.name,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=10),
    )
    events: list[cost_pb2.UsageEvent] = []
    try:
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(10, timeout=0.3)
            except TimeoutError:
                if len(events) >= expect:
                    break
                continue
            for msg in msgs:
                event = cost_pb2.UsageEvent()
                event.ParseFromString(msg.data)
                events.append(event)
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return events


class StoreTap:
    def __init__(self) -> None:
        self.stores: list[cache_pb2.StoreRequest] = []

    async def on_msg(self, msg: Any) -> None:
        store = cache_pb2.StoreRequest()
        store.ParseFromString(msg.data)
        self.stores.append(store)
