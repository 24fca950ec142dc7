"""Provider adapters of the inference worker, one pooled client per configured provider."""

from __future__ import annotations

from sluice.catalog import Catalog

from .base import ChatProvider, DeltaSink, UpstreamAnswer, UpstreamFailure
from .openai_compat import OpenAICompatProvider, build_provider


class ProviderPool:
    """One adapter (and so one HTTP connection pool) per provider of the catalogue."""

    def __init__(self, catalog: Catalog) -> None:
        self.providers: dict[str, ChatProvider] = {
            name: build_provider(config) for name, config in catalog.providers.items()
        }

    def get(self, name: str) -> ChatProvider:
        return self.providers[name]

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()


__all__ = [
    "ChatProvider",
    "DeltaSink",
    "OpenAICompatProvider",
    "ProviderPool",
    "UpstreamAnswer",
    "UpstreamFailure",
    "build_provider",
]
