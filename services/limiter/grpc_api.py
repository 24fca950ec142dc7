"""gRPC ``sluice.limiter.v1.QuotaService``: quota inspection for operators."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sluice import telemetry
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.limiter.domain import Limiter
from services.limiter.handlers import Clock, policy_states, wall_ms


class QuotaServicer(limiter_pb2_grpc.QuotaServiceServicer):
    def __init__(self, limiter: Limiter, clock: Clock = wall_ms) -> None:
        self._limiter = limiter
        self._clock = clock
        self._tracer = trace.get_tracer("sluice.limiter.grpc")

    async def GetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: Any
    ) -> limiter_pb2.GetQuotaResponse:
        """Current TPM and RPM state of one key and its open reservations."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        with self._tracer.start_as_current_span(
            "sluice.limiter.v1.QuotaService/GetQuota",
            context=telemetry.extract(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "sluice.key_id": request.key_id},
        ):
            if not request.key_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key_id is required")
            view = self._limiter.quota(request.key_id, self._clock())
            return limiter_pb2.GetQuotaResponse(
                key_id=view.key_id,
                policies=policy_states(view.policies),
                open_reservations=view.open_reservations,
            )
