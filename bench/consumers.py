"""CPU per message of the consumer frameworks, on the subscriber's side only.

A child process (``python -m bench.consumers <nats url>``, on uvloop as the services run)
holds every variant; this process sends it the load and asks it, over a control
subject, for its own CPU time before and after each run. Variants alternate within
each round and medians over the rounds are quoted, since the machine is shared.

- Core request/reply (the hot path, e.g. ``limiter.reserve``): a ``ReserveRequest``
  decoded and a ``ReserveResponse`` returned, by ``Bus.serve`` (nats-py), by a stock
  faststream subscriber (its dependency injection on, as documented) and by one with
  ``apply_types=False``. Requests are sent 100 at a time.
- JetStream pull, batches of 64: ``UsageEvent`` messages stored first (each with a
  ``traceparent``), then one consumer started, run until every message is settled and
  stopped: a nats-py fetch loop as the services have it (span per message, decode,
  ack), the same acking only the batch's last message under AckAll, faststream's stock
  pull subscriber (``PullSub(64)``, acks by its middleware), and ``sluice.consumers``
  with per-message acks and with AckAll.

No tracer provider is installed in the child, so spans are no-ops in every variant:
the figures are the frameworks' own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.bus import Bus, consumer_config
from sluice.common.v1 import chat_pb2
from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.devtools.embedded import EmbeddedNats
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import ConsumerSpec

from bench.report import table

CONTROL = "bench.consumers.control"
CORE_VARIANTS = {
    "natspy": "nats-py, Bus.serve",
    "faststream": "faststream subscriber (dependency injection on)",
    "faststream-raw": "faststream subscriber, apply_types=False",
}
PULL_VARIANTS = {
    "natspy-each": "nats-py fetch loop, ack per message",
    "natspy-all": "nats-py fetch loop, AckAll (one ack per batch)",
    "faststream-each": "faststream PullSub(64), ack per message",
    "sluice-each": "sluice.consumers, ack per message",
    "sluice-all": "sluice.consumers, AckAll",
}
BATCH = 64
IN_FLIGHT = 100


def stream_name(variant: str) -> str:
    return "BENCH_" + variant.upper().replace("-", "_")


def subject_of(variant: str) -> str:
    return f"bench.pull.{variant}"


def reserve_request(i: int) -> bytes:
    return limiter_pb2.ReserveRequest(
        request_id=f"req-{i:08d}",
        key_id="key_0123456789abcdef",
        team_id="team_0123456789",
        model="qwen2.5-coder-0.5b",
        input_tokens=412,
        max_output_tokens=256,
    ).SerializeToString()


def reserve_reply(request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
    return limiter_pb2.ReserveResponse(
        allowed=True,
        reservation_id=request.request_id,
        reserved_tokens=request.input_tokens + request.max_output_tokens,
    )


def usage_event(i: int) -> bytes:
    return cost_pb2.UsageEvent(
        request_id=f"req-{i:08d}",
        key_id="key_0123456789abcdef",
        team_id="team_0123456789",
        model_requested="qwen2.5-coder-0.5b",
        model_served="qwen2.5-coder-0.5b",
        provider="llamacpp",
        usage=chat_pb2.Usage(input_tokens=412, output_tokens=128),
        occurred_unix_nanos=time.time_ns(),
        outcome="completed",
        trace_id=secrets.token_hex(16),
    ).SerializeToString()


# --- the child: every variant, and CPU readings on request --------------------------------


class Child:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.tracer = trace.get_tracer("bench")
        self.brokers: list[NatsBroker] = []

    async def start(self, url: str) -> None:
        async def natspy(
            request: limiter_pb2.ReserveRequest, _msg: Msg
        ) -> limiter_pb2.ReserveResponse:
            return reserve_reply(request)

        await self.bus.serve("bench.core.natspy", limiter_pb2.ReserveRequest, natspy)

        injected = NatsBroker(url, logger=None)

        @injected.subscriber("bench.core.faststream")
        async def with_injection(body: bytes) -> bytes:
            return reserve_reply(limiter_pb2.ReserveRequest.FromString(body)).SerializeToString()

        raw = NatsBroker(url, logger=None, apply_types=False)

        @raw.subscriber("bench.core.faststream-raw")
        async def without_injection(body: bytes) -> bytes:
            return reserve_reply(limiter_pb2.ReserveRequest.FromString(body)).SerializeToString()

        for broker in (injected, raw):
            await broker.start()
            self.brokers.append(broker)
        self.pull_broker = NatsBroker(url, logger=None)
        await self.pull_broker.start()
        self.brokers.append(self.pull_broker)

        async def control(msg: Msg) -> None:
            order = orjson.loads(msg.data)
            if order["op"] == "pull":
                spent = await self.pull(order["variant"], int(order["n"]))
                await msg.respond(orjson.dumps({"cpu": spent}))
            else:
                await msg.respond(orjson.dumps({"cpu": time.process_time()}))

        await self.bus.subscribe(CONTROL, control)

    async def pull(self, variant: str, n: int) -> float:
        """Consume ``n`` stored messages with one variant; the CPU it took."""
        done = asyncio.Event()
        handled = 0

        def count() -> None:
            nonlocal handled
            handled += 1
            if handled == n:
                done.set()

        started = time.process_time()
        stop = await {
            "natspy-each": lambda: self.natspy_loop(variant, count, done, ack_all=False),
            "natspy-all": lambda: self.natspy_loop(variant, count, done, ack_all=True),
            "faststream-each": lambda: self.faststream_pull(variant, count),
            "sluice-each": lambda: self.sluice(variant, count),
            "sluice-all": lambda: self.sluice(variant, count),
        }[variant]()
        await done.wait()
        await stop()
        await self.bus.flush()
        return time.process_time() - started

    def process_span(self, msg: Msg) -> Any:
        return self.tracer.start_as_current_span(
            f"{subject_of('x')} process",
            context=telemetry.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        )

    async def natspy_loop(
        self, variant: str, count: Callable[[], None], done: asyncio.Event, *, ack_all: bool
    ) -> Callable[[], Awaitable[None]]:
        sub = await self.bus.js.pull_subscribe_bind(durable="bench", stream=stream_name(variant))

        async def loop() -> None:
            while not done.is_set():
                try:
                    msgs = await sub.fetch(BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    with self.process_span(msg):
                        cost_pb2.UsageEvent.FromString(msg.data)
                        if not ack_all:
                            await msg.ack()
                        count()
                if ack_all and msgs:
                    await msgs[-1].ack()

        task = asyncio.create_task(loop())

        async def stop() -> None:
            await task
            await sub.unsubscribe()

        return stop

    async def faststream_pull(
        self, variant: str, count: Callable[[], None]
    ) -> Callable[[], Awaitable[None]]:
        subscriber = self.pull_broker.subscriber(
            subject_of(variant),
            stream=JStream(stream_name(variant), declare=False),
            durable="bench",
            pull_sub=PullSub(batch_size=BATCH, timeout=1.0),
        )

        @subscriber
        async def handle(body: bytes) -> None:
            cost_pb2.UsageEvent.FromString(body)
            count()

        await subscriber.start()
        return subscriber.stop

    async def sluice(
        self, variant: str, count: Callable[[], None]
    ) -> Callable[[], Awaitable[None]]:
        async def handle(_event: cost_pb2.UsageEvent, _delivery: Delivery) -> None:
            count()

        consumer = DurableConsumer(
            ConsumerBroker(self.bus),
            spec(variant),
            cost_pb2.UsageEvent,
            handle,
            batch=BATCH,
            fetch_timeout=1.0,
            tracer=self.tracer,
        )
        await consumer.start()
        return consumer.stop


def spec(variant: str) -> ConsumerSpec:
    return ConsumerSpec(
        stream=stream_name(variant),
        durable="bench",
        filter_subject=subject_of(variant),
        max_ack_pending=-1,
        ack_policy="all" if variant.endswith("-all") else "explicit",
    )


async def child_main(url: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bus = await Bus.connect(url, "bench-consumers")
    child = Child(bus)
    await child.start(url)
    await asyncio.Event().wait()


# --- this process: the load, the rounds, the table ------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds of another process (user and system), from /proc: clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_now(nc: NatsClient) -> float:
    reply = await nc.request(CONTROL, orjson.dumps({"op": "cpu"}), timeout=10)
    return float(orjson.loads(reply.data)["cpu"])


async def core_round(nc: NatsClient, server: int, variant: str, requests: int) -> Sample:
    """µs of CPU per request/reply on one variant: the child's, the server's."""
    subject = f"bench.core.{variant}"
    payloads = [reserve_request(i) for i in range(requests)]
    server_before = process_cpu(server)
    before = await cpu_now(nc)
    for start in range(0, requests, IN_FLIGHT):
        await asyncio.gather(
            *(nc.request(subject, p, timeout=10) for p in payloads[start : start + IN_FLIGHT])
        )
    after = await cpu_now(nc)
    return Sample(
        (after - before) / requests * 1e6,
        (process_cpu(server) - server_before) / requests * 1e6,
    )


async def store_messages(nc: NatsClient, variant: str, n: int) -> None:
    js = nc.jetstream()
    name = stream_name(variant)
    await js.purge_stream(name)
    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
    for i in range(n):
        await nc.publish(subject_of(variant), usage_event(i), headers=headers)
    await nc.flush()
    deadline = time.monotonic() + 30
    while (await js.stream_info(name)).state.messages < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not store {n} messages")
        await asyncio.sleep(0.02)


async def pull_round(nc: NatsClient, server: int, variant: str, n: int) -> Sample:
    """µs of CPU per message for one variant to settle ``n`` stored messages: the
    child's, and the server's (delivering, taking the acks)."""
    await store_messages(nc, variant, n)
    server_before = process_cpu(server)
    reply = await nc.request(
        CONTROL, orjson.dumps({"op": "pull", "variant": variant, "n": n}), timeout=120
    )
    spent = float(orjson.loads(reply.data)["cpu"])
    # The run counts only if every message was settled.
    js = nc.jetstream()
    deadline = time.monotonic() + 10
    while True:
        info = await js.consumer_info(stream_name(variant), "bench")
        last = (await js.stream_info(stream_name(variant))).state.last_seq
        if info.num_ack_pending == 0 and info.ack_floor and info.ack_floor.stream_seq == last:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{variant}: not every message was acked ({info})")
        await asyncio.sleep(0.05)
    return Sample(spent / n * 1e6, (process_cpu(server) - server_before) / n * 1e6)


async def prepare_streams(nc: NatsClient) -> None:
    js = nc.jetstream()
    for variant in PULL_VARIANTS:
        name = stream_name(variant)
        await js.add_stream(StreamConfig(name=name, subjects=[subject_of(variant)]))
        await js.add_consumer(name, consumer_config(spec(variant)))


@dataclass(frozen=True)
class Sample:
    client_us: float
    server_us: float


def summary(samples: dict[str, list[Sample]], labels: dict[str, str]) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, values in samples.items():
        client = [v.client_us for v in values]
        server = [v.server_us for v in values]
        rows.append(
            [
                labels[name],
                statistics.median(client),
                min(client),
                max(client),
                statistics.median(server),
            ]
        )
    return rows


def median_client(values: list[Sample]) -> float:
    return statistics.median(v.client_us for v in values)


def median_server(values: list[Sample]) -> float:
    return statistics.median(v.server_us for v in values)


async def consumers_tables(*, rounds: int, requests: int, messages: int) -> str:
    with tempfile.TemporaryDirectory(prefix="sluice-bench-consumers-") as tmp:
        server = EmbeddedNats.start(Path(tmp) / "nats")
        server_pid = server.process.pid
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.consumers", server.url
        )
        nc = await nats.connect(server.url, name="bench-load")
        try:
            await prepare_streams(nc)
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await cpu_now(nc)
                    break
                if child.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bench's consumer process did not start")
                await asyncio.sleep(0.2)
            core: dict[str, list[Sample]] = {name: [] for name in CORE_VARIANTS}
            pull: dict[str, list[Sample]] = {name: [] for name in PULL_VARIANTS}
            # One round unmeasured: imports, first subscriptions and caches warm up.
            for name in CORE_VARIANTS:
                await core_round(nc, server_pid, name, min(requests, 500))
            for name in PULL_VARIANTS:
                await pull_round(nc, server_pid, name, BATCH * 4)
            for _ in range(rounds):
                for name in CORE_VARIANTS:
                    core[name].append(await core_round(nc, server_pid, name, requests))
                for name in PULL_VARIANTS:
                    pull[name].append(await pull_round(nc, server_pid, name, messages))
        finally:
            await nc.close()
            child.terminate()
            await asyncio.wait_for(child.wait(), 10)
            server.stop()
    columns = ["CPU µs/message (median)", "min", "max", "nats-server µs/message (median)"]
    core_table = table(["core request/reply", *columns], summary(core, CORE_VARIANTS))
    pull_table = table(
        [f"JetStream pull, batches of {BATCH}", *columns], summary(pull, PULL_VARIANTS)
    )
    med = {name: median_client(v) for name, v in {**core, **pull}.items()}
    srv = {name: median_server(v) for name, v in pull.items()}
    return (
        f"{core_table}\n"
        f"faststream - nats-py: {med['faststream'] - med['natspy']:+.0f} µs per request "
        f"(apply_types=False: {med['faststream-raw'] - med['natspy']:+.0f})\n\n"
        f"{pull_table}\n"
        f"sluice.consumers - nats-py loop, ack per message: "
        f"{med['sluice-each'] - med['natspy-each']:+.0f} µs per message\n"
        f"AckAll saves, per message: {med['sluice-each'] - med['sluice-all']:.0f} µs in the "
        f"consumer (nats-py loop: {med['natspy-each'] - med['natspy-all']:.0f}) and "
        f"{srv['sluice-each'] - srv['sluice-all']:.0f} µs in nats-server "
        f"(nats-py loop: {srv['natspy-each'] - srv['natspy-all']:.0f})\n"
        f"{rounds} rounds of {requests:,} requests and {messages:,} messages per variant; "
        "nats-server CPU is read from /proc in clock ticks (10 ms)"
    )


if __name__ == "__main__":
    asyncio.run(child_main(sys.argv[1]))
