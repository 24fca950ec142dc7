"""The whole product as separate processes for the console's tests (NATS, the simulated
provider, the five services), with the operators' admin key, and a headless Chromium
(Debian's ``chromium`` package, driven by Playwright) when one is installed."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sluice.devtools.embedded import EmbeddedNats
from sluice.topology import ALL_SERVICES, ServiceName

from tests.support.stack import Stack
from tests.support.stack import simulator as running_simulator

DEV_KEY = "sk-sluice-console-dev-key-0123456789"
ADMIN_KEY = "sk-sluice-console-admin-key-0123456789"
CHROMIUM = Path("/usr/bin/chromium")
# Screenshots of every page, kept by the test run (git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "console"


@dataclass
class ConsoleStack:
    stack: Stack
    url: str

    def client(self, key: str) -> httpx.AsyncClient:
        """A client sending ``key`` ('' for none)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_simulator(tmp_path_factory.mktemp("sim") / "simulator.log") as url:
        yield url


@pytest.fixture(scope="module")
async def console_stack(
    tmp_path_factory: pytest.TempPathFactory, simulator: str
) -> AsyncIterator[ConsoleStack]:
    root = tmp_path_factory.mktemp("console")
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={
            "SLUICE_SIMULATOR_URL": simulator,
            "SLUICE_DEV_API_KEY": DEV_KEY,
            "SLUICE_ADMIN_API_KEY": ADMIN_KEY,
        },
    )
    try:
        for name in ALL_SERVICES:
            stack.start(name)
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        gateway = stack.processes[ServiceName.GATEWAY]
        yield ConsoleStack(stack, f"http://127.0.0.1:{gateway.http_port}")
    finally:
        stack.stop_all()
        nats.stop()


def chromium_path() -> Path:
    """Debian's chromium, or a skip naming what is missing (``make install`` installs it
    when it runs as root with apt)."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip(
            "no chromium: install Debian's package (apt-get install chromium, or make "
            "install as root) to run the console's browser tests"
        )
    return CHROMIUM if CHROMIUM.exists() else Path(str(shutil.which("chromium")))
