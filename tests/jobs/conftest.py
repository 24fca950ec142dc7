"""One stack for the jobs suite: every service as a process, a small worker (two slots,
so queueing and priority are observable), a short webhook retry schedule and an
allow-list naming 127.0.0.1 for the local webhook receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.full_stack import FullStack, full_stack

OTHER_KEY = "sk-sluice-other-team-key-0123456789"


@pytest.fixture(scope="package")
async def jobs_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    root = tmp_path_factory.mktemp("jobs")
    async with full_stack(
        root,
        gateway_env={
            "SLUICE_GATEWAY_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
            "SLUICE_GATEWAY_WEBHOOK_RETRY_SCHEDULE": "[0, 0.5, 0.5, 0.5]",
            "SLUICE_GATEWAY_SSE_HEARTBEAT_SECONDS": "1",
        },
        worker_env={
            "SLUICE_WORKER_CONCURRENCY": "2",
            "SLUICE_WORKER_PENDING_POLL_SECONDS": "0.5",
        },
    ) as stack:
        await stack.add_key(
            OTHER_KEY, key_id="other", team_id="other-team", scopes=["chat", "jobs"]
        )
        yield stack
