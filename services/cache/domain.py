"""Exact-cache rules: the stored envelope, freshness, key shape, counters.

An entry is a ``cache_pb2.CacheEntry`` (the answer, when it was stored, its TTL). The
KV bucket has its own TTL, which bounds every entry; the per-entry TTL lets a store ask
for less, and is checked on lookup because the bucket TTL cannot vary per key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError
from sluice.cache.v1 import cache_pb2
from sluice.inference.v1 import inference_pb2

# One KV token: what a hex digest (or any id of these characters) can be, and nothing
# that NATS reads as a subject separator or wildcard.
_KEY = re.compile(r"[A-Za-z0-9_=-]{1,256}")


def valid_key(cache_key: str) -> bool:
    return _KEY.fullmatch(cache_key) is not None


def effective_ttl(requested_seconds: int, default_seconds: int, max_seconds: int) -> int:
    """The TTL an entry gets: what was asked (or the default), never above the bucket's."""
    ttl = requested_seconds if requested_seconds > 0 else default_seconds
    return min(ttl, max_seconds) if max_seconds > 0 else ttl


def encode_entry(answer: inference_pb2.Final, stored_unix_ms: int, ttl_seconds: int) -> bytes:
    return cache_pb2.CacheEntry(
        answer=answer, stored_unix_ms=stored_unix_ms, ttl_seconds=ttl_seconds
    ).SerializeToString()


def decode_entry(data: bytes) -> cache_pb2.CacheEntry | None:
    """The envelope, or None for bytes that are not one (treated as a miss)."""
    entry = cache_pb2.CacheEntry()
    try:
        entry.ParseFromString(data)
    except DecodeError:
        return None
    return entry if entry.HasField("answer") else None


def age_if_fresh(entry: cache_pb2.CacheEntry, now_unix_ms: int) -> int | None:
    """Age in whole seconds while the entry is fresh; None once its TTL has passed."""
    age_ms = max(0, now_unix_ms - entry.stored_unix_ms)
    if entry.ttl_seconds > 0 and age_ms >= entry.ttl_seconds * 1000:
        return None
    return age_ms // 1000


@dataclass
class CacheStats:
    """Counters of this instance since it started."""

    lookups: int = 0
    # Exact and semantic.
    hits: int = 0
    stores: int = 0
    semantic_lookups: int = 0
    semantic_hits: int = 0


class EntryStore(Protocol):
    """Where entries live (JetStream KV in the service, a dict in handler tests)."""

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and its revision, or None."""

    async def put(self, key: str, value: bytes) -> None: ...

    async def delete_if_unchanged(self, key: str, revision: int) -> None:
        """Delete unless a newer revision was stored meanwhile."""

    async def remove(self, key: str) -> int:
        """Remove one key; 1 if it held an entry, else 0."""

    async def clear(self) -> int:
        """Remove every entry; how many there were."""

    async def count(self) -> int: ...
