"""The gRPC edge on a real grpc.aio server and client: the service token, the open
health service, the error catalogue's statuses, and SERVER spans continued from the
caller's trace. The services' own servicers are in tests/contracts/test_servicers.py and
the real processes' suites."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import SecretStr
from sluice import grpc_edge, service_token, telemetry
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.errors import CATALOGUE, ErrorCode, SluiceError
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from sluice.localtrace import LocalTracerProvider
from sluice.settings import CommonSettings

TOKEN = "edge-test-token-0123456789"
SECRET_IN_EXCEPTION = "sk-do-not-leak-me"


class Quota(limiter_pb2_grpc.QuotaServiceServicer):
    """Behaves by the key asked for: an answer, a SluiceError or an unexpected failure."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: Any
    ) -> limiter_pb2.GetQuotaResponse:
        self.calls += 1
        trace.get_current_span().set_attribute("sluice.key_id", request.key_id)
        if request.key_id == "limited":
            raise SluiceError(
                ErrorCode.RATE_LIMITED,
                "Too many tokens this minute.",
                param="key_id",
                retry_after_ms=1500,
                details={"policy": "tpm"},
            )
        if request.key_id == "broken":
            raise RuntimeError(f"connection string with {SECRET_IN_EXCEPTION}")
        return limiter_pb2.GetQuotaResponse(key_id=request.key_id)


class Usage(cost_pb2_grpc.UsageServiceServicer):
    async def QueryUsage(self, request: cost_pb2.UsageQuery, context: Any) -> cost_pb2.UsageSummary:
        return cost_pb2.UsageSummary()

    async def WatchCostEvents(
        self, request: cost_pb2.WatchCostEventsRequest, context: Any
    ) -> AsyncIterator[cost_pb2.CostEvent]:
        sent = 0
        try:
            for n in range(2):
                yield cost_pb2.CostEvent(request_id=f"r{n}", key_id=request.key_id)
                sent += 1
            if request.key_id == "fails-late":
                raise SluiceError(ErrorCode.SERVICE_UNAVAILABLE, "The feed closed.")
        finally:
            # Runs as the generator closes; the edge keeps its span current for it.
            trace.get_current_span().set_attribute("sluice.events_sent", sent)


@dataclass
class Edge:
    port: int
    quota: Quota
    exporter: InMemorySpanExporter
    tracer: trace.Tracer

    def channel(self, token: str = TOKEN) -> grpc.aio.Channel:
        return grpc_edge.channel(f"127.0.0.1:{self.port}", token)

    def plain_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    async def server_spans(self, name: str, count: int = 1) -> list[Any]:
        """The SERVER spans named ``name`` once ``count`` of them ended: the client can
        read an answer before the server's handler has ended its span."""
        deadline = time.monotonic() + 5
        while True:
            spans = [
                s
                for s in self.exporter.get_finished_spans()
                if s.name == name and s.kind is SpanKind.SERVER
            ]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            await asyncio.sleep(0.01)


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    exporter = InMemorySpanExporter()
    provider = LocalTracerProvider(Resource.create({"service.name": "edge-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    server = grpc_edge.server(TOKEN, tracer=tracer)
    quota = Quota()
    limiter_pb2_grpc.add_QuotaServiceServicer_to_server(quota, server)
    cost_pb2_grpc.add_UsageServiceServicer_to_server(Usage(), server)
    checks = health.aio.HealthServicer()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Edge(port, quota, exporter, tracer)
    await server.stop(grace=None)
    provider.shutdown()


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    trailers = dict(err.trailing_metadata() or ())
    return status_pb2.Status.FromString(trailers[grpc_edge.STATUS_DETAILS_KEY])


# --- credentials --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-token"),), (("authorization", f"Basic {TOKEN}"),)],
    ids=["none", "wrong token", "wrong scheme"],
)
async def test_a_caller_without_the_token_is_refused(edge: Edge, metadata: Any) -> None:
    async with edge.plain_channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="k"), metadata=metadata
            )
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert str(err.value.details()).startswith(f"{ErrorCode.INVALID_SERVICE_TOKEN}: ")
    assert edge.quota.calls == 0
    [span] = await edge.server_spans("sluice.limiter.v1.QuotaService/GetQuota")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_the_edge_channel_sends_the_token_and_a_wrong_one_is_refused(edge: Edge) -> None:
    async with edge.channel() as channel:
        reply = await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
            limiter_pb2.GetQuotaRequest(key_id="k")
        )
    assert reply.key_id == "k" and edge.quota.calls == 1
    async with edge.channel("not-the-token") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="k")
            )
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert edge.quota.calls == 1


async def test_health_is_open_and_unknown_methods_are_closed(edge: Edge) -> None:
    async with edge.plain_channel() as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        unknown = channel.unary_unary("/sluice.nothing.v1.Hidden/Reveal")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unknown(b"")
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with edge.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/sluice.nothing.v1.Hidden/Reveal")(b"")
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # Probes are not traced.
    assert not [s for s in edge.exporter.get_finished_spans() if "Health" in s.name]


# --- errors ---------------------------------------------------------------------------------


