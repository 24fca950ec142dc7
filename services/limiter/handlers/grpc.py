"""gRPC ``sluice.limiter.v1.QuotaService``: quota inspection for operators. The shared
edge (``sluice.grpc_edge``) opens the call's span, checks the caller's token and turns a
``SluiceError`` into its status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.limiter.domain.admission import Admission


class QuotaServicer(limiter_pb2_grpc.QuotaServiceServicer):
    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def GetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: Any
    ) -> limiter_pb2.GetQuotaResponse:
        """Current TPM and RPM state of one key and its open reservations."""
        return self._admission.quota(request)


def quota_service(admission: Admission) -> Callable[[grpc.aio.Server], None]:
    """Registers ``QuotaService`` on the runtime's gRPC server."""

    def register(server: grpc.aio.Server) -> None:
        limiter_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(admission), server)

    return register
