"""Provider adapters of the inference worker (``ChatProvider``s), one pooled client per
configured provider: ``openai_compat`` over the wire format of ``wire``."""

from __future__ import annotations

from sluice.catalog import Catalog

from services.inference_worker.adapters.providers.openai_compat import build_provider
from services.inference_worker.domain.upstream import ChatProvider


class ProviderPool:
    """``Providers``: one adapter (and so one HTTP connection pool) per provider of the
    catalogue."""

    def __init__(self, catalog: Catalog) -> None:
        self.providers: dict[str, ChatProvider] = {
            name: build_provider(config) for name, config in catalog.providers.items()
        }

    def get(self, name: str) -> ChatProvider:
        return self.providers[name]

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
