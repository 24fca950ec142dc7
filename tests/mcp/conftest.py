"""One stack for the MCP suite: every service as a process over the simulated provider,
and the admin key the gateway made for itself (teams and keys are created through the
admin API, as an operator would)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.full_stack import FullStack, full_stack


@dataclass
class McpStack:
    stack: FullStack
    admin_key: str

    @property
    def url(self) -> str:
        return self.stack.gateway_url + "/mcp"

    async def new_key(self, scopes: list[str]) -> dict[str, Any]:
        """A key of a new team, made through the admin API."""
        team = "mcp-" + secrets.token_hex(4)
        async with self.stack.client(self.admin_key) as admin:
            made = await admin.post("/v1/admin/teams/", json={"team_id": team})
            assert made.status_code == 201, made.text
            key = await admin.post(
                "/v1/admin/keys/", json={"team_id": team, "name": "agent", "scopes": scopes}
            )
            assert key.status_code == 201, key.text
            out: dict[str, Any] = key.json()
            return out


@pytest.fixture(scope="package")
async def mcp_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[McpStack]:
    root = tmp_path_factory.mktemp("mcp")
    async with full_stack(root, gateway_env={}) as stack:
        admin_key = (root / "state" / "admin-key").read_text().strip()
        yield McpStack(stack, admin_key)
