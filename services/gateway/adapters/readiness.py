"""Readiness: every service asked over NATS whether it is ready (the data path itself,
not a side channel), answers reused for a short while; and the deployments' breakers
as the workers share them in the ``sluice_breakers`` bucket, followed as they change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sluice.bus import NATS_FAILURES, Bus
from sluice.common.v1 import chat_pb2
from sluice.inference.v1 import inference_pb2
from sluice.topology import ALL_SERVICES, Buckets, Subjects

from services.gateway.domain.console import BreakerView
from services.gateway.domain.health import NATS, OpenBreaker

log = logging.getLogger(__name__)


class Readiness:
    def __init__(
        self,
        bus: Bus,
        cache_seconds: float,
        timeout: float = 0.5,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self._bus = bus
        self._breakers = breakers
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._checked_at = -1e9
        self._last: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def _ask(self, service: str) -> bool:
        try:
            reply = await self._bus.request_raw(
                Subjects.health(service), b"", timeout=self._timeout
            )
        except NATS_FAILURES:
            return False
        status = chat_pb2.ServiceStatus()
        status.ParseFromString(reply)
        return status.ready

    def open_breakers(self) -> list[OpenBreaker]:
        return self._breakers.open() if self._breakers is not None else []

    async def check(self) -> dict[str, bool]:
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self._cache_seconds:
                return self._last
            if not self._bus.connected:
                # Named, so that /readyz says why nothing answers.
                result = {NATS: False, **{str(s): False for s in ALL_SERVICES}}
            else:
                answers = await asyncio.gather(*(self._ask(str(s)) for s in ALL_SERVICES))
                result = {str(s): ok for s, ok in zip(ALL_SERVICES, answers, strict=True)}
            self._last = result
            self._checked_at = time.monotonic()
            return result


class BreakerBoard:
    """The shared breakers, kept in memory from a follow of the bucket (the stored
    records, then each change): ``/readyz`` reads them without a round trip."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._records: dict[str, inference_pb2.BreakerRecord] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        bucket = Buckets.BREAKERS
        await self._bus.kv(bucket)
        self._sub = await self._bus.follow(
            bucket.key_subject(">"), bucket.stream_name, self._on_record
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_record(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(Buckets.BREAKERS.key_subject(""))
        if not msg.data:
            self._records.pop(key, None)
            return
        record = inference_pb2.BreakerRecord()
        try:
            record.ParseFromString(msg.data)
        except Exception:
            log.warning("unreadable breaker record for %s", key)
            return
        self._records[key] = record

    def open(self) -> list[OpenBreaker]:
        """Deployments whose breaker is open or half-open now."""
        now = time.time_ns()
        out = []
        for record in self._records.values():
            if record.state == "closed":
                continue
            left = max(0.0, (record.open_until_unix_nanos - now) / 1e9)
            # An open record past its cooldown is half-open: probes decide.
            state = "open" if record.state == "open" and left > 0 else "half_open"
            out.append(OpenBreaker(record.deployment, record.provider, state, record.reason, left))
        return out

    def all(self) -> list[BreakerView]:
        """Every deployment's breaker as last written (an open one past its cooldown
        is half-open)."""
        now = time.time_ns()
        out = []
        for record in self._records.values():
            left = max(0.0, (record.open_until_unix_nanos - now) / 1e9)
            state = record.state
            if state == "open" and left <= 0:
                state = "half_open"
            out.append(
                BreakerView(
                    deployment=record.deployment,
                    provider=record.provider,
                    state=state,
                    reason=record.reason,
                    seconds_left=left,
                    failure_rate=record.failure_rate,
                    changed_unix_nanos=record.changed_unix_nanos,
                )
            )
        return out
