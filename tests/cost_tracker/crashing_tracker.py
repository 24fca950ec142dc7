"""The cost-tracker's own parts (``CostTracker``: ledger, recorder, usage consumer) in a
process of their own, for a test to SIGKILL: ``python -m tests.cost_tracker.crashing_tracker
<nats url> <key id> <durable> <ack wait seconds> <batch size> <ledger> <prices>``.

The durable differs from the service's (``Consumers.COST_USAGE``) in two ways: it reads
the usage of one key, so that earlier tests' usage on the suite's stream stays out of
the test's batches, and its ack wait is short, so that what the kill leaves unacked
comes back within the test rather than after 30 s. The batch size is the service's
setting (``SLUICE_COST_BATCH_SIZE``).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from sluice.bus import Bus
from sluice.consumers import ConsumerBroker
from sluice.settings import CommonSettings
from sluice.topology import Consumers, Subjects

from services.cost_tracker.app import CostTracker
from services.cost_tracker.settings import CostTrackerSettings


async def main(
    url: str, key: str, durable: str, ack_wait: float, batch: int, ledger: Path, prices: Path
) -> None:
    settings = CostTrackerSettings(
        batch_size=batch,
        ledger_path=ledger,
        prices_path=prices,
        consumer_durable=durable,
        common=CommonSettings(nats_url=url, state_dir=ledger.parent),
    )
    bus = await Bus.connect(url, "crashing-cost-tracker")
    tracker = CostTracker(settings)
    spec = replace(
        Consumers.COST_USAGE,
        durable=durable,
        filter_subject=Subjects.usage(key),
        ack_wait_seconds=ack_wait,
    )
    await tracker.start(bus, ConsumerBroker(bus), consumer_spec=spec)
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, key, durable, ack_wait, batch, ledger, prices = sys.argv[1:8]
    asyncio.run(main(url, key, durable, float(ack_wait), int(batch), Path(ledger), Path(prices)))
