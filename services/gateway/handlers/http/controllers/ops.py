"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

import orjson
from litestar import Controller, Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sluice.errors import ErrorCode, SluiceError

from services.gateway.domain.exchange import JSON
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.problems import problem_response


class OpsController(Controller):
    tags = ["operations"]

    @get("/healthz", operation_id="getHealth", summary="Liveness")
    async def healthz(self) -> Response[bytes]:
        """200 while the process is alive."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @get("/readyz", operation_id="getReadiness", summary="Readiness")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """200 when NATS is connected and every Sluice service answers ready over NATS."""
        services = await deps_of(request).readiness.check()
        ready = bool(services) and all(services.values())
        if ready:
            return Response(
                orjson.dumps({"status": "ready", "services": services}), media_type=JSON
            )
        err = SluiceError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "Not every service is ready: "
            + ", ".join(sorted(s for s, ok in services.items() if not ok))
            + ".",
            details={"services": services},
            retry_after_ms=1000,
        )
        return problem_response(err, request_context(request.scope))

    @get("/metrics", operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(self) -> Response[bytes]:
        """Prometheus exposition of the gateway's OpenTelemetry metrics."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
