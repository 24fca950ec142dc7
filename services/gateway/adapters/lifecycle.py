"""``SLUICE_LIFECYCLE`` (a request's started and finished events) and what a job's
followers read from it and from its token stream."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sluice.bus import NATS_FAILURES, Bus
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.replay import decode_event
from sluice.topology import Streams, Subjects

from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)


def _decode(data: bytes) -> lifecycle_pb2.LifecycleEvent | None:
    event = lifecycle_pb2.LifecycleEvent()
    try:
        event.ParseFromString(data)
    except DecodeError:
        return None
    return event


class FinishWaiter:
    """Resolves with the first ``finished`` event published for one request."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._future: asyncio.Future[lifecycle_pb2.LifecycleEvent] = (
            asyncio.get_running_loop().create_future()
        )
        self._sub: Subscription | None = None

    async def start(self, request_id: str) -> FinishWaiter:
        self._sub = await self._bus.subscribe(Subjects.lifecycle(request_id), self._on_event)
        return self

    async def _on_event(self, msg: Msg) -> None:
        event = _decode(msg.data)
        if event is not None and event.HasField("finished") and not self._future.done():
            self._future.set_result(event)

    async def wait(self, timeout: float) -> lifecycle_pb2.LifecycleEvent | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout=timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self._sub is not None:
            await self._bus.unsubscribe(self._sub)


class JobEvents:
    """A job's lifecycle events and token events, each replayed from its stream's start
    and then followed live, in one queue."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._tokens_prefix = Subjects.stream("")

    async def start(self, job_id: str) -> JobEvents:
        try:
            for subject, stream in (
                (Subjects.lifecycle(job_id), Streams.LIFECYCLE.name),
                (Subjects.stream(job_id), Streams.STREAMS.name),
            ):
                self._subs.append(await self._bus.follow(subject, stream, self._queue.put))
        except NATS_FAILURES:
            await self.close()
            raise unavailable("The job's event streams did not answer.") from None
        return self

    async def get(
        self, wait_seconds: float
    ) -> inference_pb2.StreamEvent | lifecycle_pb2.LifecycleEvent | None:
        while True:
            try:
                msg = await asyncio.wait_for(self._queue.get(), timeout=wait_seconds)
            except TimeoutError:
                return None
            if msg.subject.startswith(self._tokens_prefix):
                token = decode_event(msg.data)
                if token is not None:
                    return token
            else:
                event = _decode(msg.data)
                if event is not None:
                    return event

    async def close(self) -> None:
        for sub in self._subs:
            await self._bus.unsubscribe(sub)
        self._subs.clear()


class NatsLifecycle:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def last(self, request_id: str) -> lifecycle_pb2.LifecycleEvent | None:
        data = await self._bus.last_message(Streams.LIFECYCLE.name, Subjects.lifecycle(request_id))
        return None if data is None else _decode(data)

    async def publish_finished(self, event: lifecycle_pb2.LifecycleEvent) -> None:
        try:
            await self._bus.publish_durable(
                Subjects.lifecycle(event.request_id),
                event,
                msg_id=f"{event.request_id}:finished",
                timeout=self._timeout,
                span_name=Subjects.LIFECYCLE_ALL.removesuffix(".>"),
            )
        except NATS_FAILURES:
            raise unavailable("The lifecycle stream did not accept the event.") from None

    async def watch_finished(self, request_id: str) -> FinishWaiter:
        try:
            return await FinishWaiter(self._bus).start(request_id)
        except NATS_FAILURES:
            raise unavailable("The message bus is not connected.") from None

    async def follow_job(self, job_id: str) -> JobEvents:
        return await JobEvents(self._bus).start(job_id)
