"""What ``/readyz`` says: ``ready``, ``degraded`` or ``down``.

- ``down`` (503): requests cannot be served: NATS is unreachable, the gateway itself or
  every inference worker does not answer ready, or the limiter does not and no tier
  fails open (every request would get 503 ``limiter_unavailable``).
- ``degraded`` (200): requests are served, with less: some deployments' breakers are
  open (shared by the workers in the ``sluice_breakers`` bucket; requests go to the
  other deployments of their routes, or to a route's last resort, and ``routes_down``
  lists the routes none of whose deployments is usable now), or an internal service
  the answers do not need is down. ``outages`` names each with what it means: the
  cache (answers go on uncached), the cost-tracker (usage waits in ``SLUICE_USAGE``),
  the limiter while some tier fails open (those tiers' teams are admitted within each
  gateway's local allowance, the others get 503 ``limiter_unavailable``).
- ``ready`` (200): everything answers and no breaker is open.

A provider outage leaves the gateway in rotation on purpose: every replica shares the
same breakers, so taking replicas out would only turn degraded answers and 503s with
``Retry-After`` into refused connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sluice.catalog import Catalog
from sluice.topology import ServiceName


class Readiness(StrEnum):
    READY = "ready"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True)
class OpenBreaker:
    deployment: str
    provider: str
    state: str
    reason: str
    # Seconds until it lets a probe through (0: half-open now).
    retry_in_seconds: float


@dataclass(frozen=True)
class Outage:
    """A service that does not answer ready, and what that means for requests."""

    service: str
    effect: str
    # True when no request can be served without it (``down``).
    blocking: bool


# Not a service: the gateway's own connection to the bus, named when it is down.
NATS = "nats"

# What each service's absence means. The limiter's depends on the tiers (below).
EFFECTS: dict[str, tuple[str, bool]] = {
    NATS: ("this gateway cannot reach NATS: nothing is served", True),
    ServiceName.GATEWAY: ("this gateway does not serve", True),
    ServiceName.INFERENCE_WORKER: ("no worker takes work: no model answers", True),
    ServiceName.CACHE: (
        "answers go on uncached (x-sluice-cache: bypass) and are not stored",
        False,
    ),
    ServiceName.COST_TRACKER: (
        "usage waits in SLUICE_USAGE and is recorded when a cost-tracker returns; "
        "usage queries, cost events and spend alerts wait with it",
        False,
    ),
}


def limiter_effect(fail_open_tiers: list[str]) -> tuple[str, bool]:
    if not fail_open_tiers:
        return "every request gets 503 limiter_unavailable (no tier fails open)", True
    return (
        "teams of the fail_open tiers ("
        + ", ".join(fail_open_tiers)
        + ") are admitted within each gateway's local allowance; others get 503 "
        "limiter_unavailable",
        False,
    )


@dataclass(frozen=True)
class Report:
    status: Readiness
    services: dict[str, bool]
    open_deployments: list[OpenBreaker]
    routes_down: list[str]
    outages: list[Outage]

    def as_dict(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "services": self.services,
            "open_deployments": [
                {
                    "deployment": b.deployment,
                    "provider": b.provider,
                    "state": b.state,
                    "reason": b.reason,
                    "retry_in_seconds": round(b.retry_in_seconds, 3),
                }
                for b in self.open_deployments
            ],
            "routes_down": self.routes_down,
            "outages": [{"service": o.service, "effect": o.effect} for o in self.outages],
        }

    @property
    def blocking(self) -> list[Outage]:
        return [o for o in self.outages if o.blocking]


def report(
    catalog: Catalog,
    services: dict[str, bool],
    breakers: list[OpenBreaker],
    fail_open_tiers: list[str] | None = None,
) -> Report:
    """``fail_open_tiers``: the tiers whose teams are still admitted while the limiter
    does not answer (``limiter_failure: fail_open``)."""
    open_names = {b.deployment for b in breakers if b.state == "open"}
    routes_down = sorted(
        name
        for name, route in catalog.models.items()
        if all(d.name in open_names for _, step in catalog.chain(route) for d in step.deployments)
    )
    outages = []
    for service, ok in sorted(services.items()):
        if ok:
            continue
        if service == ServiceName.LIMITER:
            effect, blocking = limiter_effect(fail_open_tiers or [])
        else:
            effect, blocking = EFFECTS.get(service, ("unknown service", True))
        outages.append(Outage(service, effect, blocking))
    if not services or any(o.blocking for o in outages):
        status = Readiness.DOWN
    elif breakers or outages:
        status = Readiness.DEGRADED
    else:
        status = Readiness.READY
    return Report(
        status, services, sorted(breakers, key=lambda b: b.deployment), routes_down, outages
    )
