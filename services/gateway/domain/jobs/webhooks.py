"""Webhooks as policy: which URLs may receive them (SSRF rules, checked at submission and
again at delivery), the Standard Webhooks payload and signature, and what one attempt's
result means for the next."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from sluice.errors import ErrorCode, SluiceError
from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def team_token(team_id: str) -> str:
    """A KV- and subject-safe token for a team id."""
    return hashlib.sha256(team_id.encode()).hexdigest()[:32]


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


def check_addresses(host: str, addresses: list[str], allow: AllowList) -> None:
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
    check_addresses(host, await _resolve(host, port), allow)


def refused_error(exc: WebhookRefused) -> SluiceError:
    return SluiceError(
        ErrorCode.INVALID_REQUEST,
        f"{exc}.",
        param="webhook_url",
        details={"errors": [{"loc": "webhook_url", "type": "value_error", "msg": str(exc)}]},
    )


def sign(secret: str, webhook_id: str, when: datetime, payload: bytes) -> str:
    return str(Webhook(secret).sign(webhook_id, when, payload.decode()))


@dataclass
class AttemptResult:
    status_code: int = 0
    error: str = ""
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return 200 <= self.status_code < 300


def payload(event_type: str, job: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "type": event_type,
            "timestamp": datetime.now(tz=UTC).isoformat().replace("+00:00", "Z"),
            "data": job,
        }
    )


def attempt_outcome(result: AttemptResult, attempt: int, schedule: list[float]) -> str:
    """The webhook's status after attempt number ``attempt`` (from 1): ``delivered``,
    ``disabled`` (410 Gone), ``refused`` (SSRF rules, or disabled before), ``failed``
    (the schedule is used up) or ``pending`` (retried after ``schedule[attempt]``)."""
    if result.delivered:
        return "delivered"
    if result.status_code == 410:
        return "disabled"
    if result.refused:
        return "refused"
    if attempt >= len(schedule):
        return "failed"
    return "pending"
