"""Recording usage: price each event, commit a batch to the ledger, announce new rows.

The order is the guarantee: a consumer acks a message only after ``record`` returned
for its batch, so a crash before the commit redelivers it; the ledger ignores a request
id it already holds and only new rows are announced (``announce``). A crash between
commit and announcement loses that one live cost event (core NATS is at-most-once
anyway), never a ledger row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from opentelemetry import metrics
from sluice.cost.v1 import cost_pb2
from sluice.metrics import instruments

from services.cost_tracker.domain.usage import LedgerEntry, Pricer, nanos_to_float

log = logging.getLogger(__name__)


class LedgerWriter(Protocol):
    async def record(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        """Insert ``entries`` in one transaction; per entry, whether it was new. Raises,
        having rolled the whole batch back, when it could not commit."""


class CostEventSink(Protocol):
    """Where the cost events of new rows go (every subscriber, over NATS)."""

    async def publish(self, event: cost_pb2.CostEvent) -> None: ...


class UsageRecorder:
    def __init__(self, ledger: LedgerWriter, pricer: Pricer, events: CostEventSink) -> None:
        self.ledger = ledger
        self.pricer = pricer
        self.events = events
        self.recorded = 0
        self.duplicates = 0
        self._cost_counter = instruments().cost_usd
        self._unpriced_counter = metrics.get_meter("sluice.cost_tracker").create_counter(
            "sluice.cost.unpriced",
            unit="{event}",
            description="Usage events of models without a price, recorded at zero cost",
        )

    def price(
        self, event: cost_pb2.UsageEvent, *, headers: Mapping[str, str] | None, stream_seq: int
    ) -> LedgerEntry:
        """The ledger entry of a delivered event; raises ``InvalidUsageEvent`` for one
        that can never be recorded. A model without a price is counted and, once per
        model, logged."""
        entry = self.pricer.price_delivered(event, headers=headers, stream_seq=stream_seq)
        if not entry.priced:
            self._unpriced_counter.add(1, {"model": entry.model})
            if self.pricer.first_time_unpriced(entry.model):
                log.warning(
                    "model %r has no price in the price table (version %s); "
                    "its usage is recorded at zero cost",
                    entry.model,
                    entry.price_version,
                )
        return entry

    async def record(self, entries: Sequence[LedgerEntry]) -> list[bool]:
        """Commit a batch; per entry, whether it is a new row."""
        return await self.ledger.record(entries)

    async def announce(self, entry: LedgerEntry, new: bool) -> None:
        """After the commit: a new row is counted and published as a ``CostEvent`` (in the
        caller's span, so subscribers continue its trace); a duplicate is only counted."""
        if not new:
            self.duplicates += 1
            return
        self.recorded += 1
        self._cost_counter.add(
            nanos_to_float(entry.total_cost_nanos), {"model": entry.model, "key_id": entry.key_id}
        )
        try:
            await self.events.publish(entry.to_cost_event())
        except Exception:
            # The row is committed; the live event is best effort (see the module doc).
            log.warning("cost event publish failed for %s", entry.request_id)
