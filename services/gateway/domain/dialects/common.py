"""What every public API dialect shares on the chat data path: the request's metadata,
the ``sluice`` object that rides on each answer, SSE framing, and ``Dialect``, the set
of renderers a dialect plugs into that path (``openai.response.OPENAI``,
``anthropic.response.ANTHROPIC``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sluice.common.v1 import chat_pb2
from sluice.errors import SluiceError
from sluice.inference.v1 import inference_pb2
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.tenancy.audit import RequestNotes
from services.gateway.domain.verdict import AnswerTally, Checks, Verdict, assess

SSE_DONE = b"data: [DONE]\n\n"


SSE_HEARTBEAT = b": keep-alive\n\n"


def sse_retry(ms: int) -> bytes:
    """The reconnect hint (WHATWG ``retry:`` field) as a line to put in front of the
    stream's first event: an event of its own, without data, would reach the OpenAI
    SDK as an empty ``data`` that it fails to parse as JSON."""
    return b"retry: %d\n" % max(0, ms)


@dataclass
class RequestMeta:
    """What the gateway knows about one request, for the response and its ``sluice``."""

    request_id: str
    trace_id: str
    model_requested: str
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    cache: str = "bypass"
    # Why a lookup was meant but not made (``unavailable``: the cache did not answer
    # within its budget), as ``x-sluice-cache-reason``.
    cache_reason: str = ""
    cache_ms: float = 0.0
    # Set on a semantic hit: how close the stored question was to this one.
    cache_similarity: float | None = None
    ttft_ms: float | None = None
    # The prompt as the gateway counted it: Anthropic's message_start reports it before
    # the provider's own count arrives with the answer.
    prompt_tokens: int = 0
    # The request's audit notes, which get the final usage and cost.
    notes: RequestNotes | None = None
    # What the answer is judged against, the answer as seen so far (stream deltas) and,
    # once judged, the verdict (domain.verdict): the sluice status of the answer.
    checks: Checks = field(default_factory=Checks)
    tally: AnswerTally = field(default_factory=AnswerTally)
    verdict: Verdict | None = None
    # Set when a schema repair was tried: its request id and whether it succeeded.
    repair: dict[str, Any] | None = None
    # The finished answer, once rendered.
    answered: inference_pb2.Final | None = None
    # The route that serves it and the routing rule that chose it (domain.routing).
    route: str = ""
    route_rule: str = ""
    # How long the gateway waits for the answer.
    deadline_ms: int | None = None

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    @property
    def completion_id(self) -> str:
        return "chatcmpl-" + self.request_id.removeprefix("req_")


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def sluice_object(
    meta: RequestMeta,
    *,
    usage: chat_pb2.Usage,
    model_served: str,
    provider: str,
    cost_usd: float,
    timing: chat_pb2.Timing | None,
) -> dict[str, Any]:
    total = (time.perf_counter() - meta.started) * 1000
    queue = _ms(timing.queue_wait_us) if timing is not None else 0.0
    upstream = _ms(timing.upstream_total_us) if timing is not None else 0.0
    if meta.ttft_ms is not None:
        ttft = meta.ttft_ms
    elif timing is not None and timing.upstream_ttft_us:
        ttft = queue + _ms(timing.upstream_ttft_us)
    else:
        ttft = total
    sluice: dict[str, Any] = {
        "request_id": meta.request_id,
        "trace_id": meta.trace_id,
        "model_requested": meta.model_requested,
        "model_served": model_served,
        "provider": provider,
        "cache": meta.cache,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        },
        "cost_usd": cost_usd,
        "latency_ms": {
            "queue": queue,
            "cache": round(meta.cache_ms, 3),
            "ttft": round(ttft, 3),
            "upstream": upstream,
            "total": round(total, 3),
            "overhead": round(max(0.0, total - queue - upstream), 3),
        },
    }
    if meta.cache_similarity is not None:
        sluice["cache_similarity"] = round(meta.cache_similarity, 4)
    return sluice


def judge(meta: RequestMeta, final: inference_pb2.Final) -> Verdict:
    """The verdict on a finished answer: its choices (a whole answer) or the deltas the
    relay saw (a stream, whose ``Final`` carries none)."""
    if final.choices:
        meta.tally.set_choices(final.choices)
    meta.verdict = assess(meta.tally, meta.checks, degraded=final.degraded_reason)
    return meta.verdict


def interrupted_sluice(meta: RequestMeta) -> dict[str, Any]:
    """The status members of a stream that broke after output: what the client holds is
    a prefix (``truncated``), or nothing usable (``failed``)."""
    verdict = assess(meta.tally, meta.checks, interrupted=True)
    return {"request_id": meta.request_id, **verdict.to_json()}


def final_sluice(
    meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool
) -> dict[str, Any]:
    if meta.notes is not None:
        meta.notes.usage = final.usage
        meta.notes.cost_usd = 0.0 if cache_hit else final.cost_usd
    meta.answered = final
    verdict = meta.verdict or judge(meta, final)
    sluice = sluice_object(
        meta,
        usage=final.usage,
        model_served=final.model_served or meta.model_requested,
        provider=final.provider,
        # A cached answer costs nothing again.
        cost_usd=0.0 if cache_hit else final.cost_usd,
        timing=None if cache_hit else final.timing,
    )
    sluice.update(verdict.to_json())
    if meta.repair is not None:
        sluice["repair"] = meta.repair
    if final.deployment and not cache_hit:
        sluice["deployment"] = final.deployment
    return sluice


class StreamRenderer(Protocol):
    """Renders one request's stream events as the SSE events of a public API."""

    def delta(self, sequence: int, d: inference_pb2.Delta) -> bytes: ...

    def final(self, sequence: int, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes: ...

    def failure(self, sequence: int, problem_json: bytes) -> bytes: ...

    def replay(self, final: inference_pb2.Final, sluice: dict[str, Any]) -> bytes:
        """A whole stream synthesised from a finished answer (a cache hit)."""
        ...

    def heartbeat(self) -> bytes:
        """What an idle stream sends to keep proxies from closing it."""
        ...


class StreamRendererFactory(Protocol):
    def __call__(self, meta: RequestMeta, *, include_usage: bool) -> StreamRenderer: ...


class BodyRenderer(Protocol):
    def __call__(
        self, meta: RequestMeta, final: inference_pb2.Final, *, cache_hit: bool
    ) -> bytes: ...


class ErrorRenderer(Protocol):
    def __call__(
        self, err: SluiceError, *, instance: str, request_id: str, trace_id: str
    ) -> bytes: ...


LimitHeaders = Callable[[Sequence[limiter_pb2.PolicyState], str], dict[str, str]]


@dataclass(frozen=True)
class Dialect:
    """How one public API answers on the shared chat data path: the whole body, the
    stream, the error body of a stream that fails mid-way, and the rate-limit headers.
    Everything else (admission, cache, work, relay, cost, tracing) is the same."""

    name: str
    body: BodyRenderer
    stream: StreamRendererFactory
    error: ErrorRenderer
    limit_headers: LimitHeaders
    # The media type of ``error``'s bodies.
    error_media_type: str
