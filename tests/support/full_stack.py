"""Every service as a real process on a fresh NATS, plus the simulated provider, for the
jobs and idempotency suites (each suite passes its own settings)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sluice.bus import Bus
from sluice.devtools.embedded import EmbeddedNats, free_port, wait_for_port
from sluice.keys.v1 import keys_pb2
from sluice.topology import ALL_SERVICES, Buckets, ServiceName

from tests.support.stack import REPO, ServiceProcess, Stack

DEV_KEY = "sk-sluice-jobs-test-key-0123456789"


@dataclass
class FullStack:
    stack: Stack
    nats: EmbeddedNats
    sim_url: str

    @property
    def gateway(self) -> ServiceProcess:
        return self.stack.processes[ServiceName.GATEWAY]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def client(self, key: str = DEV_KEY, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.gateway_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=kw.pop("timeout", 30),
            **kw,
        )

    async def restart(self, name: ServiceName, *, kill: bool = False) -> None:
        proc = self.stack.processes[name]
        if kill:
            proc.process.kill()
            proc.process.wait()
        else:
            proc.stop()
        self.stack.start(name)
        await self.stack.wait_ready([name], timeout=60)

    async def sim_count(self, sim_id: str) -> int:
        async with httpx.AsyncClient(timeout=5) as http:
            stats = (await http.get(self.sim_url.removesuffix("/v1") + "/_sim/stats")).json()
        return int(stats["by_id"].get(sim_id, 0))

    async def add_key(
        self,
        secret: str,
        *,
        key_id: str,
        team_id: str,
        scopes: list[str],
        tier: str = "",
        model_allow: list[str] | None = None,
    ) -> None:
        """A second API key, written straight into the key bucket as the gateway reads it."""
        bus = await Bus.connect(self.nats.url, "tests-keys")
        try:
            kv = await bus.kv(Buckets.API_KEYS)
            digest = hashlib.sha256(secret.encode()).hexdigest()
            record = keys_pb2.ApiKeyRecord(
                key_id=key_id,
                secret_sha256=digest,
                team_id=team_id,
                name=key_id,
                scopes=scopes,
                tier=tier,
                model_allow=model_allow or [],
                created_unix=int(time.time()),
            )
            await kv.put(digest, record.SerializeToString())
        finally:
            await bus.close()


@asynccontextmanager
async def full_stack(
    root: Path, *, gateway_env: dict[str, str], worker_env: dict[str, str] | None = None
) -> AsyncIterator[FullStack]:
    port = free_port()
    sim_log = root / "simulator.log"
    sim = subprocess.Popen(
        [sys.executable, "-m", "sluice.devtools.cli", "simulator", "--port", str(port)],
        cwd=REPO,
        stdout=sim_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    sim_url = f"http://127.0.0.1:{port}/v1"
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={
            "SLUICE_SIMULATOR_URL": sim_url,
            "SLUICE_DEV_API_KEY": DEV_KEY,
            **{k: v for k, v in gateway_env.items()},
            **(worker_env or {}),
        },
    )
    try:
        wait_for_port("127.0.0.1", port, 20, sim)
        for name in ALL_SERVICES:
            stack.start(name)
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        yield FullStack(stack, nats, sim_url)
    finally:
        stack.stop_all()
        nats.stop()
        sim.terminate()
        sim.wait(10)


async def wait_for(
    check: Any, *, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Polls the async ``check`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")
