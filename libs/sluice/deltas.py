"""Which stream deltas may be joined into one: plain text of one choice, nothing that a
client reads as a boundary (a tool call, a refusal, the end of the choice)."""

from __future__ import annotations

from sluice.inference.v1 import inference_pb2


def mergeable(delta: inference_pb2.Delta) -> bool:
    return bool(delta.content) and not (delta.tool_calls or delta.refusal or delta.finish_reason)


def can_join(first: inference_pb2.Delta, then: inference_pb2.Delta) -> bool:
    """``then``'s text may be appended to ``first`` (same choice, both plain text)."""
    return first.choice_index == then.choice_index and mergeable(first) and mergeable(then)


def join(first: inference_pb2.Delta, then: inference_pb2.Delta) -> None:
    """Appends ``then`` to ``first`` (``can_join`` said yes): its text and, when the
    request asked for them, its tokens' log probabilities."""
    first.content += then.content
    if then.HasField("logprobs"):
        first.logprobs.content.extend(then.logprobs.content)
