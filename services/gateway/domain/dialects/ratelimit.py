"""Rate-limit response headers from the limiter's policy states: the IETF RateLimit
structured fields, with OpenAI's ``x-ratelimit-*`` or Anthropic's
``anthropic-ratelimit-*``."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from sluice.limiter.v1 import limiter_pb2

# OpenAI and Anthropic both name the two policies "requests" and "tokens".
_POLICY_NAMES = {"rpm": "requests", "tpm": "tokens"}


def go_duration(ms: int) -> str:
    """A duration the way OpenAI writes resets: ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    return f"{minutes}m{sec_text}s"


def _binding(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str
) -> limiter_pb2.PolicyState:
    if denied_by:
        for p in policies:
            if p.name == denied_by:
                return p
    # The policy closest to exhaustion is the one a client should watch.
    return min(policies, key=lambda p: p.remaining / p.quota if p.quota > 0 else math.inf)


def _ietf_fields(policies: Sequence[limiter_pb2.PolicyState], denied_by: str) -> dict[str, str]:
    headers = {
        "ratelimit-policy": ", ".join(
            f'"{p.name}";q={p.quota};w={p.window_seconds}' for p in policies
        )
    }
    b = _binding(policies, denied_by)
    headers["ratelimit"] = f'"{b.name}";r={max(0, b.remaining)};t={math.ceil(b.reset_ms / 1000)}'
    return headers


def rate_limit_headers(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str = ""
) -> dict[str, str]:
    if not policies:
        return {}
    headers = _ietf_fields(policies, denied_by)
    for p in policies:
        name = _POLICY_NAMES.get(p.name)
        if name is None:
            continue
        headers[f"x-ratelimit-limit-{name}"] = str(p.quota)
        headers[f"x-ratelimit-remaining-{name}"] = str(max(0, p.remaining))
        headers[f"x-ratelimit-reset-{name}"] = go_duration(p.reset_ms)
    return headers


def rfc3339_after(ms: int, now: float | None = None) -> str:
    """The UTC instant ``ms`` from now, to the second (rounded up, so a client waiting
    until then is never early), as Anthropic writes resets: ``2025-01-01T12:00:05Z``."""
    at = math.ceil((time.time() if now is None else now) + max(0, ms) / 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def anthropic_rate_limit_headers(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str = ""
) -> dict[str, str]:
    """The IETF fields and ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``.
    The limiter keeps one token window (input and output together), so Anthropic's
    separate input- and output-token headers have nothing to report and are not sent."""
    if not policies:
        return {}
    headers = _ietf_fields(policies, denied_by)
    now = time.time()
    for p in policies:
        name = _POLICY_NAMES.get(p.name)
        if name is None:
            continue
        headers[f"anthropic-ratelimit-{name}-limit"] = str(p.quota)
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, p.remaining))
        headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_after(p.reset_ms, now)
    return headers
