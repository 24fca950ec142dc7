"""Webhook delivery: per-team signing secrets in the ``sluice_webhook_secrets`` bucket,
and the HTTP client that posts signed deliveries to exactly the addresses it checked."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import socket
import time
from datetime import UTC, datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.jobs.v1 import jobs_pb2

from services.gateway.domain.jobs.webhooks import (
    SECRET_PREFIX,
    AllowList,
    AttemptResult,
    WebhookRefused,
    check_addresses,
    check_url,
    sign,
    team_token,
)

log = logging.getLogger(__name__)


class KvWebhookSecrets:
    """One signing secret per team, created atomically on first use."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._cache: dict[str, str] = {}

    async def get(self, team_id: str) -> str:
        cached = self._cache.get(team_id)
        if cached is not None:
            return cached
        key = f"secret.{team_token(team_id)}"
        try:
            entry = await self._kv.get(key)
            secret = (entry.value or b"").decode()
        except KeyNotFoundError:
            fresh = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
            try:
                await self._kv.create(key, fresh.encode())
                secret = fresh
            except KeyWrongLastSequenceError:
                entry = await self._kv.get(key)
                secret = (entry.value or b"").decode()
        self._cache[team_id] = secret
        return secret

    def _disabled_key(self, team_id: str, url: str) -> str:
        return f"disabled.{team_token(team_id)}.{hashlib.sha256(url.encode()).hexdigest()[:32]}"

    async def disable(self, team_id: str, url: str) -> None:
        await self._kv.put(self._disabled_key(team_id, url), str(int(time.time())).encode())

    async def is_disabled(self, team_id: str, url: str) -> bool:
        try:
            await self._kv.get(self._disabled_key(team_id, url))
        except KeyNotFoundError:
            return False
        return True


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


class WebhookClient:
    """Signed POSTs (Standard Webhooks); the URL is re-checked, after DNS, at delivery."""

    def __init__(self, allow: AllowList, timeout: float) -> None:
        self.allow = allow
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow), limit=100)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def attempt(self, delivery: jobs_pb2.WebhookDelivery, secret: str) -> AttemptResult:
        assert self._session is not None, "WebhookClient.start() first"
        try:
            await check_url(delivery.url, self.allow)
        except WebhookRefused as exc:
            return AttemptResult(error=str(exc), refused=True)
        now = datetime.now(tz=UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "Sluice-Webhooks/1",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sign(secret, delivery.webhook_id, now, delivery.payload),
        }
        try:
            async with self._session.post(
                delivery.url, data=delivery.payload, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                return AttemptResult(status_code=resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            return AttemptResult(error=text[:300])
