from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A NATS server with JetStream that the suite starts itself, on a free port."""
    store: Path = tmp_path_factory.mktemp("nats")
    server = EmbeddedNats.start(store, log_file=store / "nats.log")
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "tests")
    await b.ensure_topology()
    yield b
    await b.close()
