"""gRPC ``ProviderHealthService``: circuit state and counters of each provider, behind
the shared edge (``sluice.grpc_edge``) like every RPC."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from sluice.catalog import Catalog
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc

from services.inference_worker.domain.circuit import CircuitRegistry


class ProviderHealthServicer(inference_pb2_grpc.ProviderHealthServiceServicer):
    def __init__(self, catalog: Catalog, circuits: CircuitRegistry) -> None:
        self.catalog = catalog
        self.circuits = circuits

    async def GetProviderHealth(
        self,
        request: inference_pb2.ProviderHealthRequest,
        context: grpc.aio.ServicerContext[
            inference_pb2.ProviderHealthRequest, inference_pb2.ProviderHealthResponse
        ],
    ) -> inference_pb2.ProviderHealthResponse:
        states = []
        for name, config in sorted(self.catalog.providers.items()):
            models = sorted(m.name for m in self.catalog.models.values() if m.provider == name)
            breaker = self.circuits.get(name)
            states.append(
                inference_pb2.ProviderState(
                    provider=name,
                    base_url=config.base_url,
                    circuit=str(breaker.current()),
                    consecutive_failures=breaker.consecutive_failures,
                    models=models,
                    requests_total=breaker.requests_total,
                    failures_total=breaker.failures_total,
                )
            )
        return inference_pb2.ProviderHealthResponse(providers=states)


def provider_health_service(
    catalog: Catalog, circuits: CircuitRegistry
) -> Callable[[grpc.aio.Server], None]:
    """Registers ``ProviderHealthService`` on the runtime's gRPC server."""

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_ProviderHealthServiceServicer_to_server(
            ProviderHealthServicer(catalog, circuits), server
        )

    return register
