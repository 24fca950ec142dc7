"""Provider adapters of the inference worker (``ChatProvider``s), one pooled client per
configured provider: ``openai_compat`` over the wire format of ``wire`` (kind
``openai``), ``anthropic`` for Anthropic-compatible Messages APIs (kind ``anthropic``)."""

from __future__ import annotations

from sluice.catalog import Catalog, ProviderConfig

from services.inference_worker.adapters.providers.anthropic import AnthropicProvider
from services.inference_worker.adapters.providers.openai_compat import OpenAICompatProvider
from services.inference_worker.domain.upstream import ChatProvider


def build_provider(config: ProviderConfig) -> ChatProvider:
    if config.kind == "openai":
        return OpenAICompatProvider(config)
    if config.kind == "anthropic":
        return AnthropicProvider(config)
    raise ValueError(f"provider {config.name!r} has unsupported kind {config.kind!r}")


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
