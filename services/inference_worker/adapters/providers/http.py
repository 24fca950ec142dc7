"""What every HTTP provider adapter shares: one pooled aiohttp session per provider for
the process, and the timeouts of one call."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import aiohttp
from sluice.catalog import ProviderConfig


class PooledHttpProvider(ABC):
    """Base of the adapters: ``path`` is the endpoint under the provider's base URL,
    ``headers`` what every call sends (credentials included, read at call time)."""

    path = ""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._url = config.base_url.rstrip("/") + self.path
        self._session: aiohttp.ClientSession | None = None

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """What every call sends: content type, credentials, API version."""

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; one pool per provider for the process.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_connections,
                    limit_per_host=self.config.max_connections,
                    keepalive_timeout=30,
                    ttl_dns_cache=300,
                ),
                headers=self.headers(),
                # Long tool-call chunks exceed the 64 KiB default line buffer.
                read_bufsize=1024 * 1024,
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _timeout(self, deadline: float | None, stream: bool) -> aiohttp.ClientTimeout:
        total: float | None = None if stream else self.config.timeout_seconds
        if deadline is not None:
            remaining = max(0.001, deadline - time.monotonic())
            total = remaining if total is None else min(total, remaining)
        return aiohttp.ClientTimeout(
            total=total,
            connect=self.config.connect_timeout_seconds,
            # Headers and the gap between two stream chunks are bounded by timeout_seconds.
            sock_read=self.config.timeout_seconds,
        )
