"""Webhooks: per-team Standard Webhooks secrets, SSRF checks, and the sender that drains
the SLUICE_WEBHOOKS work queue with backoff.

A delivery is one message in SLUICE_WEBHOOKS (``Nats-Msg-Id`` = its webhook id). Every
gateway replica pulls from the one durable consumer; a failed attempt is naked with the
next delay of the schedule, so the retry survives restarts. Each attempt is appended to
the job's delivery log. A 410 Gone disables the endpoint for the team.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import Bus, pull_batches
from sluice.errors import ErrorCode, SluiceError
from sluice.jobs.v1 import jobs_pb2
from sluice.topology import Consumers, Subjects
from standardwebhooks import Webhook

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def team_token(team_id: str) -> str:
    """A KV- and subject-safe token for a team id."""
    return hashlib.sha256(team_id.encode()).hexdigest()[:32]


# --- SSRF -------------------------------------------------------------------------------


class AllowList:
    """Hosts and networks exempt from the SSRF refusal (settings.webhook_allow_hosts)."""

    def __init__(self, entries: list[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[Network] = []
        for entry in entries:
            value = entry.strip().lower()
            if not value:
                continue
            try:
                self.networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                self.hosts.add(value)

    def allows_host(self, host: str) -> bool:
        return host.lower() in self.hosts

    def allows_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.networks)


def forbidden_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a destination address is refused, or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        # 169.254.169.254 (cloud metadata) is link-local.
        return "link-local (metadata)"
    if ip.is_private:
        return "private"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fd00:ec2::/32"):
        return "metadata"
    return None


class WebhookRefused(Exception):
    """The URL may not receive webhooks (scheme, or an address SSRF rules refuse)."""


def _parse(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("webhook_url must be an http or https URL")
    host = parts.hostname
    if not host:
        raise WebhookRefused("webhook_url has no host")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("webhook_url has an invalid port") from None
    return parts.scheme, host, port


def _check_addresses(host: str, addresses: list[str], allow: AllowList) -> None:
    if allow.allows_host(host):
        return
    if host.lower() in _METADATA_HOSTS:
        raise WebhookRefused(f"webhook host {host} is a metadata service")
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if allow.allows_ip(ip):
            continue
        reason = forbidden_reason(ip)
        if reason is not None:
            raise WebhookRefused(f"webhook host {host} resolves to a {reason} address")


async def _resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"webhook host {host} does not resolve ({exc.strerror})") from None
    return sorted({str(info[4][0]) for info in infos})


async def check_url(url: str, allow: AllowList) -> None:
    """Refuses non-http(s) URLs and hosts resolving to loopback, private, link-local or
    metadata addresses, unless the allow-list names them."""
    if len(url) > 2048:
        raise WebhookRefused("webhook_url is longer than 2048 characters")
    _, host, port = _parse(url)
    _check_addresses(host, await _resolve(host, port), allow)


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
            _check_addresses(host, [r["host"] for r in results], self._allow)
        except WebhookRefused as exc:
            raise OSError(str(exc)) from None
        return results

    async def close(self) -> None:
        await self._inner.close()


def refused_error(exc: WebhookRefused) -> SluiceError:
    return SluiceError(
        ErrorCode.INVALID_REQUEST,
        f"{exc}.",
        param="webhook_url",
        details={"errors": [{"loc": "webhook_url", "type": "value_error", "msg": str(exc)}]},
    )


# --- secrets ----------------------------------------------------------------------------


class WebhookSecrets:
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


def sign(secret: str, webhook_id: str, when: datetime, payload: bytes) -> str:
    return str(Webhook(secret).sign(webhook_id, when, payload.decode()))


# --- sending ----------------------------------------------------------------------------

# Records one attempt on the job: (job id, webhook status, attempt entry).
RecordAttempt = Callable[[str, str, jobs_pb2.WebhookAttempt], Awaitable[None]]


@dataclass
class AttemptResult:
    status_code: int = 0
    error: str = ""
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return 200 <= self.status_code < 300


class WebhookSender:
    """Pulls SLUICE_WEBHOOKS and delivers with the retry schedule."""

    def __init__(
        self,
        bus: Bus,
        secrets_store: WebhookSecrets,
        *,
        schedule: list[float],
        timeout: float,
        allow: AllowList,
        record: RecordAttempt,
    ) -> None:
        self.bus = bus
        self.secrets = secrets_store
        self.schedule = list(schedule) or [0.0]
        self.timeout = timeout
        self.allow = allow
        self.record = record
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        spec = Consumers.WEBHOOK_SENDER
        await self.bus.ensure_consumer(spec)
        self._sub = await self.bus.js.pull_subscribe(
            spec.filter_subject, durable=spec.durable, stream=spec.stream
        )
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow), limit=100)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout + 1)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        running = lambda: not self._stopping  # noqa: E731
        async for msgs in pull_batches(self._sub, batch=16, running=running, what="webhook"):
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _handle(self, msg: Msg) -> None:
        delivery = jobs_pb2.WebhookDelivery()
        try:
            delivery.ParseFromString(msg.data)
        except Exception:
            await msg.term()
            return
        attempt = int(msg.metadata.num_delivered or 1)
        try:
            if await self.secrets.is_disabled(delivery.team_id, delivery.url):
                result = AttemptResult(error="endpoint disabled after 410 Gone", refused=True)
            else:
                result = await self.attempt(delivery)
        except Exception as exc:  # a bug must not lose the delivery: retry it later
            log.exception("webhook attempt for %s failed", delivery.job_id)
            result = AttemptResult(error=type(exc).__name__)
        entry = jobs_pb2.WebhookAttempt(
            attempt=attempt,
            at_unix_ms=int(time.time() * 1000),
            status_code=result.status_code,
            error=result.error,
            event_type=delivery.event_type,
        )
        if result.delivered:
            status = "delivered"
        elif result.status_code == 410:
            status = "disabled"
            await self.secrets.disable(delivery.team_id, delivery.url)
        elif result.refused:
            status = "refused"
        elif attempt >= len(self.schedule):
            status = "failed"
        else:
            status = "pending"
        try:
            await self.record(delivery.job_id, status, entry)
        except Exception:
            log.warning("webhook log for %s not recorded", delivery.job_id, exc_info=True)
        if status == "pending":
            await msg.nak(delay=self.schedule[attempt])
        elif status == "delivered":
            await msg.ack()
        else:
            await msg.term()

    async def attempt(self, delivery: jobs_pb2.WebhookDelivery) -> AttemptResult:
        """One signed POST; the URL is re-checked (after DNS) at delivery time."""
        assert self._session is not None
        try:
            await check_url(delivery.url, self.allow)
        except WebhookRefused as exc:
            return AttemptResult(error=str(exc), refused=True)
        secret = await self.secrets.get(delivery.team_id)
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


def payload(event_type: str, job: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "type": event_type,
            "timestamp": datetime.now(tz=UTC).isoformat().replace("+00:00", "Z"),
            "data": job,
        }
    )


async def enqueue(bus: Bus, delivery: jobs_pb2.WebhookDelivery, publish_timeout: float) -> None:
    """Queue a delivery; the webhook id deduplicates a repeated enqueue."""
    await bus.js.publish(
        Subjects.webhook(delivery.job_id),
        delivery.SerializeToString(),
        timeout=publish_timeout,
        headers={"Nats-Msg-Id": delivery.webhook_id},
    )
