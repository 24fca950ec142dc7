"""The limiter as a real process (``python -m services.limiter``) on the suite's NATS.

One limiter owns every partition here (several replicas: test_replicas.py). Each test
uses unique key ids, because the NATS server (the SLUICE_USAGE stream, the partition
snapshots) is shared by the whole session.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import Resource
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from sluice.localtrace import LocalTracerProvider
from sluice.partitions import partition_of, reservation_partition
from sluice.topology import ServiceName, Subjects

from tests.support.stack import ServiceProcess, Stack

pytestmark = pytest.mark.integration

TPM = 5000
RPM = 50


async def ask(bus: Bus, subject: str, request, reply_type, wait: float = 10.0):  # type: ignore[no-untyped-def]
    """Request/reply to a partition's subject, asked again while it has no owner (a
    restarted limiter takes a killed one's partitions once their leases lapse)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await bus.request(subject, request, reply_type)
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@dataclass
class LimiterUnderTest:
    stack: Stack
    bus: Bus
    process: ServiceProcess | None = None

    async def start(self) -> ServiceProcess:
        self.process = self.stack.start(ServiceName.LIMITER)
        await self.stack.wait_ready([ServiceName.LIMITER])
        return self.process

    async def reserve(
        self, key: str, tokens: int, tokens_per_minute: int = 0, requests_per_minute: int = 0
    ) -> limiter_pb2.ReserveResponse:
        return await ask(
            self.bus,
            Subjects.limiter_reserve(partition_of("", key)),
            limiter_pb2.ReserveRequest(
                key_id=key,
                request_id=secrets.token_hex(8),
                input_tokens=tokens,
                tokens_per_minute=tokens_per_minute,
                requests_per_minute=requests_per_minute,
            ),
            limiter_pb2.ReserveResponse,
        )

    async def commit(self, commit: limiter_pb2.CommitRequest) -> limiter_pb2.CommitResponse:
        partition = reservation_partition(commit.reservation_id)
        assert partition is not None
        return await ask(
            self.bus, Subjects.limiter_commit(partition), commit, limiter_pb2.CommitResponse
        )

    async def quota(self, key: str) -> limiter_pb2.GetQuotaResponse:
        assert self.process is not None
        async with self.stack.grpc_channel(ServiceName.LIMITER) as channel:
            stub = limiter_pb2_grpc.QuotaServiceStub(channel)
            reply: limiter_pb2.GetQuotaResponse = await stub.GetQuota(
                limiter_pb2.GetQuotaRequest(key_id=key), timeout=5
            )
            return reply

    async def publish_usage(
        self, key: str, reservation_id: str, tokens: int, *, cache_hit: bool = False
    ) -> None:
        request_id = secrets.token_hex(8)
        event = cost_pb2.UsageEvent(
            request_id=request_id,
            key_id=key,
            reservation_id=reservation_id,
            usage=chat_pb2.Usage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2),
            cache_hit=cache_hit,
            outcome="completed",
        )
        ack = await self.bus.js.publish(
            Subjects.usage(key), event.SerializeToString(), headers={"Nats-Msg-Id": request_id}
        )
        assert not ack.duplicate

    async def wait_settled(self, key: str, timeout: float = 10) -> limiter_pb2.GetQuotaResponse:
        deadline = time.monotonic() + timeout
        while True:
            quota = await self.quota(key)
            if quota.open_reservations == 0 or time.monotonic() > deadline:
                return quota
            await asyncio.sleep(0.05)


def tpm_of(
    resp: limiter_pb2.ReserveResponse | limiter_pb2.GetQuotaResponse,
) -> limiter_pb2.PolicyState:
    return next(p for p in resp.policies if p.name == "tpm")


