"""The Python client against the real stack: NATS, the simulated provider and the five
services as processes, and a loopback TCP proxy in front of the gateway that the tests
cut to break connections as a network would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from sluice.bus import Bus
from sluice.keys.v1 import keys_pb2
from sluice.topology import Buckets

from services.gateway.domain.keys import hash_secret
from tests.support.full_stack import FullStack, full_stack

CHAT_ONLY_KEY = "sk-sluice-client-chat-only-0123456789"


@pytest.fixture(scope="package")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    root = tmp_path_factory.mktemp("client")
    async with full_stack(
        root,
        gateway_env={
            "SLUICE_GATEWAY_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
            "SLUICE_GATEWAY_WEBHOOK_RETRY_SCHEDULE": "[0, 0.5, 0.5]",
            "SLUICE_GATEWAY_SSE_HEARTBEAT_SECONDS": "1",
        },
    ) as running:
        await running.add_key(
            CHAT_ONLY_KEY, key_id="chat-only", team_id="client-team", scopes=["chat"]
        )
        yield running


async def add_key_with_rpm(stack: FullStack, secret: str, *, requests_per_minute: int) -> None:
    """A key of its own team allowed ``requests_per_minute``, written where the gateway
    reads keys."""
    bus = await Bus.connect(stack.nats.url, "tests-client-keys")
    try:
        kv = await bus.kv(Buckets.API_KEYS)
        record = keys_pb2.ApiKeyRecord(
            key_id="rpm-" + secret[-8:],
            secret_sha256=hash_secret(secret),
            team_id="rpm-team-" + secret[-8:],
            name="rpm",
            scopes=["chat"],
            requests_per_minute=requests_per_minute,
        )
        await kv.put(record.secret_sha256, record.SerializeToString())
    finally:
        await bus.close()


class CutProxy:
    """A TCP proxy on 127.0.0.1 that runs its own event loop in a thread (so that sync
    and async clients alike can go through it) and can break connections on demand:
    ``cut()`` closes every open connection at once; ``cut_after(seconds)`` closes the
    next connection that long after it opened; ``cut_after_event(marker)`` closes the
    next connection right after the first whole SSE event containing ``marker`` was
    relayed to the client, whatever the timing; ``refuse`` closes new ones at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refuse = False
        self.connections = 0
        self.cuts = 0
        self._pending_cut_after: float | None = None
        self._pending_marker: bytes | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CutProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    def stop(self) -> None:
        self._call(self._stop()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> int:
        """Closes every open connection; returns how many."""
        return self._call(self._cut()).result(10)

    def cut_after(self, seconds: float) -> None:
        self._pending_cut_after = seconds

    def cut_after_event(self, marker: bytes) -> None:
        self._pending_marker = marker

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()

    async def _cut(self) -> int:
        victims = list(self._open)
        for writer in victims:
            writer.transport.abort()
        self._open -= set(victims)
        self.cuts += len(victims)
        return len(victims)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        timer = None
        if self._pending_cut_after is not None:
            delay, self._pending_cut_after = self._pending_cut_after, None
            timer = self._loop.call_later(delay, lambda: self._call(self._cut()))

        marker, self._pending_marker = self._pending_marker, None

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, marker: bytes | None = None
        ) -> None:
            seen = b""
            try:
                while chunk := await src.read(65536):
                    if marker is not None:
                        at = (seen + chunk).find(marker)
                        end = (seen + chunk).find(b"\n\n", at) if at >= 0 else -1
                        if end >= 0:
                            dst.write(chunk[: end + 2 - len(seen)])
                            await dst.drain()
                            await self._cut()
                            return
                        seen += chunk
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer, marker))
        if timer is not None:
            timer.cancel()
        self._open.discard(writer)
        self._open.discard(up_writer)


@pytest.fixture
def proxy(stack: FullStack) -> Iterator[CutProxy]:
    assert stack.gateway.http_port is not None
    running = CutProxy(stack.gateway.http_port).start()
    try:
        yield running
    finally:
        running.stop()
