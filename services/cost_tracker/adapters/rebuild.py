"""Rebuild the ledger by replaying SLUICE_USAGE from its first message.

The ledger is a materialized view of the usage stream, so it can always be made again:
``python -m services.cost_tracker --rebuild`` (or ``SLUICE_COST_REBUILD=true``) reads
the stream with an ephemeral ordered consumer (no acks, no durable state touched, so the
live ``cost-ledger`` consumer keeps its position), prices each event exactly as the live
consumer does, and writes the rows into a new ledger that replaces the old one only once
the replay reached the stream's last message at the start of the rebuild, then exits.
A failed rebuild leaves the old ledger untouched. Where the new ledger is made:

- SQLite: a fresh file beside the ledger, swapped in with an atomic rename
  (``adapters.ledger.sqlite_rebuilding``). Stop the cost-tracker first: the swap
  replaces the file under any open connection.
- PostgreSQL: the derived tables emptied and refilled in one transaction
  (``PostgresLedger.rebuilding``), which commits at the end. Replicas still running
  wait on its lock and carry on after it; stopping them first is still the simple way.

Either way, events published meanwhile stay unacked on the durable consumer and are
recorded, idempotently, when the service runs again; spend alerts already raised are
kept. No cost events are published: subscribers saw them when they were first
recorded. Events are priced with the current ``prices.yaml`` (each row keeps
``price_version``); events older than the stream's retention (90 days) are gone from
the rebuilt ledger.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from sluice.bus import Bus
from sluice.cost.v1 import cost_pb2
from sluice.topology import Streams, Subjects

from services.cost_tracker.domain.recording import LedgerWriter
from services.cost_tracker.domain.usage import InvalidUsageEvent, LedgerEntry, Pricer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    messages: int
    recorded: int
    skipped: int
    last_stream_seq: int


async def rebuild_ledger(
    bus: Bus,
    target: AbstractAsyncContextManager[LedgerWriter],
    pricer: Pricer,
    *,
    where: str,
    batch_size: int = 1000,
    idle_timeout: float = 10.0,
) -> RebuildReport:
    """Replay SLUICE_USAGE into ``target`` (a new ledger that replaces the old one when
    the context exits without an error)."""
    async with target as ledger:
        report = await _replay(bus, ledger, pricer, batch_size, idle_timeout)
    log.info(
        "ledger rebuilt at %s: %d messages, %d rows, %d skipped, up to stream seq %d",
        where,
        report.messages,
        report.recorded,
        report.skipped,
        report.last_stream_seq,
    )
    return report


async def _replay(
    bus: Bus, ledger: LedgerWriter, pricer: Pricer, batch_size: int, idle_timeout: float
) -> RebuildReport:
    # Up to the tail as it is now (Bus.replay); later events belong to the live consumer.
    messages = recorded = skipped = last_seq = 0
    batch: list[LedgerEntry] = []
    replay = bus.replay(Streams.USAGE.name, Subjects.USAGE_ALL, idle_timeout=idle_timeout)
    async with contextlib.aclosing(replay) as msgs:
        try:
            async for msg in msgs:
                messages += 1
                last_seq = int(msg.metadata.sequence.stream)
                try:
                    event = cost_pb2.UsageEvent()
                    event.ParseFromString(msg.data)
                    batch.append(
                        pricer.price_delivered(event, headers=msg.headers, stream_seq=last_seq)
                    )
                except (DecodeError, InvalidUsageEvent) as exc:
                    # The live consumer terminates these too: they never had a row.
                    log.warning("skipping poison usage message on %s: %s", msg.subject, exc)
                    skipped += 1
                if len(batch) >= batch_size:
                    recorded += sum(await ledger.record(batch))
                    batch.clear()
        except TimeoutError as exc:
            raise RuntimeError(
                f"usage stream replay stalled after {messages} messages "
                f"(the last at stream seq {last_seq})"
            ) from exc
    recorded += sum(await ledger.record(batch))
    return RebuildReport(messages, recorded, skipped, last_seq)
