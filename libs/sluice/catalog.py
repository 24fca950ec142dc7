"""The model catalogue: the model names clients may ask for (routes), the deployments
that serve each, the rules that pick a route by the request, and each name's lifecycle,
loaded from ``config/providers.yaml``.

A **route** is a model name a client uses: an ordered chain of steps, each step one or
more **deployments** (a provider, a pinned upstream model, a weight, per-attempt bounds
on the time to first token and the total time, a retry limit) balanced by weight or by
the lowest observed latency. A route has a total deadline, a retry budget per request
(seconds and dollars spent on calls after the first) and a last resort for when every
deployment failed. The older form, ``provider`` and ``upstream_model`` on the model with
optional ``fallbacks`` naming other models, still reads: a one-deployment route whose
deployment is named after the model.

Every mistake is reported with the file and line (``CatalogError``), so a bad file
stops a service at start instead of surfacing as a failed request.

Values may reference environment variables as ``${NAME}`` or ``${NAME:-default}``, so
that ports and keys come from the environment. Provider keys are read from the variable
named by ``api_key_env`` at call time and never stored in this structure's repr.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import yaml

from sluice.settings import ConfigFileError
from sluice.yamlfile import LineReader, compose

_ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
BALANCE_MODES = ("weighted", "latency")
LAST_RESORT_CACHE = "last_resort:cache"
LAST_RESORT_TEMPLATE = "last_resort:template"


class CatalogError(ConfigFileError):
    """What is wrong with the catalogue file, and where (``file:line: ...``)."""


def _expand(value: str) -> str:
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


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
class Lifecycle:
    """Deprecation and retirement of a route or a deployment (RFC 9745, RFC 8594)."""

    deprecated_at: datetime | None = None
    sunset_at: datetime | None = None
    # A route (for a route or an exact pin) or a deployment (for a deployment in a chain).
    replacement: str = ""
    # Where the migration notes are (Link rel="deprecation").
    link: str = ""

    @property
    def announced(self) -> bool:
        return self.deprecated_at is not None or self.sunset_at is not None

    def retired(self, now: datetime) -> bool:
        return self.sunset_at is not None and now >= self.sunset_at

    def headers(self) -> dict[str, str]:
        """``Deprecation``, ``Sunset`` and ``Link`` for a name still served."""
        out: dict[str, str] = {}
        deprecated = self.deprecated_at or self.sunset_at
        if deprecated is not None:
            out["deprecation"] = f"@{int(deprecated.timestamp())}"
        if self.sunset_at is not None:
            out["sunset"] = format_datetime(self.sunset_at, usegmt=True)
        if self.link:
            out["link"] = f'<{self.link}>; rel="deprecation"'
        return out


@dataclass(frozen=True)
class Deployment:
    """One provider deployment of a route: where a call goes and how long it may take."""

    name: str
    provider: str
    upstream_model: str
    weight: float = 1.0
    # Per attempt: no first token after this many seconds (streams), or no answer after
    # ``timeout_seconds``, ends the attempt and counts against the breaker. An answer
    # whose output already reached the client is never cut for being slow, but a total
    # time above the bound still counts against the breaker.
    ttft_timeout_seconds: float | None = None
    timeout_seconds: float | None = None
    # Calls to this deployment per request, the first included (None: the worker's
    # SLUICE_WORKER_RETRY_ATTEMPTS).
    attempts: int | None = None
    # Extra body members sent to this deployment only (server settings, such as
    # llama.cpp's top_k or cache_prompt), as JSON text.
    params_json: str = ""
    lifecycle: Lifecycle = field(default_factory=Lifecycle)


@dataclass(frozen=True)
class Step:
    """One link of a route's chain: deployments tried before the next step."""

    deployments: tuple[Deployment, ...]
    # "weighted": a random order drawn by weight; "latency": the lowest observed
    # latency first (unmeasured deployments first, so that each gets measured).
    balance: str = "weighted"


@dataclass(frozen=True)
class LastResort:
    """What a route answers when every deployment failed."""

    # A stored exact-cache answer for the same request, when there is one.
    cache: bool = True
    # Else this text, as the assistant's answer (empty: none).
    template: str = ""
    # Else 503 upstream_unavailable with this Retry-After (seconds).
    retry_after_seconds: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    """A model name clients use (a route), and the chain of deployments that serve it."""

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
    steps: tuple[Step, ...] = ()
    # No request on this route runs longer than this (504 model_timeout); None: the
    # gateway's request timeout alone.
    deadline_seconds: float | None = None
    # Calls after the first may spend at most this long and cost at most this much.
    retry_budget_seconds: float | None = None
    retry_budget_usd: Decimal | None = None
    last_resort: LastResort | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # An exact pin: a client asked for one deployment by its name (no chain).
    pinned: bool = False

    def accepts(self, modality: str) -> bool:
        return not self.input or modality in self.input

    def deployments(self) -> Iterator[Deployment]:
        for step in self.steps:
            yield from step.deployments


@dataclass(frozen=True)
class RouteRule:
    """Picks another route for requests that match every condition it sets."""

    name: str
    route: str
    # Model names the rule applies to (empty: any).
    models: tuple[str, ...] = ()
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None
    tools: bool | None = None
    json_schema: bool | None = None
    tiers: tuple[str, ...] = ()
    # The value of the x-sluice-route header.
    hint: str = ""


@dataclass(frozen=True)
class Catalog:
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    deployments: dict[str, Deployment] = field(default_factory=dict)
    rules: tuple[RouteRule, ...] = ()
    # For each deployment, a route that uses it (context window and output limits of a pin).
    deployment_routes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"{path}: cannot read it ({exc.strerror})") from None
        return parse_catalog(text, str(path))

    def model(self, name: str) -> ModelConfig | None:
        """The route named ``name``, or an exact pin of the deployment of that name."""
        found = self.models.get(name)
        if found is not None:
            return found
        deployment = self.deployments.get(name)
        if deployment is None:
            return None
        host = self.models[self.deployment_routes[name]]
        return ModelConfig(
            name=name,
            provider=deployment.provider,
            upstream_model=deployment.upstream_model,
            context_window=host.context_window,
            max_output_tokens=host.max_output_tokens,
            owned_by=host.owned_by,
            steps=(Step((deployment,)),),
            deadline_seconds=host.deadline_seconds,
            retry_budget_seconds=host.retry_budget_seconds,
            retry_budget_usd=host.retry_budget_usd,
            lifecycle=deployment.lifecycle,
            pinned=True,
        )

    def chain(self, route: ModelConfig) -> list[tuple[str, Step]]:
        """The route's steps, then those of the models it names as fallbacks, each with
        the model name an answer of it is reported and priced under (an exact pin's:
        the route it is defined in)."""
        served = self.deployment_routes.get(route.name, route.name) if route.pinned else route.name
        steps = [(served, step) for step in route.steps]
        for name in route.fallbacks:
            fallback = self.models.get(name)
            if fallback is not None:
                steps.extend((fallback.name, step) for step in fallback.steps)
        return steps


# --- parsing ----------------------------------------------------------------------------


class _Reader(LineReader):
    def __init__(self, source: str) -> None:
        super().__init__(source, CatalogError)

    def text(self, node: yaml.Node, what: str) -> str:
        """A single value, environment references (``${VAR:-default}``) expanded."""
        return _expand(self.scalar(node, what))

    def name(self, node: yaml.Node, what: str) -> str:
        value = self.text(node, what)
        if not _NAME.match(value):
            raise self.fail(node, f"{what} {value!r}: letters, digits and . _ : / - only")
        return value

    def number(self, node: yaml.Node, what: str, *, positive: bool = True) -> float:
        raw = self.text(node, what)
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(node, f"{what} must be a number, not {raw!r}") from None
        if positive and not value > 0:
            raise self.fail(node, f"{what} must be above 0")
        return value

    def integer(self, node: yaml.Node, what: str, *, minimum: int = 1) -> int:
        raw = self.text(node, what)
        try:
            value = int(raw)
        except ValueError:
            raise self.fail(node, f"{what} must be a whole number, not {raw!r}") from None
        if value < minimum:
            raise self.fail(node, f"{what} must be at least {minimum}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        raw = self.text(node, what).lower()
        if raw in {"true", "yes", "on"}:
            return True
        if raw in {"false", "no", "off"}:
            return False
        raise self.fail(node, f"{what} must be true or false")

    def money(self, node: yaml.Node, what: str) -> Decimal:
        raw = self.text(node, what)
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise self.fail(node, f"{what} must be an amount in USD, not {raw!r}") from None
        if value < 0:
            raise self.fail(node, f"{what} must not be negative")
        return value

    def instant(self, node: yaml.Node, what: str) -> datetime:
        raw = self.text(node, what)
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise self.fail(
                node, f"{what} must be an ISO 8601 date or time (2027-01-31T00:00:00Z)"
            ) from None
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    def names(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):
            return (self.name(node, what),)
        return tuple(self.name(item, what) for item in self.sequence(node, what))

    def plain(self, node: yaml.Node) -> Any:
        """A node as plain data, environment references expanded."""
        if isinstance(node, yaml.MappingNode):
            return {self.text(k, "a key"): self.plain(v) for k, v in node.value}
        if isinstance(node, yaml.SequenceNode):
            return [self.plain(v) for v in node.value]
        loaded = yaml.safe_load(yaml.serialize(node))
        return _expand(loaded) if isinstance(loaded, str) else loaded


_PROVIDER_KEYS = {
    "kind",
    "base_url",
    "api_key_env",
    "timeout_seconds",
    "connect_timeout_seconds",
    "max_connections",
}
_LIFECYCLE_KEYS = {"deprecated_at", "sunset_at", "replacement", "deprecation_link"}
_DEPLOYMENT_KEYS = {
    "name",
    "provider",
    "upstream_model",
    "weight",
    "ttft_timeout_seconds",
    "timeout_seconds",
    "attempts",
    "params",
} | _LIFECYCLE_KEYS
_MODEL_KEYS = {
    "provider",
    "upstream_model",
    "context_window",
    "max_output_tokens",
    "owned_by",
    "description",
    "fallbacks",
    "chain",
    "deadline_seconds",
    "retry_budget",
    "last_resort",
    "input",
} | _LIFECYCLE_KEYS
PROVIDER_KINDS = ("openai", "anthropic")
INPUT_MODALITIES = ("text", "image")
_RULE_KEYS = {"name", "models", "when", "route"}
_WHEN_KEYS = {"min_input_tokens", "max_input_tokens", "tools", "json_schema", "tiers", "hint"}


def parse_catalog(text: str, source: str = "providers.yaml") -> Catalog:
    """The catalogue in ``text``; ``CatalogError`` names ``source`` and the line."""
    root = compose(text, source, CatalogError)
    if root is None:
        raise CatalogError(f"{source}: empty, expected 'providers:' and 'models:'")
    r = _Reader(source)
    top = r.mapping(root, "the file", {"providers", "models", "rules"})
    providers: dict[str, ProviderConfig] = {}
    if "providers" in top:
        for name, (key_node, node) in r.mapping(top["providers"][1], "providers", None).items():
            r.name(key_node, "provider name")
            providers[name] = _provider(r, name, node)
    models: dict[str, ModelConfig] = {}
    model_nodes: dict[str, yaml.Node] = {}
    deployments: dict[str, Deployment] = {}
    deployment_nodes: dict[str, yaml.Node] = {}
    deployment_routes: dict[str, str] = {}
    if "models" not in top:
        raise CatalogError(f"{r.at(root)}: 'models:' is missing")
    for name, (key_node, node) in r.mapping(top["models"][1], "models", None).items():
        r.name(key_node, "model name")
        model = _model(r, name, node, providers)
        models[name] = model
        model_nodes[name] = node
        for deployment in model.deployments():
            known = deployments.get(deployment.name)
            if known is not None and known != deployment:
                raise r.fail(
                    node,
                    f"model {name!r}: deployment {deployment.name!r} is defined twice with "
                    "different settings (define it once; name it elsewhere with the same "
                    "settings, or give the other one another name)",
                )
            deployments[deployment.name] = deployment
            deployment_nodes.setdefault(deployment.name, node)
            deployment_routes.setdefault(deployment.name, name)
    for name, model in models.items():
        node = model_nodes[name]
        for fallback in model.fallbacks:
            if fallback not in models:
                raise r.fail(
                    _value_of(node, "fallbacks"),
                    f"model {name!r} falls back to unknown model {fallback!r}",
                )
        replacement = model.lifecycle.replacement
        if replacement and replacement not in models:
            raise r.fail(
                _value_of(node, "replacement"),
                f"model {name!r}: replacement {replacement!r} is not a model",
            )
    for name, deployment in deployments.items():
        replacement = deployment.lifecycle.replacement
        if replacement and replacement not in deployments and replacement not in models:
            raise r.fail(
                deployment_nodes[name],
                f"deployment {name!r}: replacement {replacement!r} is neither a deployment "
                "nor a model",
            )
    rules: list[RouteRule] = []
    if "rules" in top:
        seen: set[str] = set()
        for item in r.sequence(top["rules"][1], "rules"):
            rule = _rule(r, item, models)
            if rule.name in seen:
                raise r.fail(item, f"rule {rule.name!r} appears twice")
            seen.add(rule.name)
            rules.append(rule)
    return Catalog(providers, models, deployments, tuple(rules), deployment_routes)


def _value_of(node: yaml.Node, key: str) -> yaml.Node:
    """The value node of ``key`` in a mapping node (the mapping itself when absent)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                found: yaml.Node = value_node
                return found
    return node


def _provider(r: _Reader, name: str, node: yaml.Node) -> ProviderConfig:
    parts = r.mapping(node, f"provider {name!r}", _PROVIDER_KEYS)
    for required in ("kind", "base_url"):
        if required not in parts:
            raise r.fail(node, f"provider {name!r}: {required!r} is missing")
    kind = r.text(parts["kind"][1], "kind")
    if kind not in PROVIDER_KINDS:
        raise r.fail(
            parts["kind"][1],
            f"provider {name!r}: kind must be one of {', '.join(PROVIDER_KINDS)}, not {kind!r}",
        )
    kwargs: dict[str, Any] = {"name": name, "kind": kind}
    kwargs["base_url"] = r.text(parts["base_url"][1], "base_url")
    if "api_key_env" in parts:
        kwargs["api_key_env"] = r.text(parts["api_key_env"][1], "api_key_env")
    for key in ("timeout_seconds", "connect_timeout_seconds"):
        if key in parts:
            kwargs[key] = r.number(parts[key][1], key)
    if "max_connections" in parts:
        kwargs["max_connections"] = r.integer(parts["max_connections"][1], "max_connections")
    return ProviderConfig(**kwargs)


def _lifecycle(r: _Reader, parts: dict[str, tuple[yaml.Node, yaml.Node]], what: str) -> Lifecycle:
    deprecated = sunset = None
    if "deprecated_at" in parts:
        deprecated = r.instant(parts["deprecated_at"][1], f"{what}: deprecated_at")
    if "sunset_at" in parts:
        sunset = r.instant(parts["sunset_at"][1], f"{what}: sunset_at")
    if deprecated is not None and sunset is not None and sunset < deprecated:
        raise r.fail(parts["sunset_at"][1], f"{what}: sunset_at is before deprecated_at")
    replacement = ""
    if "replacement" in parts:
        replacement = r.name(parts["replacement"][1], f"{what}: replacement")
    link = (
        r.text(parts["deprecation_link"][1], "deprecation_link")
        if "deprecation_link" in parts
        else ""
    )
    return Lifecycle(deprecated, sunset, replacement, link)


def _deployment(
    r: _Reader,
    route: str,
    node: yaml.Node,
    providers: dict[str, ProviderConfig],
    default_name: str | None,
) -> Deployment:
    what = f"a deployment of model {route!r}"
    parts = r.mapping(node, what, _DEPLOYMENT_KEYS)
    if "name" in parts:
        name = r.name(parts["name"][1], "deployment name")
    elif default_name is not None:
        name = default_name
    else:
        raise r.fail(node, f"{what}: 'name' is missing (breakers and pins go by it)")
    what = f"deployment {name!r}"
    for required in ("provider", "upstream_model"):
        if required not in parts:
            raise r.fail(node, f"{what}: {required!r} is missing")
    provider = r.text(parts["provider"][1], "provider")
    if provider not in providers:
        raise r.fail(parts["provider"][1], f"{what} names unknown provider {provider!r}")
    kwargs: dict[str, Any] = {
        "name": name,
        "provider": provider,
        "upstream_model": r.text(parts["upstream_model"][1], "upstream_model"),
        "lifecycle": _lifecycle(r, parts, what),
    }
    if "weight" in parts:
        kwargs["weight"] = r.number(parts["weight"][1], f"{what}: weight")
    for key in ("ttft_timeout_seconds", "timeout_seconds"):
        if key in parts:
            kwargs[key] = r.number(parts[key][1], f"{what}: {key}")
    if "attempts" in parts:
        kwargs["attempts"] = r.integer(parts["attempts"][1], f"{what}: attempts")
    if "params" in parts:
        params = r.plain(parts["params"][1])
        if not isinstance(params, dict):
            raise r.fail(parts["params"][1], f"{what}: params must be a mapping")
        kwargs["params_json"] = json.dumps(params, sort_keys=True)
    return Deployment(**kwargs)


def _step(r: _Reader, route: str, node: yaml.Node, providers: dict[str, ProviderConfig]) -> Step:
    """A chain item: one deployment (a mapping with 'provider'), or a step with
    'deployments' and an optional 'balance'."""
    if isinstance(node, yaml.MappingNode):
        keys = {r.text(k, "a key") for k, _ in node.value}
        if "deployments" not in keys:
            return Step((_deployment(r, route, node, providers, None),))
    parts = r.mapping(node, f"a step of model {route!r}", {"deployments", "balance"})
    items = r.sequence(parts["deployments"][1], "deployments")
    if not items:
        raise r.fail(parts["deployments"][1], f"a step of model {route!r} has no deployment")
    balance = "weighted"
    if "balance" in parts:
        balance = r.text(parts["balance"][1], "balance")
        if balance not in BALANCE_MODES:
            raise r.fail(
                parts["balance"][1],
                f"balance must be one of {', '.join(BALANCE_MODES)}, not {balance!r}",
            )
    found = tuple(_deployment(r, route, item, providers, None) for item in items)
    names = [d.name for d in found]
    if len(set(names)) != len(names):
        raise r.fail(parts["deployments"][1], "a step names one deployment twice")
    return Step(found, balance)


def _model(
    r: _Reader, name: str, node: yaml.Node, providers: dict[str, ProviderConfig]
) -> ModelConfig:
    what = f"model {name!r}"
    parts = r.mapping(node, what, _MODEL_KEYS)
    steps: list[Step] = []
    if "chain" in parts:
        if "provider" in parts or "upstream_model" in parts:
            raise r.fail(node, f"{what}: give either 'chain' or 'provider' and 'upstream_model'")
        for item in r.sequence(parts["chain"][1], "chain"):
            steps.append(_step(r, name, item, providers))
        if not steps:
            raise r.fail(parts["chain"][1], f"{what}: the chain is empty")
    else:
        legacy = {
            k: (k_node, v)
            for k, (k_node, v) in parts.items()
            if k in {"provider", "upstream_model"}
        }
        if "provider" not in legacy or "upstream_model" not in legacy:
            raise r.fail(node, f"{what}: give 'chain', or 'provider' and 'upstream_model'")
        mapping = yaml.MappingNode(
            "tag:yaml.org,2002:map",
            [legacy["provider"], legacy["upstream_model"]],
            start_mark=node.start_mark,
        )
        steps.append(Step((_deployment(r, name, mapping, providers, name),)))
    first = steps[0].deployments[0]
    kwargs: dict[str, Any] = {
        "name": name,
        "provider": first.provider,
        "upstream_model": first.upstream_model,
        "steps": tuple(steps),
        "lifecycle": _lifecycle(r, parts, what),
    }
    for key in ("context_window", "max_output_tokens"):
        if key in parts:
            kwargs[key] = r.integer(parts[key][1], f"{what}: {key}")
    for key in ("owned_by", "description"):
        if key in parts:
            kwargs[key] = r.text(parts[key][1], key)
    if "fallbacks" in parts:
        kwargs["fallbacks"] = r.names(parts["fallbacks"][1], f"{what}: fallbacks")
    if "deadline_seconds" in parts:
        kwargs["deadline_seconds"] = r.number(
            parts["deadline_seconds"][1], f"{what}: deadline_seconds"
        )
    if "retry_budget" in parts:
        budget = r.mapping(parts["retry_budget"][1], f"{what}: retry_budget", {"seconds", "usd"})
        if "seconds" in budget:
            kwargs["retry_budget_seconds"] = r.number(
                budget["seconds"][1], "retry_budget.seconds", positive=False
            )
        if "usd" in budget:
            kwargs["retry_budget_usd"] = r.money(budget["usd"][1], "retry_budget.usd")
    if "last_resort" in parts:
        kwargs["last_resort"] = _last_resort(r, what, parts["last_resort"][1])
    if "input" in parts:
        modalities = r.names(parts["input"][1], f"{what}: input")
        for modality in modalities:
            if modality not in INPUT_MODALITIES:
                raise r.fail(
                    parts["input"][1],
                    f"{what}: input {modality!r} is not one of {', '.join(INPUT_MODALITIES)}",
                )
        kwargs["input"] = modalities
    return ModelConfig(**kwargs)


def _last_resort(r: _Reader, what: str, node: yaml.Node) -> LastResort:
    parts = r.mapping(node, f"{what}: last_resort", {"cache", "template", "retry_after_seconds"})
    kwargs: dict[str, Any] = {}
    if "cache" in parts:
        kwargs["cache"] = r.boolean(parts["cache"][1], "last_resort.cache")
    if "template" in parts:
        kwargs["template"] = r.text(parts["template"][1], "last_resort.template")
    if "retry_after_seconds" in parts:
        kwargs["retry_after_seconds"] = r.number(
            parts["retry_after_seconds"][1], "last_resort.retry_after_seconds"
        )
    return LastResort(**kwargs)


def _rule(r: _Reader, node: yaml.Node, models: dict[str, ModelConfig]) -> RouteRule:
    parts = r.mapping(node, "a rule", _RULE_KEYS)
    for required in ("name", "route"):
        if required not in parts:
            raise r.fail(node, f"a rule: {required!r} is missing")
    name = r.name(parts["name"][1], "rule name")
    route_node = parts["route"][1]
    route = r.name(route_node, f"rule {name!r}: route")
    if route not in models:
        raise r.fail(route_node, f"rule {name!r} routes to unknown model {route!r}")
    kwargs: dict[str, Any] = {"name": name, "route": route}
    if "models" in parts:
        applies = r.names(parts["models"][1], f"rule {name!r}: models")
        for model in applies:
            if model not in models:
                raise r.fail(
                    parts["models"][1], f"rule {name!r} applies to unknown model {model!r}"
                )
        kwargs["models"] = applies
    if "when" in parts:
        when = r.mapping(parts["when"][1], f"rule {name!r}: when", _WHEN_KEYS)
        for key in ("min_input_tokens", "max_input_tokens"):
            if key in when:
                kwargs[key] = r.integer(when[key][1], f"rule {name!r}: {key}", minimum=0)
        for key in ("tools", "json_schema"):
            if key in when:
                kwargs[key] = r.boolean(when[key][1], f"rule {name!r}: {key}")
        if "tiers" in when:
            kwargs["tiers"] = r.names(when["tiers"][1], f"rule {name!r}: tiers")
        if "hint" in when:
            kwargs["hint"] = r.text(when["hint"][1], f"rule {name!r}: hint")
    return RouteRule(**kwargs)
