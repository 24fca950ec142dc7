"""Exact-cache rules and the cache in memory: envelope, freshness, TTL, counters."""

from __future__ import annotations

from sluice.cache.v1 import cache_pb2
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2

from services.cache.domain import (
    Cache,
    age_if_fresh,
    decode_entry,
    effective_ttl,
    encode_entry,
    valid_key,
)

T0 = 1_700_000_000_000


def answer(text: str = "hello") -> inference_pb2.Final:
    return inference_pb2.Final(
        model_served="m",
        provider="p",
        usage=chat_pb2.Usage(input_tokens=3, output_tokens=1),
        response_id=text,
    )


class DictStore:
    """An ``EntryStore`` in a dict, with revisions like KV."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.revision = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        self.data[key] = (value, self.revision)

    async def delete_if_unchanged(self, key: str, revision: int) -> None:
        if key in self.data and self.data[key][1] == revision:
            del self.data[key]

    async def remove(self, key: str) -> int:
        return 1 if self.data.pop(key, None) is not None else 0

    async def clear(self) -> int:
        n = len(self.data)
        self.data.clear()
        return n

    async def count(self) -> int:
        return len(self.data)


def test_keys_must_be_one_kv_token() -> None:
    assert valid_key("ab" * 32)
    assert not valid_key("")
    assert not valid_key("a.b") and not valid_key("a*") and not valid_key("a b")
    assert not valid_key("a" * 257)


def test_ttl_defaults_and_is_capped_by_the_bucket() -> None:
    assert effective_ttl(0, 600, 3600) == 600
    assert effective_ttl(30, 600, 3600) == 30
    assert effective_ttl(86_400, 600, 3600) == 3600


def test_envelope_round_trip_and_freshness_edge() -> None:
    entry = decode_entry(encode_entry(answer(), T0, 10))
    assert entry is not None and entry.answer == answer() and entry.ttl_seconds == 10
    assert age_if_fresh(entry, T0 + 9_999) == 9
    assert age_if_fresh(entry, T0 + 10_000) is None
    assert decode_entry(b"\xff\xff not a proto") is None
    assert decode_entry(cache_pb2.CacheEntry(ttl_seconds=5).SerializeToString()) is None


async def test_lookup_store_hit_and_counters() -> None:
    now = [T0]
    h = Cache(DictStore(), default_ttl_seconds=60, max_ttl_seconds=3600, clock=lambda: now[0])
    miss = await h.lookup(cache_pb2.LookupRequest(cache_key="abc123"))
    assert not miss.hit
    await h.store_answer(cache_pb2.StoreRequest(cache_key="abc123", answer=answer()))
    now[0] += 2_500
    hit = await h.lookup(cache_pb2.LookupRequest(cache_key="abc123"))
    assert hit.hit and hit.answer == answer() and hit.age_seconds == 2
    assert (h.stats.lookups, h.stats.hits, h.stats.stores) == (2, 1, 1)
    assert h.results == {"miss": 1, "hit": 1}


async def test_expired_entry_is_a_miss_and_is_deleted() -> None:
    now = [T0]
    store = DictStore()
    h = Cache(store, default_ttl_seconds=60, max_ttl_seconds=3600, clock=lambda: now[0])
    await h.store_answer(cache_pb2.StoreRequest(cache_key="k1", answer=answer(), ttl_seconds=5))
    now[0] += 5_000
    assert not (await h.lookup(cache_pb2.LookupRequest(cache_key="k1"))).hit
    await h.finish()
    assert await store.count() == 0
    assert h.results == {"expired": 1}


async def test_invalid_requests_are_misses_and_not_stored() -> None:
    store = DictStore()
    h = Cache(store, default_ttl_seconds=60, max_ttl_seconds=3600)
    assert not (await h.lookup(cache_pb2.LookupRequest(cache_key="a.>"))).hit
    await h.store_answer(cache_pb2.StoreRequest(cache_key="a.>", answer=answer()))
    await h.store_answer(cache_pb2.StoreRequest(cache_key="ok"))
    assert await store.count() == 0 and h.stats.stores == 0
