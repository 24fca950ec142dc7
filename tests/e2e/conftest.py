"""The whole product as separate processes: NATS, the simulated provider and all five
services, started once for the e2e suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sluice.devtools.embedded import EmbeddedNats
from sluice.topology import ALL_SERVICES, ServiceName

from tests.support.stack import Stack
from tests.support.stack import simulator as running_simulator

DEV_KEY = "sk-sluice-e2e-test-key-0123456789"


@dataclass
class RunningStack:
    stack: Stack
    nats: EmbeddedNats
    simulator_url: str
    gateway_url: str

    @property
    def state_dir(self) -> Path:
        return self.stack.state_dir

    def port(self, name: ServiceName) -> int:
        return self.stack.processes[name].metrics_port


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_simulator(tmp_path_factory.mktemp("sim") / "simulator.log") as url:
        yield url


@pytest.fixture(scope="session")
async def e2e(
    tmp_path_factory: pytest.TempPathFactory, simulator: str
) -> AsyncIterator[RunningStack]:
    root = tmp_path_factory.mktemp("e2e")
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={"SLUICE_SIMULATOR_URL": simulator, "SLUICE_DEV_API_KEY": DEV_KEY},
    )
    try:
        for name in ALL_SERVICES:
            stack.start(name)
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        gateway = stack.processes[ServiceName.GATEWAY]
        yield RunningStack(stack, nats, simulator, f"http://127.0.0.1:{gateway.http_port}")
    finally:
        stack.stop_all()
        nats.stop()


@pytest.fixture
async def client(e2e: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=e2e.gateway_url,
        headers={"Authorization": f"Bearer {DEV_KEY}"},
        timeout=30,
    ) as c:
        yield c
