"""Every gRPC method a service declares in proto/ is implemented by its servicer (the
generated base classes answer UNIMPLEMENTED, and none of them may be what a client
reaches), and every servicer is served behind the shared edge as its service wires it:
refused without the service token, reached with it, in a SERVER span of the caller's
trace. Health stays open."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sluice import grpc_edge
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.catalog import Catalog
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from sluice.localtrace import LocalTracerProvider

from services.cache.domain import Cache
from services.cache.handlers.grpc import CacheAdminServicer, cache_admin_service
from services.cost_tracker.adapters.ledger import SqliteLedger
from services.cost_tracker.domain.feed import CostFeed
from services.cost_tracker.handlers.grpc import UsageServicer, usage_service
from services.inference_worker.domain.circuit import CircuitRegistry
from services.inference_worker.handlers.grpc import (
    ProviderHealthServicer,
    provider_health_service,
)
from services.limiter.handlers.grpc import QuotaServicer, quota_service
from tests.cache.test_domain import DictStore

REPO = Path(__file__).resolve().parents[2]
TOKEN = "servicers-test-token"

CASES: list[tuple[type, ModuleType, ModuleType, str]] = [
    (CacheAdminServicer, cache_pb2, cache_pb2_grpc, "CacheAdminService"),
    (UsageServicer, cost_pb2, cost_pb2_grpc, "UsageService"),
    (ProviderHealthServicer, inference_pb2, inference_pb2_grpc, "ProviderHealthService"),
    (QuotaServicer, limiter_pb2, limiter_pb2_grpc, "QuotaService"),
]

# What each RPC answers a caller with the token and an empty request: OK, or the status
# of the SluiceError its servicer raises (the edge's mapping, so the servicer ran).
EXPECTED = {
    "sluice.cache.v1.CacheAdminService/Stats": grpc.StatusCode.OK,
    "sluice.cache.v1.CacheAdminService/Invalidate": grpc.StatusCode.OK,
    "sluice.cost.v1.UsageService/QueryUsage": grpc.StatusCode.OK,
    "sluice.cost.v1.UsageService/WatchCostEvents": grpc.StatusCode.OK,
    "sluice.inference.v1.ProviderHealthService/GetProviderHealth": grpc.StatusCode.OK,
    # key_id is required.
    "sluice.limiter.v1.QuotaService/GetQuota": grpc.StatusCode.INVALID_ARGUMENT,
}


@dataclass(frozen=True)
class Rpc:
    path: str
    request_type: type[Any]
    response_type: type[Any]
    server_streaming: bool

    def call(self, channel: grpc.aio.Channel) -> Any:
        kind = channel.unary_stream if self.server_streaming else channel.unary_unary
        return kind(
            f"/{self.path}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self.response_type.FromString,
        )(self.request_type(), timeout=5)


def declared_rpcs() -> list[Rpc]:
    rpcs = []
    for _, messages, _, service in CASES:
        descriptor = messages.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            rpcs.append(
                Rpc(
                    f"{descriptor.full_name}/{method.name}",
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                    method.server_streaming,
                )
            )
    return rpcs


RPCS = declared_rpcs()


@pytest.mark.parametrize(("impl", "messages", "grpc_module", "service"), CASES)
def test_every_rpc_is_implemented(
    impl: type, messages: ModuleType, grpc_module: ModuleType, service: str
) -> None:
    base = getattr(grpc_module, f"{service}Servicer")
    assert issubclass(impl, base)
    rpcs = [m.name for m in messages.DESCRIPTOR.services_by_name[service].methods]
    assert rpcs
    missing = [name for name in rpcs if getattr(impl, name) is getattr(base, name)]
    assert not missing, f"{impl.__name__} leaves {missing} to the generated UNIMPLEMENTED stub"


def test_every_declared_rpc_has_an_expected_answer() -> None:
    assert {rpc.path for rpc in RPCS} == set(EXPECTED)


@dataclass
class Served:
    port: int
    exporter: InMemorySpanExporter
    provider: LocalTracerProvider


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The four services' servicers, registered as each service's app registers them,
    with health, on one server behind the edge."""
    exporter = InMemorySpanExporter()
    provider = LocalTracerProvider(Resource.create({"service.name": "servicers"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    feed = CostFeed()
    # A closed feed ends a watch at once, so that the stream can be read to its end.
    feed.close()
    cache = Cache(DictStore(), default_ttl_seconds=60, max_ttl_seconds=3600)
    registrars: list[Callable[[grpc.aio.Server], None]] = [
        quota_service(lambda: None),
        cache_admin_service(lambda: cache),
        usage_service(ledger, feed),
        provider_health_service(
            Catalog.load(REPO / "config" / "providers.yaml"), CircuitRegistry()
        ),
    ]
    server = grpc_edge.server(TOKEN, tracer=provider.get_tracer("test"))
    for register in registrars:
        register(server)
    checks = health.aio.HealthServicer()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Served(port, exporter, provider)
    await server.stop(grace=None)
    await ledger.close()
    provider.shutdown()


async def outcome(rpc: Rpc, channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        call = rpc.call(channel)
        if rpc.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path for r in RPCS])
async def test_every_rpc_is_behind_the_edge(served: Served, rpc: Rpc) -> None:
    target = f"127.0.0.1:{served.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        assert await outcome(rpc, channel) is grpc.StatusCode.UNAUTHENTICATED
    async with grpc_edge.channel(target, "a-guess") as channel:
        assert await outcome(rpc, channel) is grpc.StatusCode.UNAUTHENTICATED
    with served.provider.get_tracer("test").start_as_current_span("caller") as caller:
        async with grpc_edge.channel(target, TOKEN) as channel:
            assert await outcome(rpc, channel) is EXPECTED[rpc.path]
    [span] = [
        s
        for s in served.exporter.get_finished_spans()
        if s.name == rpc.path
        and s.parent is not None
        and s.parent.span_id == caller.get_span_context().span_id
    ]
    assert span.kind is SpanKind.SERVER
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == EXPECTED[rpc.path].value[0]


async def test_health_answers_without_a_token(served: Served) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING
