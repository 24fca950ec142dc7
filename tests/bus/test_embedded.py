"""The embedded NATS server's optional monitoring endpoint, which ``make bench`` reads
to count messages per service."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import nats
from sluice.devtools.embedded import EmbeddedNats, free_port, server_env


async def test_monitoring_counts_messages_per_named_connection(tmp_path: Path) -> None:
    monitor = free_port()
    server = EmbeddedNats.start(tmp_path / "nats", monitor_port=monitor)
    try:
        nc = await nats.connect(server.url, name="sluice-probe")
        for _ in range(3):
            await nc.publish("probe.subject", b"x")
        await nc.flush()
        # The server adds a read's messages to the connection's count after parsing the
        # whole read, which can be just after it answered the flush: look again briefly.
        counted = None
        deadline = time.monotonic() + 5
        while counted != 3 and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz") as resp:
                connz = json.load(resp)
            [probe] = [c for c in connz["connections"] if c.get("name") == "sluice-probe"]
            counted = probe["in_msgs"]
            if counted != 3:
                await asyncio.sleep(0.02)
        await nc.close()
    finally:
        server.stop()
    assert counted == 3


def test_monitoring_is_off_unless_asked(tmp_path: Path) -> None:
    server = EmbeddedNats.start(tmp_path / "nats")
    try:
        assert "-m" not in list(server.process.args)  # type: ignore[arg-type]
    finally:
        server.stop()


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    from sluice.devtools.embedded import _ephemeral_floor

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports), "never the same port twice in a process"
    floor = _ephemeral_floor()
    if floor - 15_000 >= 1_000:
        assert all(15_000 <= p < floor for p in ports), "no outgoing connection takes them"


def test_the_embedded_server_runs_on_one_go_processor_unless_told(tmp_path: Path) -> None:
    assert server_env({})["GOMAXPROCS"] == "1"
    assert server_env({"SLUICE_NATS_GOMAXPROCS": "2"})["GOMAXPROCS"] == "2"
    assert server_env({"GOMAXPROCS": "4"})["GOMAXPROCS"] == "4"
    assert "GOMAXPROCS" not in server_env({"GOMAXPROCS": "3", "SLUICE_NATS_GOMAXPROCS": "auto"})
    monitor = free_port()
    server = EmbeddedNats.start(tmp_path / "nats", monitor_port=monitor)
    try:
        # The running server reports its processors in /varz.
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz") as resp:
            varz = json.load(resp)
    finally:
        server.stop()
    assert varz["gomaxprocs"] == 1
