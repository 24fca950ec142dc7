"""What the engine asks of a provider and gets back, independent of the wire protocol:
``ChatProvider`` (one deployment, an adapter in ``adapters/providers``), ``Providers``
(one per configured provider), the ``UpstreamAnswer`` of a finished call, the
``UpstreamFailure`` of a failed one and which failures are worth a retry, a fallback or
a circuit's count, and ``ChoiceAssembler``, which rebuilds choices from deltas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from sluice import tokens
from sluice.catalog import ProviderConfig
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

DeltaSink = Callable[[inference_pb2.Delta], Awaitable[None]]


@dataclass
class UpstreamAnswer:
    """A finished provider answer (streamed or not) in proto terms."""

    response_id: str
    model: str
    created_unix: int
    choices: list[chat_pb2.Choice]
    usage: chat_pb2.Usage
    # False when the provider sent no usage and the adapter counted it itself.
    usage_reported: bool
    system_fingerprint: str = ""
    # Seconds from sending the request to the first relayed delta (streams only).
    ttft_s: float | None = None
    total_s: float = 0.0

    @property
    def finish_reasons(self) -> list[str]:
        return [c.finish_reason for c in self.choices]


# Codes worth a second try against the same provider (before any output was relayed).
RETRY_SAME: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.UPSTREAM_RATE_LIMITED,
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
    }
)
# Codes that say nothing about another deployment: the client must change the request.
NO_FALLBACK: frozenset[ErrorCode] = frozenset({ErrorCode.INVALID_REQUEST})
# Codes that count against a provider's circuit (a throttle or a bad request does not).
CIRCUIT_FAILURES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
    }
)


@dataclass
class UpstreamFailure(Exception):
    """A provider call that ended without a complete answer.

    ``error.detail`` is safe for clients: no prompt text, no keys. ``usage`` is what was
    produced before the failure (zero unless output had started). ``relayed`` is true
    when deltas already went to the client, which rules out retrying.
    """

    error: SluiceError
    usage: chat_pb2.Usage = field(default_factory=chat_pb2.Usage)
    relayed: bool = False
    upstream_status: int = 0
    # Set for failures that retrying the same provider cannot fix (bad credentials...).
    permanent: bool = False
    # Set when the attempt was ended for slowness (a bound of the deployment passed).
    latency: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.error.detail)

    @property
    def code(self) -> ErrorCode:
        return self.error.code

    @property
    def retry_same(self) -> bool:
        return not self.relayed and not self.permanent and self.code in RETRY_SAME

    @property
    def try_fallback(self) -> bool:
        return not self.relayed and self.code not in NO_FALLBACK

    @property
    def counts_against_circuit(self) -> bool:
        return self.code in CIRCUIT_FAILURES or self.permanent


class ChatProvider(Protocol):
    """One provider deployment: an OpenAI-compatible server today."""

    config: ProviderConfig

    async def chat(
        self,
        request: chat_pb2.ChatRequest,
        upstream_model: str,
        *,
        on_delta: DeltaSink | None = None,
        deadline: float | None = None,
    ) -> UpstreamAnswer:
        """Call the provider; stream (relaying deltas to ``on_delta``) when it is set.

        ``deadline`` is a ``time.monotonic()`` instant after which the call gives up.
        Raises ``UpstreamFailure``.
        """
        ...

    async def close(self) -> None: ...


class Providers(Protocol):
    """One adapter (and so one connection pool) per provider of the catalogue."""

    def get(self, name: str) -> ChatProvider: ...


class ChoiceAssembler:
    """Rebuilds whole choices from stream deltas (for the cache and the span)."""

    def __init__(self) -> None:
        self._content: dict[int, list[str]] = {}
        self._refusal: dict[int, list[str]] = {}
        self._finish: dict[int, str] = {}
        self._calls: dict[int, dict[int, chat_pb2.ToolCall]] = {}
        self._logprobs: dict[int, chat_pb2.Logprobs] = {}

    def add(self, delta: inference_pb2.Delta) -> None:
        i = delta.choice_index
        if delta.content:
            self._content.setdefault(i, []).append(delta.content)
        if delta.refusal:
            self._refusal.setdefault(i, []).append(delta.refusal)
        if delta.finish_reason:
            self._finish[i] = delta.finish_reason
        if delta.HasField("logprobs"):
            logprobs = self._logprobs.setdefault(i, chat_pb2.Logprobs())
            logprobs.content.extend(delta.logprobs.content)
            logprobs.refusal.extend(delta.logprobs.refusal)
        for call in delta.tool_calls:
            calls = self._calls.setdefault(i, {})
            known = calls.get(call.index)
            if known is None:
                calls[call.index] = chat_pb2.ToolCall(
                    index=call.index,
                    id=call.id,
                    type=call.type or "function",
                    name=call.name,
                    arguments=call.arguments,
                )
            else:
                known.id = known.id or call.id
                known.name = known.name or call.name
                known.arguments += call.arguments

    def indices(self) -> set[int]:
        return {*self._content, *self._refusal, *self._finish, *self._calls}

    def finished(self) -> bool:
        """Every choice that started has a finish reason."""
        return bool(self._finish) and self.indices() <= set(self._finish)

    def choices(self) -> list[chat_pb2.Choice]:
        return [
            chat_pb2.Choice(
                index=i,
                content="".join(self._content.get(i, ())),
                refusal="".join(self._refusal.get(i, ())),
                finish_reason=self._finish.get(i, ""),
                tool_calls=[c for _, c in sorted(self._calls.get(i, {}).items())],
                logprobs=self._logprobs.get(i),
            )
            for i in sorted(self.indices())
        ]

    def output_text_tokens(self) -> int:
        """Output tokens counted locally, for when the provider reports no usage."""
        total = 0
        for parts in (*self._content.values(), *self._refusal.values()):
            total += tokens.count_text("".join(parts))
        for calls in self._calls.values():
            for call in calls.values():
                total += tokens.count_text(call.name) + tokens.count_text(call.arguments)
        return total
