"""Rate-limit response headers from the limiter's policy states: the IETF RateLimit
structured fields and OpenAI's ``x-ratelimit-*``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sluice.limiter.v1 import limiter_pb2

# OpenAI names its two policies "requests" and "tokens".
_OPENAI_NAMES = {"rpm": "requests", "tpm": "tokens"}


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


def rate_limit_headers(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str = ""
) -> dict[str, str]:
    if not policies:
        return {}
    headers = {
        "ratelimit-policy": ", ".join(
            f'"{p.name}";q={p.quota};w={p.window_seconds}' for p in policies
        )
    }
    b = _binding(policies, denied_by)
    headers["ratelimit"] = f'"{b.name}";r={max(0, b.remaining)};t={math.ceil(b.reset_ms / 1000)}'
    for p in policies:
        name = _OPENAI_NAMES.get(p.name)
        if name is None:
            continue
        headers[f"x-ratelimit-limit-{name}"] = str(p.quota)
        headers[f"x-ratelimit-remaining-{name}"] = str(max(0, p.remaining))
        headers[f"x-ratelimit-reset-{name}"] = go_duration(p.reset_ms)
    return headers
