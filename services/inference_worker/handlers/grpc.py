"""gRPC ``ProviderHealthService``: each provider's summary and every deployment's
breaker as this worker holds it (shared state included), behind the shared edge
(``sluice.grpc_edge``) like every RPC."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from sluice.catalog import Catalog
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc

from services.inference_worker.adapters.breakers import breaker_records
from services.inference_worker.domain.circuit import CircuitRegistry, CircuitState


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
            models = sorted(
                m.name
                for m in self.catalog.models.values()
                if any(d.provider == name for d in m.deployments())
            )
            # The provider's circuit: open when every deployment on it is open.
            breakers = [
                b
                for d in self.catalog.deployments.values()
                if d.provider == name and (b := self.circuits.breakers.get(d.name)) is not None
            ]
            circuit = CircuitState.CLOSED
            if breakers:
                seen = {b.current() for b in breakers}
                if seen == {CircuitState.OPEN}:
                    circuit = CircuitState.OPEN
                elif seen != {CircuitState.CLOSED}:
                    circuit = CircuitState.HALF_OPEN
            states.append(
                inference_pb2.ProviderState(
                    provider=name,
                    base_url=config.base_url,
                    circuit=str(circuit),
                    consecutive_failures=max((b.consecutive_failures for b in breakers), default=0),
                    models=models,
                    requests_total=sum(b.requests_total for b in breakers),
                    failures_total=sum(b.failures_total for b in breakers),
                )
            )
        return inference_pb2.ProviderHealthResponse(
            providers=states, deployments=breaker_records(self.circuits)
        )


def provider_health_service(
    catalog: Catalog, circuits: CircuitRegistry
) -> Callable[[grpc.aio.Server], None]:
    """Registers ``ProviderHealthService`` on the runtime's gRPC server."""

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_ProviderHealthServiceServicer_to_server(
            ProviderHealthServicer(catalog, circuits), server
        )

    return register
