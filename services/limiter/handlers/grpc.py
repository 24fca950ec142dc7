"""gRPC ``sluice.limiter.v1.QuotaService``: quota inspection for operators. The shared
edge (``sluice.grpc_edge``) opens the call's span, checks the caller's token and turns a
``SluiceError`` into its status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from sluice.errors import ErrorCode, SluiceError
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.limiter.domain.replica import Replica


class QuotaServicer(limiter_pb2_grpc.QuotaServiceServicer):
    def __init__(self, replica: Callable[[], Replica | None]) -> None:
        self._replica = replica

    async def GetQuota(
        self, request: limiter_pb2.GetQuotaRequest, context: Any
    ) -> limiter_pb2.GetQuotaResponse:
        """Current TPM and RPM state of one key and its open reservations, as the
        partition served here that tracks it has them (a key this replica does not
        track reads as unused)."""
        if not request.key_id:
            raise SluiceError(ErrorCode.INVALID_REQUEST, "key_id is required", param="key_id")
        replica = self._replica()
        if replica is None:
            raise SluiceError(ErrorCode.SERVICE_UNAVAILABLE, "The limiter is starting.")
        return replica.quota(request)


def quota_service(replica: Callable[[], Replica | None]) -> Callable[[grpc.aio.Server], None]:
    """Registers ``QuotaService`` on the runtime's gRPC server."""

    def register(server: grpc.aio.Server) -> None:
        limiter_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(replica), server)

    return register
