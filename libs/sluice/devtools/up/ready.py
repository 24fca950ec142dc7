"""``python -m sluice.devtools.up.ready NATS_URL LIMIT_SECONDS SERVICE...``: ask each
service on its NATS health subject until all answer ready.

``sluice up``'s supervisor runs this as a short-lived process of its own: the NATS
client and an event loop (about 15 MiB resident) load here and are gone when it ends,
never in the supervisor, which lives as long as the product. So that the supervisor can
read ``READY_TIMED_OUT`` from here, this module imports asyncio and the bus only when it
runs.

Each round prints one JSON line, ``{"pending": [...], "elapsed": seconds}``; the exit
status is 0 once every service is ready, ``READY_TIMED_OUT`` after the limit, 1 when
NATS cannot be asked (the reason on stderr).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable

from sluice.topology import ServiceName, Subjects

READY_TIMED_OUT = 3


async def wait_services_ready(
    nats_url: str,
    names: list[ServiceName],
    limit_seconds: float,
    *,
    on_tick: Callable[[set[ServiceName], float], None] | None = None,
) -> None:
    """Ask every service on ``Subjects.health(<service>)`` until all answer ready.

    ``on_tick(pending, elapsed)`` runs between rounds; it may raise to abort the wait.
    """
    import asyncio

    from sluice.bus import Bus
    from sluice.common.v1 import chat_pb2

    bus = await Bus.connect(nats_url, "sluice-up")
    try:
        start = time.monotonic()
        pending = set(names)

        async def probe(name: ServiceName) -> None:
            with contextlib.suppress(Exception):
                status = await bus.request(
                    Subjects.health(name),
                    chat_pb2.ServiceStatus(),
                    chat_pb2.ServiceStatus,
                    timeout=0.5,
                )
                if status.ready:
                    pending.discard(name)

        while pending:
            await asyncio.gather(*(probe(n) for n in sorted(pending)))
            elapsed = time.monotonic() - start
            if on_tick is not None:
                on_tick(pending, elapsed)
            if not pending:
                break
            if elapsed > limit_seconds:
                raise TimeoutError(
                    f"not ready after {limit_seconds:.0f}s: {', '.join(sorted(pending))}"
                )
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


def main(argv: list[str]) -> int:
    import asyncio

    nats_url, limit, *names = argv
    # The probe connection's own reconnect chatter is not news here.
    logging.getLogger("sluice.bus").setLevel(logging.ERROR)

    def tick(pending: set[ServiceName], elapsed: float) -> None:
        sys.stdout.write(json.dumps({"pending": sorted(pending), "elapsed": elapsed}) + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(
            wait_services_ready(
                nats_url, [ServiceName(n) for n in names], float(limit), on_tick=tick
            )
        )
    except TimeoutError as exc:
        sys.stderr.write(f"{exc}\n")
        return READY_TIMED_OUT
    except Exception as exc:
        sys.stderr.write(f"{exc!r}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