async def test_a_sluice_error_becomes_the_catalogues_status(edge: Edge) -> None:
    async with edge.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="limited")
            )
    spec = CATALOGUE[ErrorCode.RATE_LIMITED]
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == (f"rate_limited: Too many tokens this minute. (fix: {spec.fix})")
    status = rich_status(err.value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert info.reason == "rate_limited" and info.domain == grpc_edge.ERROR_DOMAIN
    assert dict(info.metadata) == {"fix": spec.fix, "param": "key_id", "policy": "tpm"}
    assert retry.retry_delay.ToMilliseconds() == 1500
    back = grpc_edge.error_from_status(status)
    assert back is not None and back.code is ErrorCode.RATE_LIMITED and back.param == "key_id"
    [span] = await edge.server_spans("sluice.limiter.v1.QuotaService/GetQuota")
    assert span.attributes["sluice.error.code"] == "rate_limited"
    # The caller's doing, not the server's: the span is not marked failed.
    assert span.status.status_code is not StatusCode.ERROR


async def test_an_unexpected_failure_is_internal_and_says_nothing_of_itself(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    async with edge.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="broken")
            )
    assert err.value.code() is grpc.StatusCode.INTERNAL
    [span] = await edge.server_spans("sluice.limiter.v1.QuotaService/GetQuota")
    trace_id = f"{span.context.trace_id:032x}"
    message = str(err.value.details())
    assert message.startswith("internal_error: ") and trace_id in message
    assert SECRET_IN_EXCEPTION not in message and "RuntimeError" not in message
    assert SECRET_IN_EXCEPTION not in str(err.value.trailing_metadata())
    assert span.status.status_code is StatusCode.ERROR
    # The operator finds the cause in the service's log, by the trace id.
    assert any(trace_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_every_catalogue_code_has_a_grpc_status() -> None:
    for code, spec in CATALOGUE.items():
        status = grpc_edge.status_code(SluiceError(code, "x"))
        assert status is not grpc.StatusCode.OK, code
        assert status.value[0] == spec.rpc_code
    assert set(CATALOGUE) == set(ErrorCode)


# --- spans ----------------------------------------------------------------------------------


async def test_the_server_span_continues_the_callers_trace(edge: Edge) -> None:
    with edge.tracer.start_as_current_span("operator call", kind=SpanKind.CLIENT) as caller:
        async with edge.channel() as channel:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="k")
            )
    # Trace context sent by hand, as any gRPC client may.
    with edge.tracer.start_as_current_span("other caller") as other:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
    async with edge.plain_channel() as channel:
        await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
            limiter_pb2.GetQuotaRequest(key_id="k2"),
            metadata=(("authorization", f"Bearer {TOKEN}"), *carrier.items()),
        )
    first, second = await edge.server_spans("sluice.limiter.v1.QuotaService/GetQuota", 2)
    assert first.parent is not None and first.parent.span_id == caller.get_span_context().span_id
    assert first.context.trace_id == caller.get_span_context().trace_id
    assert second.parent is not None and second.parent.span_id == other.get_span_context().span_id
    assert dict(first.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "sluice.limiter.v1.QuotaService",
        "rpc.method": "GetQuota",
        "rpc.grpc.status_code": 0,
        "sluice.key_id": "k",
    }


async def test_a_streaming_call_is_one_span_current_while_the_servicer_runs(edge: Edge) -> None:
    async with edge.channel() as channel:
        stub = cost_pb2_grpc.UsageServiceStub(channel)
        events = [
            e async for e in stub.WatchCostEvents(cost_pb2.WatchCostEventsRequest(key_id="a"))
        ]
        assert [e.request_id for e in events] == ["r0", "r1"]
        call = stub.WatchCostEvents(cost_pb2.WatchCostEventsRequest(key_id="fails-late"))
        got = [await call.read(), await call.read()]
        assert [e.request_id for e in got] == ["r0", "r1"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    ok, failed = await edge.server_spans("sluice.cost.v1.UsageService/WatchCostEvents", 2)
    assert ok.attributes["sluice.events_sent"] == 2 and ok.attributes["rpc.grpc.status_code"] == 0
    assert failed.attributes["sluice.events_sent"] == 2
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed.status.status_code is StatusCode.ERROR


# --- the token --------------------------------------------------------------------------------


def test_a_configured_token_wins_and_outside_local_one_is_required(tmp_path: Path) -> None:
    configured = CommonSettings(state_dir=tmp_path, service_token=SecretStr(" set-by-operator "))
    assert service_token.service_token(configured) == "set-by-operator"
    assert not (tmp_path / service_token.TOKEN_FILENAME).exists()
    for empty in (None, SecretStr(""), SecretStr("  ")):
        with pytest.raises(RuntimeError, match="SLUICE_SERVICE_TOKEN"):
            service_token.service_token(
                CommonSettings(state_dir=tmp_path, environment="production", service_token=empty)
            )
    with pytest.raises(ValueError):
        grpc_edge.GrpcEdge("")


def test_local_token_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = service_token.service_token(CommonSettings(state_dir=state))
    path = state / service_token.TOKEN_FILENAME
    assert len(first) >= 32 and path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert service_token.service_token(CommonSettings(state_dir=state)) == first
    assert sorted(p.name for p in state.iterdir()) == [service_token.TOKEN_FILENAME]


def _create_after(barrier: Any, state: str, results: Any) -> None:
    barrier.wait()
    results.put(service_token.read_or_create_token(Path(state)))


def test_processes_starting_together_agree_on_one_token(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 8
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_create_after, args=(barrier, str(tmp_path), results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    tokens = {results.get(timeout=30) for _ in range(n)}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert tokens == {(tmp_path / service_token.TOKEN_FILENAME).read_text().strip()}
    # No draft is left behind.
    assert os.listdir(tmp_path) == [service_token.TOKEN_FILENAME]


def test_an_empty_token_variable_counts_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker compose passes ``SLUICE_SERVICE_TOKEN: ${SLUICE_SERVICE_TOKEN:-}``."""
    monkeypatch.setenv("SLUICE_SERVICE_TOKEN", "")
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    token = service_token.service_token(CommonSettings())
    assert token and (tmp_path / service_token.TOKEN_FILENAME).read_text().strip() == token
    monkeypatch.setenv("SLUICE_SERVICE_TOKEN", "from-the-environment")
    assert service_token.service_token(CommonSettings()) == "from-the-environment"
