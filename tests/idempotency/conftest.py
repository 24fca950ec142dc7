"""One stack for the idempotency suite: every service as a process on a fresh NATS, the
simulated provider, a second API key of another team, and (on demand) a second gateway
replica on the same NATS.

The idempotency TTL is short (``TTL_SECONDS``) so that expiry is observable in a few
seconds; every test uses its own keys and finishes well within it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sluice.bus import Bus
from sluice.keys.v1 import keys_pb2
from sluice.topology import Buckets, ServiceName

from tests.support.full_stack import DEV_KEY, FullStack, full_stack
from tests.support.stack import ServiceProcess

OTHER_KEY = "sk-sluice-idem-other-team-0123456789"
TTL_SECONDS = 5.0
# After many concurrent chat requests a gateway's NATS drain can hang until its 10 s
# timeout (not specific to idempotency): nothing is left to check at teardown, so a
# gateway that has not exited by then is killed.
GATEWAY_STOP_SECONDS = 3.0


@pytest.fixture(scope="package")
async def idem_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    root = tmp_path_factory.mktemp("idempotency")
    async with full_stack(
        root,
        gateway_env={
            "SLUICE_GATEWAY_IDEMPOTENCY_TTL_SECONDS": str(TTL_SECONDS),
            "SLUICE_GATEWAY_SSE_HEARTBEAT_SECONDS": "1",
        },
        # Injected upstream faults must not open the simulator's circuit for later tests.
        worker_env={"SLUICE_WORKER_CIRCUIT_FAILURE_THRESHOLD": "1000"},
    ) as stack:
        await stack.add_key(OTHER_KEY, key_id="idem-other", team_id="idem-other", scopes=["chat"])
        yield stack
        stack.gateway.stop(timeout=GATEWAY_STOP_SECONDS)


@dataclass
class Replica:
    process: ServiceProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.process.http_port}"

    def client(self, key: str = DEV_KEY) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


@pytest.fixture(scope="package")
async def second_gateway(idem_stack: FullStack) -> AsyncIterator[Replica]:
    """Another gateway process on the same NATS (its own HTTP port). ``Stack`` tracks one
    process per service, so the first gateway is put back in its place at once."""
    stack = idem_stack.stack
    first = stack.processes[ServiceName.GATEWAY]
    proc = stack.start(ServiceName.GATEWAY)
    stack.processes[ServiceName.GATEWAY] = first
    try:
        await _wait_ready(proc)
        yield Replica(proc)
    finally:
        proc.stop(timeout=GATEWAY_STOP_SECONDS)


async def _wait_ready(proc: ServiceProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.process.poll() is not None:
                raise RuntimeError(f"second gateway exited:\n{proc.log()[-3000:]}")
            try:
                resp = await http.get(f"http://127.0.0.1:{proc.http_port}/readyz")
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"second gateway not ready:\n{proc.log()[-3000:]}")


async def new_team_key(
    stack: FullStack, *, requests_per_minute: int = 0, scopes: tuple[str, ...] = ("chat",)
) -> tuple[str, str]:
    """A fresh API key of a fresh team (so usage can be queried for it alone):
    (secret, team_id)."""
    tag = uuid.uuid4().hex[:12]
    secret = f"sk-sluice-idem-{tag}-0123456789"
    team_id = f"team-{tag}"
    bus = await Bus.connect(stack.nats.url, "tests-idem-keys")
    try:
        kv = await bus.kv(Buckets.API_KEYS)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        record = keys_pb2.ApiKeyRecord(
            key_id=f"key-{tag}",
            secret_sha256=digest,
            team_id=team_id,
            name=f"idempotency {tag}",
            scopes=list(scopes),
            requests_per_minute=requests_per_minute,
            created_unix=int(time.time()),
        )
        await kv.put(digest, record.SerializeToString())
    finally:
        await bus.close()
    return secret, team_id
