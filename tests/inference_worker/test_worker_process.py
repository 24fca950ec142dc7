"""The worker as its own process, started the way the launcher and the e2e suite do."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice.topology import ServiceName

from tests.inference_worker.conftest import new_work, run, usage_events
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def stack(
    nats_server: EmbeddedNats, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    stack = Stack(
        nats_url=nats_server.url,
        state_dir=tmp_path_factory.mktemp("worker-state"),
        extra_env={"SLUICE_SIMULATOR_URL": sim_url, "SLUICE_WORKER_LONG_POLL_SECONDS": "1"},
    )
    try:
        yield stack
    finally:
        stack.stop_all()


async def test_worker_process_serves_work_health_and_stops_cleanly(stack: Stack, bus: Bus) -> None:
    proc = stack.start(ServiceName.INFERENCE_WORKER)
    await stack.wait_ready([ServiceName.INFERENCE_WORKER], timeout=60)

    work = new_work(stream=True, sim={"output_tokens": 5})
    result = await run(bus, work, timeout=15)
    assert result.final.model_served == "sim-fast" and result.final.provider == "simulator"
    # Tokens that reach the worker together leave as one delta; the last ends the choice.
    assert "".join(d.content for d in result.deltas)
    assert result.deltas[-1].finish_reason == "stop"
    assert result.final.usage.output_tokens == 5
    [usage] = await usage_events(bus, work.key_id)
    assert usage.outcome == "completed" and usage.trace_id

    async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        # Health answers without a token (probes send none); the provider state does not.
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(
            health_pb2.HealthCheckRequest(service="sluice.inference.v1.ProviderHealthService")
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await inference_pb2_grpc.ProviderHealthServiceStub(channel).GetProviderHealth(
                inference_pb2.ProviderHealthRequest()
            )
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with stack.grpc_channel(ServiceName.INFERENCE_WORKER) as channel:
        providers = await inference_pb2_grpc.ProviderHealthServiceStub(channel).GetProviderHealth(
            inference_pb2.ProviderHealthRequest()
        )
    by_name = {p.provider: p for p in providers.providers}
    assert by_name["simulator"].circuit == "closed"
    assert by_name["simulator"].requests_total >= 1
    assert "qwen2.5-coder-0.5b" in by_name["local-llama"].models

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{proc.metrics_port}/metrics") as resp,
    ):
        exposition = await resp.text()
    for family in (
        "sluice_jetstream_pending",
        "sluice_queue_wait_seconds_count",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_client_token_usage",
        "gen_ai_client_operation_duration_seconds_count",
    ):
        assert family in exposition, family
    assert 'consumer="worker-interactive"' in exposition
    assert 'priority="batch"' in exposition

    proc.signal(signal.SIGTERM)
    assert proc.process.wait(20) == 0, proc.log()[-3000:]
    assert "inference-worker stopped" in proc.log()
