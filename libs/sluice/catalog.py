"""The model catalogue: which model names clients may ask for, and which provider
deployment serves each, loaded from ``config/providers.yaml``.

Values may reference environment variables as ``${NAME}`` or ``${NAME:-default}``, so
that ports and keys come from the environment. Provider keys are read from the variable
named by ``api_key_env`` at call time and never stored in this structure's repr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    # "openai" (OpenAI-compatible: OpenAI, vLLM, llama.cpp, Ollama, the simulator), or
    # "anthropic" (Anthropic-compatible Messages API).
    kind: str
    base_url: str
    api_key_env: str = ""
    timeout_seconds: float = 120.0
    connect_timeout_seconds: float = 5.0
    max_connections: int = 256

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def __repr__(self) -> str:  # keys are never part of a repr
        return f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r})"


@dataclass(frozen=True)
class ModelConfig:
    """A model name clients use, and the chain of deployments that serve it."""

    name: str
    provider: str
    upstream_model: str
    context_window: int = 8192
    max_output_tokens: int = 4096
    owned_by: str = "sluice"
    description: str = ""
    fallbacks: tuple[str, ...] = field(default_factory=tuple)
    # What the model takes in ("text", "image"); empty: not declared, the provider
    # decides. A model declared without "image" gets 400 for an image part.
    input: tuple[str, ...] = field(default_factory=tuple)

    def accepts(self, modality: str) -> bool:
        return not self.input or modality in self.input


@dataclass(frozen=True)
class Catalog:
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]

    @classmethod
    def load(cls, path: Path) -> Catalog:
        data = _expand(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        providers = {
            name: ProviderConfig(name=name, **entry)
            for name, entry in (data.get("providers") or {}).items()
        }
        models: dict[str, ModelConfig] = {}
        for name, raw_entry in (data.get("models") or {}).items():
            entry = dict(raw_entry)
            entry["fallbacks"] = tuple(entry.get("fallbacks") or ())
            entry["input"] = tuple(entry.get("input") or ())
            model = ModelConfig(name=name, **entry)
            if model.provider not in providers:
                raise ValueError(f"model {name!r} names unknown provider {model.provider!r}")
            models[name] = model
        for model in models.values():
            for fallback in model.fallbacks:
                if fallback not in models:
                    raise ValueError(f"model {model.name!r} falls back to unknown {fallback!r}")
        return cls(providers, models)

    def model(self, name: str) -> ModelConfig | None:
        return self.models.get(name)
