"""Resuming stays exact when the gateway batches tokens (several deltas in one SSE
event, carrying the id of the last): a stack of its own with batching on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from sluice_client import AsyncSluice

from tests.client.conftest import CutProxy
from tests.client.test_streams import PROMPT, slow, stored_stream
from tests.support.full_stack import DEV_KEY, FullStack, full_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
async def batched(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    async with full_stack(
        tmp_path_factory.mktemp("client-batched"),
        gateway_env={
            "SLUICE_GATEWAY_SSE_BATCH_MAX_DELTAS": "6",
            "SLUICE_GATEWAY_SSE_BATCH_MAX_MS": "60",
            "SLUICE_GATEWAY_CACHE_MODE": "off",
        },
    ) as running:
        yield running


@pytest.fixture
def batched_proxy(batched: FullStack) -> Iterator[CutProxy]:
    assert batched.gateway.http_port is not None
    running = CutProxy(batched.gateway.http_port).start()
    try:
        yield running
    finally:
        running.stop()


async def test_cuts_in_a_batched_stream_lose_and_repeat_no_token(
    batched: FullStack, batched_proxy: CutProxy
) -> None:
    sim = slow(120, 80)
    async with AsyncSluice(DEV_KEY, base_url=batched_proxy.url, max_retries=6) as client:
        stream = await client.chat.completions.stream(
            model="sim-fast", messages=PROMPT, max_tokens=120, sim=sim
        )
        chunks = []
        cuts = 0
        async for chunk in stream:
            chunks.append(chunk)
            # Cut the live connection only: once the previous cut was resumed.
            if cuts < 3 and len(chunks) >= 3 * (cuts + 1) and stream.resumes == cuts:
                cuts += await asyncio.to_thread(batched_proxy.cut) > 0
    assert stream.resumes == 3
    # Batched: fewer events than tokens, and their ids skip sequences.
    assert len([c for c in chunks if c.text]) < 120
    assert stream.stream_id is not None
    stored = await stored_stream(batched, stream.stream_id)
    stored_text = "".join(
        choice["delta"].get("content") or "" for _id, c in stored for choice in c["choices"]
    )
    assert stream.text == stored_text
    assert len(stream.text.split()) == 120
    assert await batched.sim_count(sim["id"]) == 1