@pytest.fixture
async def limiter(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> AsyncIterator[LimiterUnderTest]:
    stack = Stack(
        nats_url=nats_server.url,
        state_dir=tmp_path,
        extra_env={
            "SLUICE_LIMITER_DEFAULT_TOKENS_PER_MINUTE": str(TPM),
            "SLUICE_LIMITER_DEFAULT_REQUESTS_PER_MINUTE": str(RPM),
            "SLUICE_LIMITER_SNAPSHOT_INTERVAL_SECONDS": "0.3",
        },
    )
    under_test = LimiterUnderTest(stack, bus)
    try:
        yield under_test
    finally:
        stack.stop_all()


async def test_reserve_and_deny_over_nats(limiter: LimiterUnderTest) -> None:
    await limiter.start()
    key = f"key-{secrets.token_hex(4)}"
    first = await limiter.reserve(key, 80, tokens_per_minute=100)
    assert first.allowed and first.reserved_tokens == 80 and first.reservation_id
    assert {p.name for p in first.policies} == {"tpm", "rpm"}
    assert tpm_of(first).quota == 100 and tpm_of(first).remaining == 20

    denied = await limiter.reserve(key, 30, tokens_per_minute=100)
    assert not denied.allowed and denied.denied_by == "tpm"
    assert 59_000 <= denied.retry_after_ms <= 61_000
    assert tpm_of(denied).remaining == 20

    # The gateway releases the reservation it will not use: the tokens come back.
    commit = limiter_pb2.CommitRequest(reservation_id=first.reservation_id, key_id=key)
    assert first.reservation_id.startswith(f"p{partition_of('', key)}.")
    assert (await limiter.commit(commit)).found
    assert not (await limiter.commit(commit)).found
    assert (await limiter.reserve(key, 100, tokens_per_minute=100)).allowed

    assert limiter.process is not None
    url = f"http://127.0.0.1:{limiter.process.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert re.search(r'sluice_errors_total\{[^}]*code="rate_limited"[^}]*\} 1\.0', text), text
    assert re.search(r'sluice_limiter_decisions_total\{[^}]*result="denied"[^}]*\} 1\.0', text)
    assert re.search(r'sluice_limiter_decisions_total\{[^}]*result="allowed"[^}]*\} 2\.0', text)


async def test_usage_events_reconcile_reservations_once(limiter: LimiterUnderTest) -> None:
    await limiter.start()
    key = f"key-{secrets.token_hex(4)}"
    a = await limiter.reserve(key, 1000)
    b = await limiter.reserve(key, 500)
    assert (await limiter.quota(key)).open_reservations == 2

    await limiter.publish_usage(key, a.reservation_id, 120)
    # The same event delivered twice (as after a lost ack): settles nothing more.
    await limiter.publish_usage(key, a.reservation_id, 120)
    await limiter.publish_usage(key, b.reservation_id, 400, cache_hit=True)

    quota = await limiter.wait_settled(key)
    assert quota.open_reservations == 0
    assert tpm_of(quota).remaining == TPM - 120  # b was a cache hit: zero tokens
    assert next(p for p in quota.policies if p.name == "rpm").remaining == RPM - 2

    # Spans (flushed at stop): each reserve on its partition's subject, each settlement.
    assert limiter.process is not None and limiter.process.stop() == 0
    spans = [
        json.loads(line)
        for line in (limiter.stack.state_dir / "spans" / "limiter.jsonl").read_text().splitlines()
    ]
    mine = [s for s in spans if s["attributes"].get("sluice.key_id") == key]
    subject = Subjects.limiter_reserve(partition_of("", key))
    reserves = [s for s in mine if s["name"] == f"{subject} process"]
    usages = [s for s in mine if s["name"] == f"{Subjects.USAGE_ALL} process"]
    assert len(reserves) == 2 and all(s["attributes"]["sluice.limiter.allowed"] for s in reserves)
    # Each usage event in a CONSUMER span of the partition's owner.
    assert len(usages) == 3 and all(s["kind"] == "CONSUMER" for s in usages)
    assert sorted(s["attributes"]["sluice.limiter.reservation_found"] for s in usages) == [
        False,
        True,
        True,
    ]


async def test_get_quota_of_an_unknown_key_and_without_key(limiter: LimiterUnderTest) -> None:
    await limiter.start()
    quota = await limiter.quota(f"key-{secrets.token_hex(4)}")
    assert tpm_of(quota).quota == TPM and tpm_of(quota).remaining == TPM
    assert tpm_of(quota).reset_ms == 0 and quota.open_reservations == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limiter.quota("")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def loads_grpc(pid: int) -> bool:
    """Whether the process has grpc's core library mapped."""
    return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()


async def test_grpc_loads_with_the_first_caller(limiter: LimiterUnderTest) -> None:
    """The port is bound from the start, but grpc loads in the process only when the
    first caller connects; callers that come together get one server, which then serves
    health (open), refuses a caller without the token and answers one with it."""
    process = await limiter.start()
    assert not loads_grpc(process.process.pid)
    with socket.create_connection(("127.0.0.1", process.grpc_port), timeout=5):
        pass  # the port takes connections before anything is loaded
    assert not loads_grpc(process.process.pid)

    async def health(_: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="sluice.limiter.v1.QuotaService"),
                timeout=20,
            )
            return int(reply.status)

    assert (
        await asyncio.gather(*map(health, range(4))) == [health_pb2.HealthCheckResponse.SERVING] * 4
    )
    assert loads_grpc(process.process.pid)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await limiter_pb2_grpc.QuotaServiceStub(channel).GetQuota(
                limiter_pb2.GetQuotaRequest(key_id="k"), timeout=5
            )
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert tpm_of(await limiter.quota(f"key-{secrets.token_hex(4)}")).quota == TPM
    assert process.stop() == 0
    assert process.log().count("gRPC server started") == 1


