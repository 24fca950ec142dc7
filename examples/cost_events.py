"""Print Sluice's cost events as they happen, one line each: when, key, model, tokens,
USD and the request's trace id.

    .venv/bin/python examples/cost_events.py [--nats nats://127.0.0.1:4222] [--key KEY_ID]

A faststream application, the documented way for a service to subscribe to Sluice's
events (docs/asyncapi.json describes them all). Cost events are core NATS: it sees the
ones published while it runs. Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage
from sluice.cost.v1 import cost_pb2
from sluice.events import COST_RECORDED


def describe(event: cost_pb2.CostEvent, trace_id: str) -> str:
    at = datetime.fromtimestamp(event.occurred_unix_nanos / 1e9, tz=UTC)
    return (
        f"{at.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}  "
        f"key={event.key_id}  model={event.model}  "
        f"tokens={event.usage.input_tokens}+{event.usage.output_tokens}  "
        f"usd={event.total_cost_usd:.6f}  trace={trace_id or '-'}"
    )


def trace_id_of(headers: dict[str, str]) -> str:
    """The trace id of a W3C ``traceparent`` header (version-traceid-spanid-flags)."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


def build(nats_url: str, key_id: str | None) -> FastStream:
    subject = COST_RECORDED.subject.replace("{key_id}", key_id) if key_id else None
    broker = NatsBroker(nats_url, logger=None)
    app = FastStream(broker, logger=None)

    @broker.subscriber(subject or COST_RECORDED.every_subject)
    async def on_cost(body: bytes, message: NatsMessage) -> None:
        event = cost_pb2.CostEvent.FromString(body)
        print(describe(event, trace_id_of(message.headers)), flush=True)

    @app.after_startup
    async def listening() -> None:
        # Once the server has the subscription: from here on no event is missed.
        await broker.connection.flush()
        where = subject or COST_RECORDED.every_subject
        print(f"listening for cost events on {where} at {nats_url}", file=sys.stderr, flush=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="the NATS URL")
    parser.add_argument("--key", help="only this API key's events (its id)")
    args = parser.parse_args()
    asyncio.run(build(args.nats, args.key).run())


if __name__ == "__main__":
    main()
