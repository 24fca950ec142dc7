"""What ``/readyz`` says: ``ready``, ``degraded`` or ``down``.

- ``down`` (503): a Sluice service does not answer ready; the gateway cannot serve.
- ``degraded`` (200): every service is ready but some deployments' breakers are open
  (shared by the workers in the ``sluice_breakers`` bucket): requests go to the other
  deployments of their routes, or to a route's last resort. ``routes_down`` lists the
  routes none of whose deployments is usable now.
- ``ready`` (200): everything answers and no breaker is open.

A provider outage leaves the gateway in rotation on purpose: every replica shares the
same breakers, so taking replicas out would only turn degraded answers and 503s with
``Retry-After`` into refused connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sluice.catalog import Catalog


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
class Report:
    status: Readiness
    services: dict[str, bool]
    open_deployments: list[OpenBreaker]
    routes_down: list[str]

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
        }


def report(catalog: Catalog, services: dict[str, bool], breakers: list[OpenBreaker]) -> Report:
    open_names = {b.deployment for b in breakers if b.state == "open"}
    routes_down = sorted(
        name
        for name, route in catalog.models.items()
        if all(d.name in open_names for _, step in catalog.chain(route) for d in step.deployments)
    )
    if not services or not all(services.values()):
        status = Readiness.DOWN
    elif breakers:
        status = Readiness.DEGRADED
    else:
        status = Readiness.READY
    return Report(status, services, sorted(breakers, key=lambda b: b.deployment), routes_down)
