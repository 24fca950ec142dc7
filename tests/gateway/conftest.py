from __future__ import annotations

import pytest

from tests.gateway.harness import build_gateway


@pytest.fixture
async def gw(bus, tmp_path):
    """A gateway on the test NATS, with scripted limiter, cache and worker replies."""
    gateway = await build_gateway(bus, tmp_path)
    yield gateway
    await gateway.close()
