"""Rate-limit response headers from the limiter's policy states: the IETF RateLimit
structured fields, with OpenAI's ``x-ratelimit-*`` or Anthropic's
``anthropic-ratelimit-*``.

The limiter reports the key's own quotas ("tpm", "rpm") and every limit a level sets
("team.output_tokens_per_minute", ...). ``RateLimit-Policy`` lists the rate and
concurrency policies, ``RateLimit`` the one that binds (the refusing one, else the
closest to exhaustion); the vendor headers, which have one slot per kind, report the
tightest policy of that kind (requests; tokens, input tokens, output tokens). Budgets
(USD per day or month) are money, not rates: they are not RateLimit policies; past 80 %
used, ``x-sluice-budget-warning`` names each and the share spent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from sluice.limiter.v1 import limiter_pb2

# OpenAI and Anthropic both name the two policies "requests" and "tokens"; Anthropic
# also reports input and output tokens.
_KINDS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}
# OpenAI has one token slot: the tightest of the token policies of any kind.
_OPENAI_KINDS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
}
_LEGACY_UNITS = {"rpm": "requests", "tpm": "tokens"}
USD = "usd_nanos"
BUDGET_WARNING_HEADER = "x-sluice-budget-warning"
# A budget past this share spent gets the warning header.
BUDGET_WARNING_AT = 0.8


def _unit(p: limiter_pb2.PolicyState) -> str:
    return p.unit or _LEGACY_UNITS.get(p.name, "")


def _tightest(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str, kinds: dict[str, str]
) -> dict[str, limiter_pb2.PolicyState]:
    """Per vendor kind, the policy a client should watch: the refusing one, else the one
    with the least left in proportion."""
    out: dict[str, limiter_pb2.PolicyState] = {}
    for p in policies:
        kind = kinds.get(_unit(p))
        if kind is None:
            continue
        held = out.get(kind)
        if (
            held is None
            or p.name == denied_by
            or (held.name != denied_by and _fraction(p) < _fraction(held))
        ):
            out[kind] = p
    return out


def _fraction(p: limiter_pb2.PolicyState) -> float:
    return p.remaining / p.quota if p.quota > 0 else math.inf


def _rates(policies: Sequence[limiter_pb2.PolicyState]) -> list[limiter_pb2.PolicyState]:
    return [p for p in policies if _unit(p) != USD]


def budget_warning(policies: Sequence[limiter_pb2.PolicyState]) -> str:
    """``x-sluice-budget-warning``: each budget past 80 % spent (and held), as
    ``team.usd_per_day=0.85`` items, comma-separated; empty when none is."""
    items = []
    for p in policies:
        if _unit(p) == USD and p.quota > 0:
            used = 1 - p.remaining / p.quota
            if used >= BUDGET_WARNING_AT:
                items.append(f"{p.name}={used:.2f}")
    return ", ".join(items)


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
    return min(policies, key=_fraction)


def _policy_item(p: limiter_pb2.PolicyState) -> str:
    if _unit(p) == "concurrent_requests":
        # The draft's quota unit for requests in flight; no window.
        return f'"{p.name}";q={p.quota};qu="concurrent-requests"'
    return f'"{p.name}";q={p.quota};w={p.window_seconds}'


def _ietf_fields(policies: Sequence[limiter_pb2.PolicyState], denied_by: str) -> dict[str, str]:
    rates = _rates(policies)
    headers: dict[str, str] = {}
    if rates:
        headers["ratelimit-policy"] = ", ".join(_policy_item(p) for p in rates)
        b = _binding(rates, denied_by)
        headers["ratelimit"] = (
            f'"{b.name}";r={max(0, b.remaining)};t={math.ceil(b.reset_ms / 1000)}'
        )
    warning = budget_warning(policies)
    if warning:
        headers[BUDGET_WARNING_HEADER] = warning
    return headers


def rate_limit_headers(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str = ""
) -> dict[str, str]:
    if not policies:
        return {}
    headers = _ietf_fields(policies, denied_by)
    for kind, p in _tightest(policies, denied_by, _OPENAI_KINDS).items():
        headers[f"x-ratelimit-limit-{kind}"] = str(p.quota)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, p.remaining))
        headers[f"x-ratelimit-reset-{kind}"] = go_duration(p.reset_ms)
    return headers


def rfc3339_after(ms: int, now: float | None = None) -> str:
    """The UTC instant ``ms`` from now, to the second (rounded up, so a client waiting
    until then is never early), as Anthropic writes resets: ``2025-01-01T12:00:05Z``."""
    at = math.ceil((time.time() if now is None else now) + max(0, ms) / 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def anthropic_rate_limit_headers(
    policies: Sequence[limiter_pb2.PolicyState], denied_by: str = ""
) -> dict[str, str]:
    """The IETF fields and ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``,
    and ``-input-tokens-`` and ``-output-tokens-`` when a level limits those."""
    if not policies:
        return {}
    headers = _ietf_fields(policies, denied_by)
    now = time.time()
    for name, p in _tightest(policies, denied_by, _KINDS).items():
        headers[f"anthropic-ratelimit-{name}-limit"] = str(p.quota)
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, p.remaining))
        headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_after(p.reset_ms, now)
    return headers
