from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from sluice.catalog import ProviderConfig
from sluice.devtools.embedded import free_port
from sluice.devtools.simulator import SIMULATOR_KEY, Simulator, start_simulator

from services.inference_worker.adapters.providers.openai_compat import OpenAICompatProvider


@pytest.fixture(scope="session")
async def sim_runner() -> AsyncIterator[web.AppRunner]:
    runner = await start_simulator(free_port())
    yield runner
    await runner.cleanup()


@pytest.fixture(scope="session")
def sim_url(sim_runner: web.AppRunner) -> str:
    site = next(iter(sim_runner.sites))
    return site.name.rstrip("/") + "/v1"


@pytest.fixture(scope="session")
def simulator(sim_runner: web.AppRunner) -> Simulator:
    return sim_runner.app[SIMULATOR_KEY]


@pytest.fixture
async def make_provider(
    sim_url: str,
) -> AsyncIterator[Callable[..., OpenAICompatProvider]]:
    made: list[OpenAICompatProvider] = []

    def make(base_url: str | None = None, **overrides: object) -> OpenAICompatProvider:
        config = ProviderConfig(
            name="simulator",
            kind="openai",
            base_url=base_url or sim_url,
            **overrides,  # type: ignore[arg-type]
        )
        provider = OpenAICompatProvider(config)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()
