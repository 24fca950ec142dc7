"""The gRPC door (``sluice.grpc_door``) as a byte relay: the server behind it is made
once, by the first connection, whoever comes together with it; a start that failed is
tried again by the next caller; bytes pass both ways unchanged, a half-close included;
closing the door ends the relays. (A service process behind it, grpc and all:
tests/limiter/test_service.py.)"""

from __future__ import annotations

import asyncio

import pytest
from sluice.grpc_door import INNER_HOST, GrpcDoor


class EchoServer:
    """Answers each connection with what it got, upper-cased, and closes after EOF."""

    def __init__(self, failures: int = 0) -> None:
        self.starts = 0
        self.failures = failures
        self.server: asyncio.Server | None = None

    async def open(self) -> int:
        self.starts += 1
        await asyncio.sleep(0.05)  # callers arriving meanwhile wait for this start
        if self.starts <= self.failures:
            raise RuntimeError("cannot start")
        self.server = await asyncio.start_server(self._echo, INNER_HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_the_first_callers_start_one_server_and_bytes_pass_both_ways() -> None:
    echo = EchoServer()
    door = GrpcDoor(echo.open)
    port = await door.bind("127.0.0.1", 0)
    assert port and not door.opened and echo.starts == 0
    big = b"x" * 300_000  # more than one read of the relay
    answers = await asyncio.gather(*(exchange(port, b"call %d " % i + big) for i in range(5)))
    assert answers == [(b"call %d " % i + big).upper() for i in range(5)]
    assert echo.starts == 1 and door.opened
    await door.close()
    echo.close()


async def test_a_failed_start_is_tried_again_by_the_next_caller() -> None:
    echo = EchoServer(failures=1)
    door = GrpcDoor(echo.open)
    port = await door.bind("127.0.0.1", 0)
    assert await exchange(port, b"first") == b""  # closed: nothing behind the door yet
    assert not door.opened
    assert await exchange(port, b"second") == b"SECOND"
    assert echo.starts == 2 and door.opened
    await door.close()
    echo.close()


async def test_closing_the_door_ends_open_relays_and_refuses_new_callers() -> None:
    echo = EchoServer()
    door = GrpcDoor(echo.open)
    port = await door.bind("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"never finished")  # no EOF: the relay stays open
    await asyncio.sleep(0.2)
    await asyncio.wait_for(door.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    echo.close()
