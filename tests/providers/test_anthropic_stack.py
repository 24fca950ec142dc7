"""An Anthropic deployment behind the whole product: every service as a process, the
catalogue naming a ``kind: anthropic`` provider served by the fake Messages API (its
own process). The official ``anthropic`` SDK's ``cache_control`` breakpoints reach the
deployment, and the cache reads it reports reach the answer and the cost ledger."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml
from sluice.devtools.embedded import EmbeddedNats, free_port, wait_for_port
from sluice.topology import ALL_SERVICES, ServiceName

from tests.support.fake_anthropic import ANSWER, KEY
from tests.support.full_stack import wait_for
from tests.support.stack import REPO, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV_KEY = "sk-sluice-anthropic-stack-0123456789"
MODEL = "claude-test"


def config_dir(root: Path, fake_url: str) -> Path:
    """The shipped configuration plus one Anthropic deployment and its prices."""
    out = root / "config"
    shutil.copytree(REPO / "config", out)
    providers = yaml.safe_load((out / "providers.yaml").read_text())
    providers["providers"]["anthropic"] = {
        "kind": "anthropic",
        "base_url": fake_url,
        "api_key_env": "FAKE_ANTHROPIC_KEY",
        "timeout_seconds": 30,
    }
    providers["models"][MODEL] = {
        "provider": "anthropic",
        "upstream_model": "claude-upstream",
        "context_window": 200000,
        "owned_by": "anthropic",
    }
    (out / "providers.yaml").write_text(yaml.safe_dump(providers))
    prices = yaml.safe_load((out / "prices.yaml").read_text())
    prices["models"][MODEL] = {
        "input_per_mtok": 3.0,
        "output_per_mtok": 15.0,
        "cached_input_per_mtok": 0.3,
    }
    (out / "prices.yaml").write_text(yaml.safe_dump(prices))
    return out


@dataclass
class Running:
    url: str
    fake_url: str


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    root = tmp_path_factory.mktemp("anthropic-stack")
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_anthropic", "--port", str(port)],
        cwd=REPO,
        stdout=(root / "fake.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    fake_url = f"http://127.0.0.1:{port}"
    nats = EmbeddedNats.start(root / "nats", log_file=root / "nats.log")
    stack = Stack(
        nats_url=nats.url,
        state_dir=root / "state",
        extra_env={
            "SLUICE_CONFIG_DIR": str(config_dir(root, fake_url)),
            "SLUICE_DEV_API_KEY": DEV_KEY,
            "FAKE_ANTHROPIC_KEY": KEY,
        },
    )
    try:
        wait_for_port("127.0.0.1", port, 20, fake)
        for name in ALL_SERVICES:
            stack.start(name)
        await stack.wait_ready(list(ALL_SERVICES), timeout=90)
        url = f"http://127.0.0.1:{stack.processes[ServiceName.GATEWAY].http_port}"
        yield Running(url, fake_url)
    finally:
        stack.stop_all()
        nats.stop()
        fake.terminate()
        fake.wait(10)


async def test_cache_control_reaches_the_deployment_and_the_ledger(running: Running) -> None:
    client = anthropic.AsyncAnthropic(base_url=running.url, api_key=DEV_KEY, max_retries=0)
    manual = "Section 1. The widget turns clockwise. " * 60
    system: Any = [{"type": "text", "text": manual, "cache_control": {"type": "ephemeral"}}]
    first = await client.messages.create(
        model=MODEL,
        max_tokens=64,
        system=system,
        messages=[{"role": "user", "content": "Which way does it turn?"}],
    )
    assert first.content[0].type == "text" and first.content[0].text == ANSWER
    assert first.usage.cache_read_input_tokens == 0
    second = await client.messages.create(
        model=MODEL,
        max_tokens=64,
        system=system,
        messages=[{"role": "user", "content": "And how fast does it go?"}],
    )
    assert second.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens > 200
    sluice = (second.model_extra or {})["sluice"]
    assert sluice["provider"] == "anthropic" and sluice["status"] == "success"
    assert sluice["usage"]["cached_input_tokens"] == second.usage.cache_read_input_tokens

    async with httpx.AsyncClient() as http:
        sent = (await http.get(running.fake_url + "/_fake/requests")).json()
    assert sent[-1]["model"] == "claude-upstream"
    assert sent[-1]["system"][0]["cache_control"] == {"type": "ephemeral"}

    async with httpx.AsyncClient(
        base_url=running.url, headers={"authorization": f"Bearer {DEV_KEY}"}
    ) as http:

        async def billed() -> dict[str, Any] | None:
            resp = await http.get("/v1/usage", params={"group_by": "model", "model": MODEL})
            report: dict[str, Any] = resp.json()
            return report if report["totals"]["requests"] >= 2 else None

        report = await wait_for(billed, timeout=20, what="the ledger rows")
    totals = report["totals"]
    assert totals["requests"] == 2
    assert totals["cached_input_tokens"] == second.usage.cache_read_input_tokens
    # Cached tokens are priced at the cached rate: cheaper than the same prompt uncached.
    assert totals["cost_usd_nanos"] > 0
