"""What the controllers call, handed to the app once at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from litestar import Request
from sluice.catalog import Catalog
from sluice.metrics import Instruments

from services.gateway.domain.chat import ChatService
from services.gateway.domain.console import BreakerView, CacheAdmin, SpanSource
from services.gateway.domain.estimate import Estimator
from services.gateway.domain.health import OpenBreaker
from services.gateway.domain.idempotency.service import Idempotency
from services.gateway.domain.jobs.service import JobService
from services.gateway.domain.relay.resume import StreamResumer
from services.gateway.domain.tenancy.admin import AdminService
from services.gateway.domain.tenancy.identity import Authenticator
from services.gateway.domain.usage import UsageReports
from services.gateway.settings import GatewaySettings


class ReadinessCheck(Protocol):
    async def check(self) -> dict[str, bool]:
        """Each service's readiness, by name."""
        ...

    def open_breakers(self) -> list[OpenBreaker]:
        """Deployments whose shared breaker is open or half-open."""
        ...


class BreakerList(Protocol):
    def all(self) -> list[BreakerView]:
        """Every deployment's shared breaker."""
        ...


@dataclass
class ApiDeps:
    """What the controllers call."""

    settings: GatewaySettings
    keys: Authenticator
    chat: ChatService
    resumer: StreamResumer
    jobs: JobService
    idempotency: Idempotency
    readiness: ReadinessCheck
    instruments: Instruments
    models_body: bytes
    usage: UsageReports
    estimator: Estimator
    admin: AdminService
    # The console's reads: local spans, the cache's counters and invalidation, breakers.
    spans: SpanSource
    cache_admin: CacheAdmin
    breakers: BreakerList


def deps_of(request: Request[Any, Any, Any]) -> ApiDeps:
    deps: ApiDeps = request.app.state["deps"]
    return deps


def models_list_body(catalog: Catalog) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}
                for m in catalog.models.values()
            ],
        }
    )
