"""Admission of one request before any upstream cost: the model and its token budget,
the cache policy, the reservation the limiter must grant, and what a refusal says."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sluice import canonical, tokens
from sluice.catalog import Catalog, ModelConfig
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.dialects.common import LimitHeaders
from services.gateway.domain.dialects.ratelimit import rate_limit_headers
from services.gateway.domain.problems import GatewayError
from services.gateway.settings import CacheMode


@dataclass(frozen=True)
class TokenBudget:
    """The prompt as counted, and the most output the request may produce (what the
    limiter reserves)."""

    prompt_tokens: int
    reserve_tokens: int


def check_model(
    catalog: Catalog,
    request: chat_pb2.ChatRequest,
    default_max_output_tokens: int,
    *,
    model: ModelConfig | None = None,
    prompt: int | None = None,
) -> TokenBudget:
    """The request's token budget on its model (``model``: the route it was resolved
    to), or the error a client must fix."""
    model = model or catalog.model(request.model)
    if model is None:
        raise SluiceError(
            ErrorCode.MODEL_NOT_FOUND,
            f"The model '{request.model[:100]}' is not served here.",
            param="model",
        )
    if prompt is None:
        prompt = tokens.count_chat(request)
    asked = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
    limits = {
        "prompt_tokens": prompt,
        "max_tokens": asked,
        "max_output_tokens": model.max_output_tokens,
        "context_window": model.context_window,
    }
    if asked > model.max_output_tokens:
        raise SluiceError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"max_tokens {asked} is above this model's limit of "
            f"{model.max_output_tokens} output tokens.",
            param="max_tokens",
            details=limits,
        )
    if prompt + asked > model.context_window or prompt >= model.context_window:
        raise SluiceError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"The prompt ({prompt} tokens) plus max_tokens ({asked}) exceeds the "
            f"context window of {model.context_window} tokens.",
            param="messages",
            details=limits,
        )
    reserve = asked or min(
        default_max_output_tokens, model.max_output_tokens, model.context_window - prompt
    )
    return TokenBudget(prompt, reserve)


@dataclass
class CachePolicy:
    lookup: bool
    store: bool


def cache_policy(
    mode: CacheMode, sampling: chat_pb2.SamplingParams, cache_control: str
) -> CachePolicy:
    if mode is CacheMode.OFF:
        return CachePolicy(False, False)
    if mode is CacheMode.DETERMINISTIC:
        deterministic = (
            sampling.HasField("temperature") and sampling.temperature == 0
        ) or sampling.HasField("seed")
        if not deterministic:
            return CachePolicy(False, False)
    directives = {d.strip().lower() for d in cache_control.split(",")} if cache_control else set()
    return CachePolicy(lookup="no-cache" not in directives, store="no-store" not in directives)


def reserve_request(
    key: keys_pb2.ApiKeyRecord,
    request: chat_pb2.ChatRequest,
    request_id: str,
    budget: TokenBudget,
) -> limiter_pb2.ReserveRequest:
    """What the limiter must hold before any upstream cost: the prompt as counted and
    the most the answer may use, under the key's own quotas."""
    return limiter_pb2.ReserveRequest(
        request_id=request_id,
        key_id=key.key_id,
        team_id=key.team_id,
        model=request.model,
        input_tokens=budget.prompt_tokens,
        max_output_tokens=budget.reserve_tokens,
        tokens_per_minute=key.tokens_per_minute,
        requests_per_minute=key.requests_per_minute,
        # No max_tokens: the limiter may hold the key's learned output instead.
        output_estimated=not request.sampling.HasField("max_tokens"),
    )


def admitted_headers(
    reservation: limiter_pb2.ReserveResponse, limit_headers: LimitHeaders = rate_limit_headers
) -> dict[str, str]:
    """The rate-limit headers of an admitted request; a refusal raises ``rate_limited``
    naming the level and limit that bound, or ``budget_exceeded`` for a USD budget."""
    headers = limit_headers(reservation.policies, reservation.denied_by)
    if not reservation.allowed:
        retry_ms = max(reservation.retry_after_ms, 1)
        policy = reservation.denied_by or "quota"
        details: dict[str, object] = {"policy": policy, "retry_after_ms": retry_ms}
        bound = next((p for p in reservation.policies if p.name == policy), None)
        if bound is not None:
            details["limit"] = bound.quota
            details["unit"] = bound.unit or ("tokens" if policy == "tpm" else "requests")
        if reservation.budget_exceeded:
            raise GatewayError(
                ErrorCode.BUDGET_EXCEEDED,
                f"The budget '{policy}' is spent for this period.",
                details=details,
                retry_after_ms=retry_ms,
                headers=headers,
            )
        raise GatewayError(
            ErrorCode.RATE_LIMITED,
            _rate_refusal(policy),
            details=details,
            retry_after_ms=retry_ms,
            headers=headers,
        )
    return headers


def _rate_refusal(policy: str) -> str:
    if policy in {"tpm", "rpm"}:
        return f"The '{policy}' limit of this key is used up."
    level, _, limit = policy.partition(".")
    return f"The {level.replace('_', ' ')}'s limit '{limit}' is used up ({policy})."


class DisconnectPolicy(StrEnum):
    """What happens to a generation whose client goes away (``x-sluice-on-disconnect``).

    ``continue``: it completes, is billed, and stays resumable from ``SLUICE_STREAMS``.
    ``cancel``: the gateway publishes on ``Subjects.cancel(request_id)``; the worker stops
    the upstream call and bills only what was produced.
    """

    CONTINUE = "continue"
    CANCEL = "cancel"


@dataclass(frozen=True)
class SemanticQuery:
    """The last user message and the hash of the rest of the request (empty: exact only)."""

    text: str = ""
    scope: str = ""


NO_SEMANTIC = SemanticQuery()


def semantic_query(request: chat_pb2.ChatRequest, team_id: str) -> SemanticQuery:
    """The semantic-cache query of a request; empty when its last turn is not plain user
    text (such a request uses the exact cache alone)."""
    text = canonical.semantic_text(request)
    if text is None:
        return NO_SEMANTIC
    return SemanticQuery(text, canonical.semantic_scope(request, team_id))


def spend_ceiling(key: keys_pb2.ApiKeyRecord, reservation: limiter_pb2.ReserveResponse) -> int:
    """The cost past which the worker cuts this request: the limiter's spend ceiling for
    a key whose ``on_budget_exhausted`` is ``cut``; 0 (finish) otherwise."""
    if key.on_budget_exhausted != "cut":
        return 0
    return max(0, reservation.spend_ceiling_usd_nanos)
