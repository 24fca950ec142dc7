"""Duplicate windows: nats-server holds every message id seen within a stream's window in
memory, so the streams written once per request keep minutes, and a stream an older
version made with a day's window is brought down to it at the next start."""

from __future__ import annotations

import dataclasses
import uuid

from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats
from sluice.topology import (
    NO_DEDUPLICATION_WINDOW_SECONDS,
    PER_REQUEST_DUPLICATE_WINDOW_MAX_SECONDS,
    Streams,
)

# Written once per request (or per event of one): every id lands in a window.
PER_REQUEST = (
    Streams.INFER,
    Streams.STREAMS,
    Streams.USAGE,
    Streams.LIFECYCLE,
    Streams.AUDIT,
    Streams.LIMITER_JOURNAL,
    Streams.WEBHOOKS,
)


async def test_streams_written_per_request_keep_minutes_of_ids(bus: Bus) -> None:
    for spec in PER_REQUEST:
        info = await bus.js.stream_info(spec.name)
        window = info.config.duplicate_window or 0.0
        assert window <= PER_REQUEST_DUPLICATE_WINDOW_MAX_SECONDS, spec.name
    # Nothing on these carries an id: not the server's 2 min default that a 0 would give.
    for spec in (Streams.STREAMS, Streams.AUDIT, Streams.LIMITER_JOURNAL):
        info = await bus.js.stream_info(spec.name)
        assert info.config.duplicate_window == NO_DEDUPLICATION_WINDOW_SECONDS, spec.name
    usage = await bus.js.stream_info(Streams.USAGE.name)
    assert usage.config.duplicate_window and usage.config.duplicate_window > 0, (
        "usage events stay deduplicated by request id"
    )


async def test_a_days_window_from_an_older_version_is_brought_down_at_start(
    nats_server: EmbeddedNats,
) -> None:
    name = f"OLD_USAGE_{uuid.uuid4().hex[:8].upper()}"
    subject = f"old.{name.lower()}.>"
    wide = dataclasses.replace(
        Streams.USAGE, name=name, subjects=(subject,), duplicate_window_seconds=24 * 3600
    )
    bus = await Bus.connect(nats_server.url, "tests")
    try:
        await bus.ensure_stream(wide)
        assert (await bus.js.stream_info(name)).config.duplicate_window == 24 * 3600
        # Stored messages stay; the window follows the declared one.
        await bus.js.publish(subject.replace(">", "k"), b"x", headers={"Nats-Msg-Id": "r1"})
        await bus.ensure_stream(dataclasses.replace(Streams.USAGE, name=name, subjects=(subject,)))
        info = await bus.js.stream_info(name)
        assert info.config.duplicate_window == Streams.USAGE.duplicate_window_seconds
        assert info.state.messages == 1
        # Still deduplicated within the new window.
        again = await bus.js.publish(subject.replace(">", "k"), b"x", headers={"Nats-Msg-Id": "r1"})
        assert again.duplicate
        assert (await bus.js.stream_info(name)).state.messages == 1
    finally:
        await bus.js.delete_stream(name)
        await bus.close()
