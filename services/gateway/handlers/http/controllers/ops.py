"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

import orjson
from litestar import Controller, Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.exchange import JSON
from services.gateway.domain.health import Readiness as Health
from services.gateway.domain.health import report
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.errors import problem_answer
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.responses import to_response


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", operation_id="getHealth", summary="Liveness")
    async def healthz(self) -> Response[bytes]:
        """200 while the process is alive."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @get("/readyz", operation_id="getReadiness", summary="Readiness")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """``ready`` (200) when NATS is connected, every Sluice service answers ready
        over NATS and no deployment's breaker is open. ``degraded`` (200) when requests
        are served with less: some breakers are open (named in ``open_deployments``, with
        the routes none of whose deployments is usable in ``routes_down``), or the cache,
        the cost-tracker, or the limiter while some tier fails open, is down (each named in
        ``outages`` with what it means). ``down`` (503) when requests cannot be served:
        NATS, this gateway or every inference worker is not ready, or the limiter is not
        and every tier fails closed."""
        deps = deps_of(request)
        services = await deps.readiness.check()
        found = report(
            deps.chat.catalog,
            services,
            deps.readiness.open_breakers(),
            deps.chat.tenancy.tiers.failing_open(),
        )
        if found.status is not Health.DOWN:
            return Response(orjson.dumps(found.as_dict()), media_type=JSON)
        err = SluiceError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Requests cannot be served: "
            + "; ".join(f"{o.service}: {o.effect}" for o in found.blocking)
            + ".",
            details=found.as_dict(),
            retry_after_ms=1000,
        )
        return to_response(problem_answer(err, request_context(request.scope)))

    @get("/metrics", operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(self) -> Response[bytes]:
        """Prometheus exposition of the gateway's OpenTelemetry metrics."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
