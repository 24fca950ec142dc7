"""``python -m services.gateway`` as the launcher starts it: ready over NATS, the dev key,
and a SIGTERM that lets an open stream finish."""

from __future__ import annotations

import asyncio
import os
import signal
import stat

import httpx
import pytest
from sluice.inference.v1 import inference_pb2
from sluice.topology import ServiceName

from tests.gateway.harness import FakeServices, answer
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def fake(bus):
    services = FakeServices(bus)
    await services.start()
    yield services
    await services.stop()


async def test_process_starts_generates_a_dev_key_and_stops_gracefully(nats_server, tmp_path, fake):
    stack = Stack(nats_url=nats_server.url, state_dir=tmp_path / "state")
    env = {"SLUICE_DEV_API_KEY": ""}
    os.environ.pop("SLUICE_DEV_API_KEY", None)
    proc = stack.start(ServiceName.GATEWAY, env=env)
    release = asyncio.Event()

    async def slow_stream(work, services):
        await services.emit(
            work, inference_pb2.StreamEvent(sequence=1, delta=inference_pb2.Delta(content="first "))
        )
        await release.wait()
        await services.emit(
            work, inference_pb2.StreamEvent(sequence=2, delta=inference_pb2.Delta(content="last"))
        )
        await services.emit(work, inference_pb2.StreamEvent(sequence=3, final=answer("first last")))

    fake.scenario = slow_stream
    try:
        await stack.wait_ready([ServiceName.GATEWAY], timeout=30)
        key_file = tmp_path / "state" / "dev-key"
        secret = key_file.read_text().strip()
        assert secret.startswith("sk-sluice-")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert secret not in proc.log()

        base = f"http://127.0.0.1:{proc.http_port}"
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {secret}"}, timeout=20
        ) as http:
            assert (await http.get("/healthz")).status_code == 200
            models = await http.get("/v1/models")
            assert models.status_code == 200 and models.json()["object"] == "list"
            assert (await http.get("/metrics")).status_code == 200

            body = {
                "model": "sim-fast",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                first = ""
                while "first" not in first:
                    first = await anext(lines)
                # SIGTERM with the stream open: it must still end normally.
                proc.signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                release.set()
                rest = [line async for line in lines]
            assert "data: [DONE]" in rest
            assert any("last" in line for line in rest)
        assert await asyncio.to_thread(proc.process.wait, 20) == 0
    finally:
        stack.stop_all()
