"""The breakers shared by every worker through the ``sluice_breakers`` bucket.

When a breaker here changes state, its ``BreakerRecord`` is written under the
deployment's name (in the background: a request never waits for it). Every worker
follows the bucket (an ordered consumer: the stored records first, then each change)
and applies what another worker wrote, so a deployment one replica opened (for errors
or slowness) is skipped by every replica within the bucket's delivery time. Open
records carry an absolute time (``open_until_unix_nanos``), so a late reader opens its
breaker for what is left of the cooldown, not for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sluice.bus import NATS_FAILURES, Bus
from sluice.inference.v1 import inference_pb2
from sluice.metrics import GAUGES, Reading
from sluice.topology import Buckets

from services.inference_worker.domain.circuit import CircuitRegistry, CircuitState, Transition

log = logging.getLogger(__name__)


class SharedBreakers:
    def __init__(self, bus: Bus, circuits: CircuitRegistry, worker_id: str) -> None:
        self._bus = bus
        self._circuits = circuits
        self._worker = worker_id
        self._sub: Subscription | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.applied = 0

    async def start(self) -> None:
        await self._bus.kv(Buckets.BREAKERS)
        self._circuits.on_change = self._changed
        bucket = Buckets.BREAKERS
        self._sub = await self._bus.follow(
            bucket.key_subject(">"), bucket.stream_name, self._on_record
        )

    async def stop(self) -> None:
        self._circuits.on_change = None
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=1.0)
        if self._sub is not None:
            with contextlib.suppress(*NATS_FAILURES):
                await self._sub.unsubscribe()
            self._sub = None

    # --- ours, written --------------------------------------------------------------

    def _changed(self, transition: Transition) -> None:
        now = time.time_ns()
        record = inference_pb2.BreakerRecord(
            deployment=transition.deployment,
            provider=transition.provider,
            state=str(transition.state),
            open_until_unix_nanos=now + int(transition.open_for * 1e9)
            if transition.state is CircuitState.OPEN
            else 0,
            reason=transition.reason,
            worker=self._worker,
            changed_unix_nanos=now,
            failure_rate=transition.failure_rate,
            avoid_until_unix_nanos=now + int(transition.avoid_for * 1e9)
            if transition.avoid_for > 0
            else 0,
        )
        task = asyncio.get_running_loop().create_task(self._write(record))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, record: inference_pb2.BreakerRecord) -> None:
        try:
            kv = await self._bus.kv(Buckets.BREAKERS)
            await kv.put(record.deployment, record.SerializeToString())
        except NATS_FAILURES:
            # This worker's breaker still holds; the others learn at the next change.
            log.warning("breaker of %s not shared", record.deployment)

    # --- theirs, applied ------------------------------------------------------------

    async def _on_record(self, msg: Msg) -> None:
        if not msg.data:
            return
        record = inference_pb2.BreakerRecord()
        try:
            record.ParseFromString(msg.data)
        except Exception:
            log.warning("unreadable breaker record on %s", msg.subject)
            return
        if record.worker == self._worker or not record.deployment:
            return
        try:
            state = CircuitState(record.state)
        except ValueError:
            return
        now = time.time_ns()
        open_for = max(0.0, (record.open_until_unix_nanos - now) / 1e9)
        avoid_for = max(0.0, (record.avoid_until_unix_nanos - now) / 1e9)
        self._circuits.get(record.deployment, record.provider).apply_shared(
            state, open_for, record.reason, avoid_for
        )
        self.applied += 1


def breaker_records(circuits: CircuitRegistry) -> list[inference_pb2.BreakerRecord]:
    """Every breaker this worker holds, as records (gRPC health)."""
    now = time.time_ns()
    out = []
    for name, breaker in sorted(circuits.breakers.items()):
        state = breaker.current()
        out.append(
            inference_pb2.BreakerRecord(
                deployment=name,
                provider=breaker.provider,
                state=str(state),
                open_until_unix_nanos=now + int(breaker.open_for() * 1e9)
                if state is CircuitState.OPEN
                else 0,
                reason=breaker.reason,
                failure_rate=breaker.failure_rate(),
                avoid_until_unix_nanos=now + int(breaker.avoid_for() * 1e9)
                if breaker.avoided()
                else 0,
            )
        )
    return out


_STATE_VALUE = {CircuitState.CLOSED: 0.0, CircuitState.HALF_OPEN: 1.0, CircuitState.OPEN: 2.0}


def breaker_gauge(circuits: CircuitRegistry) -> None:
    """``sluice_breaker_state{deployment,provider}``: 0 closed, 1 half-open, 2 open."""

    def read() -> list[Reading]:
        return [
            (_STATE_VALUE[b.current()], {"deployment": name, "provider": b.provider})
            for name, b in list(circuits.breakers.items())
        ]

    GAUGES.add(
        "sluice.breaker.state",
        "{state}",
        "Breaker of each deployment: 0 closed, 1 half-open, 2 open",
        read,
    )
