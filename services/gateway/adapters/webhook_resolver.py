"""The resolver of webhook deliveries: a connection goes to exactly the addresses that
were checked. Loaded with the webhook client's HTTP session, on the first delivery."""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from services.gateway.domain.jobs.webhooks import AllowList, WebhookRefused, check_addresses


class GuardedResolver(AbstractResolver):
    """Resolves, then refuses forbidden addresses: the connection uses exactly the
    addresses checked, so a DNS answer cannot change between check and connect."""

    def __init__(self, allow: AllowList) -> None:
        self._allow = allow
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        try:
            check_addresses(host, [r["host"] for r in results], self._allow)
        except WebhookRefused as exc:
            raise OSError(str(exc)) from None
        return results

    async def close(self) -> None:
        await self._inner.close()