async def test_quota_service_is_behind_the_edge(limiter: LimiterUnderTest, bus: Bus) -> None:
    """The runtime's gRPC server refuses callers without the service token, answers a
    SluiceError with the catalogue's status, and continues the caller's trace."""
    process = await limiter.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
        stub = limiter_pb2_grpc.QuotaServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetQuota(limiter_pb2.GetQuotaRequest(key_id="k"), metadata=metadata)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await limiter.quota("")
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(invalid.value.details()).startswith("invalid_request: key_id is required")

    key = f"key-{secrets.token_hex(4)}"
    provider = LocalTracerProvider(Resource.create({"service.name": "operator"}))
    with provider.get_tracer("test").start_as_current_span("operator asks") as caller:
        await limiter.quota(key)
    assert process.stop() == 0
    spans = [
        json.loads(line)
        for line in (limiter.stack.state_dir / "spans" / "limiter.jsonl").read_text().splitlines()
    ]
    [server] = [s for s in spans if s["attributes"].get("sluice.key_id") == key]
    assert server["name"] == "sluice.limiter.v1.QuotaService/GetQuota"
    assert server["kind"] == "SERVER" and server["attributes"]["rpc.grpc.status_code"] == 0
    assert server["parent_span_id"] == f"{caller.get_span_context().span_id:016x}"
    assert server["trace_id"] == f"{caller.get_span_context().trace_id:032x}"


async def test_spend_and_reservations_survive_a_graceful_restart(
    limiter: LimiterUnderTest,
) -> None:
    process = await limiter.start()
    key = f"key-{secrets.token_hex(4)}"
    open_one = await limiter.reserve(key, 1000)
    assert process.stop() == 0

    await limiter.start()
    quota = await limiter.quota(key)
    assert tpm_of(quota).remaining == TPM - 1000 and quota.open_reservations == 1
    # The restored reservation still reconciles.
    await limiter.publish_usage(key, open_one.reservation_id, 10)
    quota = await limiter.wait_settled(key)
    assert quota.open_reservations == 0 and tpm_of(quota).remaining == TPM - 10


async def test_a_stop_settles_the_usage_in_hand_before_the_final_snapshot(
    limiter: LimiterUnderTest,
) -> None:
    """SIGTERM while usage streams in: the final snapshot holds every settlement applied
    with the usage position it reached, and the next owner reads the usage stream from
    there. After a restart all reservations are settled, each at its actual usage; a
    settlement missed would leave its reservation open at the amount it reserved, one
    applied twice would count its tokens twice."""
    process = await limiter.start()
    key = f"key-{secrets.token_hex(4)}"
    count, reserved, actual, quota = 300, 100, 10, 1_000_000
    reservations = [
        (await limiter.reserve(key, reserved, quota, requests_per_minute=count)).reservation_id
        for _ in range(count)
    ]
    assert all(reservations)

    async def publish_all() -> None:
        for n, reservation_id in enumerate(reservations):
            if n == count // 3:
                process.signal(signal.SIGTERM)
            await limiter.publish_usage(key, reservation_id, actual)

    await publish_all()
    assert await asyncio.to_thread(process.process.wait, 30) == 0
    assert "limiter partitions handed over with their final snapshots" in process.log()

    await limiter.start()
    quota_after = await limiter.wait_settled(key, timeout=15)
    assert quota_after.open_reservations == 0
    assert tpm_of(quota_after).remaining == quota - count * actual


async def test_periodic_snapshot_survives_a_crash(limiter: LimiterUnderTest) -> None:
    process = await limiter.start()
    key = f"key-{secrets.token_hex(4)}"
    assert (await limiter.reserve(key, 2000)).allowed
    await asyncio.sleep(1.0)  # a few snapshot intervals
    process.signal(signal.SIGKILL)
    process.process.wait(10)

    await limiter.start()
    # The partition is served again once the killed replica's lease lapsed (the reserve
    # waits for that), with what was reserved before the crash.
    denied = await limiter.reserve(key, TPM - 1999)
    assert not denied.allowed and denied.denied_by == "tpm"
    quota = await limiter.quota(key)
    assert tpm_of(quota).remaining == TPM - 2000 and quota.open_reservations == 1
