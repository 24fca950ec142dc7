"""Real processes for the resilience suite: NATS, the simulator and every service, with
two gateway-side settings shortened (heartbeat) and a helper to kill and restart one
process. Workers and gateways are tracked by the suite itself, since it runs several of
one kind at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from nats.js.api import DeliverPolicy
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.inference.v1 import inference_pb2
from sluice.keys.v1 import keys_pb2
from sluice.topology import Buckets, ServiceName, Streams, Subjects

from services.gateway.domain.keys import hash_secret
from tests.support.stack import ServiceProcess, Stack
from tests.support.stack import simulator as running_simulator

DEV_KEY = "sk-sluice-resilience-key-0123456789"
OTHER_TEAM_KEY = "sk-sluice-resilience-other-team-42"
HEARTBEAT_SECONDS = 0.5


@dataclass
class Cluster:
    stack: Stack
    nats: EmbeddedNats
    simulator_url: str
    gateways: list[ServiceProcess] = field(default_factory=list)
    workers: list[ServiceProcess] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateways[-1].http_port}"

    def start_gateway(self) -> ServiceProcess:
        proc = self.stack.start(ServiceName.GATEWAY)
        self.gateways.append(proc)
        return proc

    def start_worker(self) -> ServiceProcess:
        proc = self.stack.start(ServiceName.INFERENCE_WORKER)
        self.workers.append(proc)
        return proc

    async def wait_http(self, proc: ServiceProcess, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if proc.process.poll() is not None:
                    raise RuntimeError(f"gateway exited:\n{proc.log()[-3000:]}")
                try:
                    if (await http.get(f"http://127.0.0.1:{proc.http_port}/healthz")).is_success:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("gateway did not come up")

    async def wait_log(self, proc: ServiceProcess, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in proc.log():
                return
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{proc.name} never logged {text!r}")

    async def sim_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            base = self.simulator_url.removesuffix("/v1")
            data: dict[str, Any] = (await http.get(f"{base}/_sim/stats")).json()
            return data

    async def usage_events(self, request_id: str) -> list[cost_pb2.UsageEvent]:
        """Every UsageEvent stored for ``request_id`` (SLUICE_USAGE)."""
        bus = await Bus.connect(self.nats.url, "tests-usage")
        try:
            found: list[cost_pb2.UsageEvent] = []
            try:
                info = await bus.js.stream_info(Streams.USAGE.name)
            except Exception:
                return found
            total = info.state.last_seq
            if not total:
                return found
            done = asyncio.Event()

            async def collect(msg: Any) -> None:
                event = cost_pb2.UsageEvent()
                event.ParseFromString(msg.data)
                if event.request_id == request_id:
                    found.append(event)
                if msg.metadata.sequence.stream >= total:
                    done.set()

            sub = await bus.js.subscribe(
                Subjects.USAGE_ALL,
                stream=Streams.USAGE.name,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                cb=collect,
            )
            await asyncio.wait_for(done.wait(), 10)
            await sub.unsubscribe()
            return found
        finally:
            await bus.close()

    async def stored_events(self, request_id: str) -> list[inference_pb2.StreamEvent]:
        from sluice.replay import read_events

        bus = await Bus.connect(self.nats.url, "tests-history")
        try:
            return await read_events(bus, request_id) or []
        finally:
            await bus.close()


@pytest.fixture(scope="session")
def resilience_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_simulator(tmp_path_factory.mktemp("sim-resilience") / "simulator.log") as url:
        yield url


@pytest.fixture(scope="session")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, resilience_simulator: str
) -> AsyncIterator[Cluster]:
    root = tmp_path_factory.mktemp("resilience")
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={
            "SLUICE_SIMULATOR_URL": resilience_simulator,
            "SLUICE_DEV_API_KEY": DEV_KEY,
            "SLUICE_GATEWAY_SSE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "SLUICE_GATEWAY_CACHE_MODE": "off",
        },
    )
    cluster = Cluster(stack, nats, resilience_simulator)
    try:
        for name in (ServiceName.LIMITER, ServiceName.CACHE, ServiceName.COST_TRACKER):
            stack.start(name)
        cluster.start_worker()
        gateway = cluster.start_gateway()
        await stack.wait_ready(
            [
                ServiceName.LIMITER,
                ServiceName.CACHE,
                ServiceName.COST_TRACKER,
                ServiceName.INFERENCE_WORKER,
                ServiceName.GATEWAY,
            ],
            timeout=90,
        )
        await cluster.wait_http(gateway)
        await _add_key(nats.url, OTHER_TEAM_KEY, key_id="key-other", team_id="team-other")
        yield cluster
    finally:
        for proc in [*cluster.gateways, *cluster.workers]:
            proc.stop(timeout=5)
        stack.stop_all()
        nats.stop()


async def _add_key(url: str, secret: str, *, key_id: str, team_id: str) -> None:
    bus = await Bus.connect(url, "tests-keys")
    try:
        kv = await bus.kv(Buckets.API_KEYS)
        record = keys_pb2.ApiKeyRecord(
            key_id=key_id,
            secret_sha256=hash_secret(secret),
            team_id=team_id,
            name="another team",
            scopes=["*"],
            tier="interactive",
            created_unix=int(time.time()),
        )
        await kv.put(record.secret_sha256, record.SerializeToString())
    finally:
        await bus.close()


# --- SSE helpers ---------------------------------------------------------------------


@dataclass
class SseEvent:
    id: str | None
    event: str | None
    data: str
    retry: int | None = None

    @property
    def sequence(self) -> int:
        assert self.id is not None
        return int(self.id.rsplit(":", 1)[1])

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SseReader:
    """Parses an SSE byte stream incrementally; keeps comments (heartbeats) too."""

    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    _buffer: str = ""

    def feed(self, chunk: str) -> list[SseEvent]:
        self._buffer += chunk
        out: list[SseEvent] = []
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value
            if not data and "id" not in fields and "event" not in fields:
                continue
            event = SseEvent(
                fields.get("id"),
                fields.get("event"),
                "\n".join(data),
                int(fields["retry"]) if "retry" in fields else None,
            )
            out.append(event)
        self.events.extend(out)
        return out


def content_of(events: list[SseEvent]) -> str:
    text = []
    for e in events:
        if e.event is not None or e.data == "[DONE]":
            continue
        for choice in e.json().get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)
