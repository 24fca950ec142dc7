"""Taking over a half-streamed request, and cancelling one.

**Takeover.** When a worker dies mid-generation JetStream redelivers the work to another
worker. The client (live or resuming) has already seen the events the first worker
published, so the new worker must not start over at sequence 1. It reads the request's
history from ``SLUICE_STREAMS`` and:

- a terminal event is already there: the answer is over; only the usage event (and the
  lifecycle record) may be missing, so they are published again (both deduplicated);
- nothing was relayed: it runs the request normally;
- plain text of one choice was relayed: it asks the provider to *continue* it, sending
  the partial text as a trailing assistant message (assistant prefill: llama.cpp's
  server, vLLM with ``continue_final_message`` semantics, and the simulator continue such
  a message), and numbers the continuation after the last published sequence;
- anything else (tool calls or a refusal in flight, ``n`` > 1, a finished choice): it
  cannot continue without garbling, so the stream ends with an explicit failure.

Usage is billed once for the whole answer: the prompt as the client sent it, plus the
output tokens of every attempt (the relayed prefix counted with ``sluice.tokens``).

**Cancel.** ``Subjects.cancel(request_id)`` (client disconnect under the ``cancel``
policy, or a job cancel) reaches every worker. The one running the request cancels its
task, which closes the upstream HTTP stream; any worker remembers the id for a while so
that work still queued is ended as cancelled instead of run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from sluice import tokens
from sluice.common.v1 import chat_pb2
from sluice.replay import History


@dataclass
class Takeover:
    """What a redelivered work item continues from."""

    last_sequence: int
    prefix: str
    prior_output_tokens: int
    request: chat_pb2.ChatRequest
    # Prompt tokens the prefill adds (removed again from the provider's figure).
    prefill_tokens: int


def can_continue(request: chat_pb2.ChatRequest, history: History) -> bool:
    n = request.sampling.n if request.sampling.HasField("n") else 1
    return n <= 1 and history.continuable()


def continuation(request: chat_pb2.ChatRequest, history: History) -> Takeover:
    """The request that continues the partial answer in ``history`` (one text choice)."""
    prefix = history.partial_content().get(0, "")
    prior = tokens.count_text(prefix)
    continued = chat_pb2.ChatRequest()
    continued.CopyFrom(request)
    continued.messages.append(chat_pb2.Message(role="assistant", text=prefix))
    if continued.sampling.HasField("max_tokens"):
        continued.sampling.max_tokens = max(1, continued.sampling.max_tokens - prior)
    return Takeover(
        last_sequence=history.last_sequence,
        prefix=prefix,
        prior_output_tokens=prior,
        request=continued,
        prefill_tokens=tokens.count_chat(continued) - tokens.count_chat(request),
    )


def whole_usage(
    takeover: Takeover | None, original: chat_pb2.ChatRequest, usage: chat_pb2.Usage
) -> chat_pb2.Usage:
    """Usage of the whole answer from the usage of the last attempt."""
    if takeover is None:
        return usage
    out = chat_pb2.Usage()
    out.CopyFrom(usage)
    if usage.input_tokens:
        out.input_tokens = max(0, usage.input_tokens - takeover.prefill_tokens)
    else:
        out.input_tokens = tokens.count_chat(original)
    out.output_tokens = usage.output_tokens + takeover.prior_output_tokens
    return out


class CancelRegistry:
    """Request ids cancelled recently (bounded in time and size)."""

    def __init__(self, remember_seconds: float = 900.0, max_entries: int = 100_000) -> None:
        self.remember_seconds = remember_seconds
        self.max_entries = max_entries
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids[request_id] = now
        self._ids.move_to_end(request_id)
        self._expire(now)

    def __contains__(self, request_id: object) -> bool:
        self._expire(time.monotonic())
        return request_id in self._ids

    def _expire(self, now: float) -> None:
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if now - at <= self.remember_seconds and len(self._ids) <= self.max_entries:
                break
            self._ids.pop(oldest)
