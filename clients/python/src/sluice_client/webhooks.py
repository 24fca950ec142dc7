"""Checking a webhook delivery's signature (Standard Webhooks, as the gateway signs).

The gateway sends ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature`` (space-separated ``v1,<base64 HMAC-SHA256>``) computed over
``<webhook-id>.<webhook-timestamp>.<raw body>`` with the team's secret
(``GET /v1/webhooks/secret``, ``whsec_<base64>``). Verify the raw bytes as received,
before parsing them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from sluice_client.errors import SluiceError
from sluice_client.types import WebhookEvent

__all__ = ["WebhookVerificationError", "sign_webhook", "verify_webhook"]

DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(SluiceError):
    """The delivery is not signed by this secret, or its timestamp is too far off."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="webhook_verification_failed")


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("The secret is not a whsec_ base64 secret.") from None


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for a message (``v1,<base64>``)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookEvent:
    """The delivery's event once its signature and timestamp check out; else raises
    ``WebhookVerificationError``. ``headers`` may be any mapping (names are matched
    without regard to case)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    webhook_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not webhook_id or not stamp or not signatures:
        raise WebhookVerificationError(
            "Missing webhook-id, webhook-timestamp or webhook-signature header."
        )
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer.") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is too far from now (replayed?).")
    raw = body.encode() if isinstance(body, str) else body
    expected = sign_webhook(secret, webhook_id, timestamp, raw).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            break
    else:
        raise WebhookVerificationError("No webhook-signature matches this secret.")
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise WebhookVerificationError("The webhook body is not a JSON object.")
    return WebhookEvent(webhook_id=webhook_id, **payload)
