"""A service's gRPC port, with grpc loaded when the first caller connects.

Every service answers gRPC (operator queries behind ``sluice.grpc_edge``, and the
standard health service), but nothing on a request's path calls it: health and
readiness go over NATS. grpc's core library and a started grpc.aio server cost about
16 MiB resident in each process (docs/architecture.md, "Memory"), five times over. The
door binds the service's port at start, as the server did, so the port is held, bound
where the settings say and refused to nobody; the first connection makes the server:
grpc is imported on a thread (the event loop keeps serving meanwhile), the server is
built and started on a loopback port of its own, and from then on the door relays each
connection's bytes to it, both ways, until either side closes. A process that is never
asked over gRPC never loads it.

The relay is a byte pipe, not a gRPC proxy: HTTP/2, the caller's metadata (its token,
its trace context) and every status reach the server and the caller unchanged, and the
edge still refuses a caller without the token. Its cost (one more loopback hop, a
copy in this process) falls on operator queries alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Where the server behind the door listens: loopback, on a port the system picks.
INNER_HOST = "127.0.0.1"
_CHUNK = 64 * 1024


class GrpcDoor:
    """Binds a gRPC port; ``open_server`` (run once, on the first connection) starts the
    server and returns the loopback port it listens on."""

    def __init__(self, open_server: Callable[[], Awaitable[int]]) -> None:
        self._open_server = open_server
        self._inner: asyncio.Future[int] | None = None
        self._listener: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def opened(self) -> bool:
        """Whether the server behind the door was started."""
        return self._inner is not None and self._inner.done() and not self._inner.exception()

    async def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); the port bound."""
        self._listener = await asyncio.start_server(self._on_connection, host, port)
        return int(self._listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop taking connections and end the relays (after the server's own stop)."""
        if self._listener is not None:
            self._listener.close()
        for relay in list(self._relays):
            relay.cancel()
        if self._relays:
            await asyncio.gather(*self._relays, return_exceptions=True)

    async def _inner_port(self) -> int:
        if self._inner is None or (self._inner.done() and self._inner.exception()):
            # One start, whoever connects first; a start that failed is tried again by
            # the next caller.
            self._inner = asyncio.ensure_future(self._open_server())
        return await asyncio.shield(self._inner)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        relay = asyncio.current_task()
        if relay is not None:
            self._relays.add(relay)  # type: ignore[arg-type]
        try:
            try:
                port = await self._inner_port()
                inner_reader, inner_writer = await asyncio.open_connection(INNER_HOST, port)
            except Exception:
                log.exception("the gRPC server could not be started; connection closed")
                return
            try:
                await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
            finally:
                inner_writer.close()
        finally:
            writer.close()
            if relay is not None:
                self._relays.discard(relay)  # type: ignore[arg-type]


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Bytes from ``source`` to ``sink`` until the source ends (then half-close the sink)
    or either side fails (then close the sink, which ends the other direction too)."""
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        with contextlib.suppress(Exception):
            sink.close()
