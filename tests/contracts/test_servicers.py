"""Every gRPC method a service declares in proto/ is implemented by its servicer: the
generated base classes answer UNIMPLEMENTED (``NotImplementedError``), and none of them
may be what a client reaches."""

from __future__ import annotations

from types import ModuleType

import pytest
from sluice.cache.v1 import cache_pb2, cache_pb2_grpc
from sluice.cost.v1 import cost_pb2, cost_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice.limiter.v1 import limiter_pb2, limiter_pb2_grpc

from services.cache.grpc_api import CacheAdminServicer
from services.cost_tracker.grpc_api import UsageServicer
from services.inference_worker.grpc_api import ProviderHealthServicer
from services.limiter.grpc_api import QuotaServicer

CASES: list[tuple[type, ModuleType, ModuleType, str]] = [
    (CacheAdminServicer, cache_pb2, cache_pb2_grpc, "CacheAdminService"),
    (UsageServicer, cost_pb2, cost_pb2_grpc, "UsageService"),
    (ProviderHealthServicer, inference_pb2, inference_pb2_grpc, "ProviderHealthService"),
    (QuotaServicer, limiter_pb2, limiter_pb2_grpc, "QuotaService"),
]


@pytest.mark.parametrize(("impl", "messages", "grpc_module", "service"), CASES)
def test_every_rpc_is_implemented(
    impl: type, messages: ModuleType, grpc_module: ModuleType, service: str
) -> None:
    base = getattr(grpc_module, f"{service}Servicer")
    assert issubclass(impl, base)
    rpcs = [m.name for m in messages.DESCRIPTOR.services_by_name[service].methods]
    assert rpcs
    missing = [name for name in rpcs if getattr(impl, name) is getattr(base, name)]
    assert not missing, f"{impl.__name__} leaves {missing} to the generated UNIMPLEMENTED stub"
