"""The cache as a real process (``python -m services.cache``) on the suite's NATS, and the
KV adapter against real JetStream KV."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.inference.v1 import inference_pb2
from sluice.topology import ServiceName, Subjects

from services.cache.adapters.store import KvEntryStore
from services.cache.domain import encode_entry
from tests.support.stack import ServiceProcess, Stack

pytestmark = pytest.mark.integration


def answer(text: str) -> inference_pb2.Final:
    return inference_pb2.Final(
        model_served="m",
        provider="p",
        response_id=text,
        usage=chat_pb2.Usage(input_tokens=5, output_tokens=2),
        choices=[chat_pb2.Choice(index=0, finish_reason="stop")],
    )


@dataclass
class CacheUnderTest:
    bus: Bus
    stack: Stack
    process: ServiceProcess

    async def lookup(self, key: str) -> cache_pb2.LookupResponse:
        return await self.bus.request(
            Subjects.CACHE_LOOKUP, cache_pb2.LookupRequest(cache_key=key), cache_pb2.LookupResponse
        )

    async def store(self, key: str, final: inference_pb2.Final, ttl: int = 0) -> None:
        await self.bus.publish(
            Subjects.CACHE_STORE,
            cache_pb2.StoreRequest(cache_key=key, answer=final, ttl_seconds=ttl),
        )

    async def wait_hit(self, key: str, timeout: float = 5) -> cache_pb2.LookupResponse:
        deadline = time.monotonic() + timeout
        while True:
            resp = await self.lookup(key)
            if resp.hit or time.monotonic() > deadline:
                return resp
            await asyncio.sleep(0.02)

    def admin(self, channel: grpc.aio.Channel) -> cache_pb2_grpc.CacheAdminServiceAsyncStub:
        return cache_pb2_grpc.CacheAdminServiceStub(channel)  # type: ignore[return-value]

    def channel(self) -> grpc.aio.Channel:
        return self.stack.grpc_channel(ServiceName.CACHE)


def new_key() -> str:
    return secrets.token_hex(32)


@pytest.fixture
async def cache(
    nats_server: EmbeddedNats, bus: Bus, tmp_path: Path
) -> AsyncIterator[CacheUnderTest]:
    stack = Stack(nats_url=nats_server.url, state_dir=tmp_path)
    try:
        process = stack.start(ServiceName.CACHE)
        await stack.wait_ready([ServiceName.CACHE])
        yield CacheUnderTest(bus, stack, process)
    finally:
        stack.stop_all()


async def test_miss_store_then_hit(cache: CacheUnderTest) -> None:
    key = new_key()
    assert not (await cache.lookup(key)).hit
    await cache.store(key, answer("first"))
    hit = await cache.wait_hit(key)
    assert hit.hit and hit.answer == answer("first") and hit.age_seconds == 0
    # A store of the same key replaces the answer.
    await cache.store(key, answer("second"))
    deadline = time.monotonic() + 5
    while (await cache.lookup(key)).answer.response_id != "second":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_entry_expires_by_its_own_ttl_and_is_deleted(cache: CacheUnderTest, bus: Bus) -> None:
    key = new_key()
    await cache.store(key, answer("short"), ttl=1)
    assert (await cache.wait_hit(key)).hit
    await asyncio.sleep(1.1)
    assert not (await cache.lookup(key)).hit
    store = await KvEntryStore.open(bus)
    deadline = time.monotonic() + 5
    while await store.get(key) is not None:
        assert time.monotonic() < deadline, "expired entry was not deleted"
        await asyncio.sleep(0.05)


async def test_stats_and_invalidate_over_grpc(cache: CacheUnderTest) -> None:
    k1, k2 = new_key(), new_key()
    await cache.store(k1, answer("one"))
    await cache.store(k2, answer("two"))
    assert (await cache.wait_hit(k1)).hit
    assert (await cache.wait_hit(k2)).hit
    await cache.lookup(new_key())

    async with cache.channel() as channel:
        admin = cache.admin(channel)
        stats = await admin.Stats(cache_pb2.StatsRequest(), timeout=5)
        assert stats.stores == 2 and stats.hits == 2
        assert stats.lookups >= 3 and stats.lookups - stats.hits >= 1
        assert stats.entries >= 2

        removed = await admin.Invalidate(cache_pb2.InvalidateRequest(cache_key=k1), timeout=5)
        assert removed.removed == 1
        assert not (await cache.lookup(k1)).hit
        assert (await cache.lookup(k2)).hit
        again = await admin.Invalidate(cache_pb2.InvalidateRequest(cache_key=k1), timeout=5)
        assert again.removed == 0

        everything = await admin.Invalidate(cache_pb2.InvalidateRequest(), timeout=5)
        assert everything.removed >= 1
        assert not (await cache.lookup(k2)).hit
        after = await admin.Stats(cache_pb2.StatsRequest(), timeout=5)
        assert after.entries == 0
        assert after.lookups == stats.lookups + 3 and after.hits == stats.hits + 1

    url = f"http://127.0.0.1:{cache.process.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    hits = re.search(r'sluice_cache_lookups_total\{[^}]*result="hit"[^}]*\} (\d+)', text)
    misses = re.search(r'sluice_cache_lookups_total\{[^}]*result="miss"[^}]*\} (\d+)', text)
    assert hits and misses, text
    assert int(hits.group(1)) == after.hits
    assert int(hits.group(1)) + int(misses.group(1)) == after.lookups


async def test_kv_store_deletes_only_the_revision_it_saw(bus: Bus) -> None:
    store = await KvEntryStore.open(bus)
    key = new_key()
    await store.put(key, encode_entry(answer("old"), 0, 1))
    stale = await store.get(key)
    assert stale is not None
    await store.put(key, encode_entry(answer("new"), 0, 60))
    await store.delete_if_unchanged(key, stale[1])
    current = await store.get(key)
    assert current is not None and current[1] != stale[1]
    await store.delete_if_unchanged(key, current[1])
    assert await store.get(key) is None
    assert await store.remove(key) == 0
