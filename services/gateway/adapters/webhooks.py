"""Webhook delivery: per-team signing secrets in the ``sluice_webhook_secrets`` bucket,
and the HTTP client that posts signed deliveries to exactly the addresses it checked."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.jobs.v1 import jobs_pb2

from services.gateway.domain.jobs.webhooks import (
    SECRET_PREFIX,
    AllowList,
    AttemptResult,
    WebhookRefused,
    check_url,
    sign,
    team_token,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

RESOLVER_MODULE = "services.gateway.adapters.webhook_resolver"


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


class WebhookClient:
    """Signed POSTs (Standard Webhooks); the URL is re-checked, after DNS, at delivery.

    Its HTTP client (aiohttp, about 10 MiB resident, which the gateway uses for nothing
    else) is made on the first delivery, not at start: most gateways send none."""

    def __init__(self, allow: AllowList, timeout: float) -> None:
        self.allow = allow
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            from services.gateway.adapters.webhook_resolver import GuardedResolver

            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow), limit=100)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def close(self) -> None:
        self._started = False
        if self._session is not None:
            await self._session.close()

    async def attempt(self, delivery: jobs_pb2.WebhookDelivery, secret: str) -> AttemptResult:
        assert self._started, "WebhookClient.start() first"
        if self._session is None:
            # The first delivery: aiohttp loads on a thread, not on the event loop.
            await asyncio.to_thread(importlib.import_module, RESOLVER_MODULE)
        import aiohttp

        session = self._session_now()
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
            async with session.post(
                delivery.url, data=delivery.payload, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                return AttemptResult(status_code=resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            return AttemptResult(error=text[:300])
