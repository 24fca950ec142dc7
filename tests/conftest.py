from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats

from tests.support.postgres import PostgresServer, fresh_database, postgres_server


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server the suite starts itself (or SLUICE_TEST_DATABASE_URL's)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
async def database_url(postgres: PostgresServer) -> AsyncIterator[str]:
    """A database of the test's own on that server."""
    async with fresh_database(postgres.url) as url:
        yield url
