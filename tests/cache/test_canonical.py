"""``sluice.canonical``: the semantic-cache text and scope beside the exact-cache key."""

from __future__ import annotations

from typing import Any

import pytest
from sluice import canonical
from sluice.common.v1 import chat_pb2


def msg(role: str, text: str | None = None, **kw: Any) -> chat_pb2.Message:
    m = chat_pb2.Message(role=role, **kw)
    if text is not None:
        m.text = text
    return m


def chat(*messages: chat_pb2.Message, **kw: Any) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        model=kw.pop("model", "m"),
        messages=list(messages),
        sampling=kw.pop("sampling", chat_pb2.SamplingParams(temperature=0)),
        **kw,
    )


SYSTEM = msg("system", "You answer briefly.")


def test_the_text_is_the_last_user_message_stripped() -> None:
    req = chat(SYSTEM, msg("user", "first"), msg("assistant", "ok"), msg("user", "  second \n"))
    assert canonical.semantic_text(req) == "second"
    parts = chat(
        msg(
            "user",
            parts=[
                chat_pb2.ContentPart(type="text", text="a"),
                chat_pb2.ContentPart(type="text", text="b"),
            ],
        )
    )
    assert canonical.semantic_text(parts) == "a\nb"


@pytest.mark.parametrize(
    "last",
    [
        msg("assistant", "prefill"),
        msg("tool", "42", tool_call_id="c1"),
        msg("user", "   "),
        msg(
            "user",
            parts=[
                chat_pb2.ContentPart(type="text", text="what is this"),
                chat_pb2.ContentPart(type="image_url", image_url="https://example.com/a.png"),
            ],
        ),
    ],
    ids=["assistant-last", "tool-last", "blank", "image"],
)
def test_no_text_when_the_last_turn_is_not_plain_user_text(last: chat_pb2.Message) -> None:
    assert canonical.semantic_text(chat(msg("user", "hi"), last)) is None
    assert canonical.semantic_text(chat_pb2.ChatRequest(model="m")) is None


def test_scope_ignores_the_last_user_text_and_delivery_options() -> None:
    a = chat(SYSTEM, msg("user", "What is the capital of France?"))
    b = chat(SYSTEM, msg("user", "Which city is France's capital?"), stream=True, user="u1")
    b.metadata["k"] = "v"
    assert canonical.semantic_scope(a, "team") == canonical.semantic_scope(b, "team")
    # The exact key still tells them apart.
    assert canonical.cache_key(a, "team") != canonical.cache_key(b, "team")
    # Same parts again give the same scope: it is a pure function of the request.
    assert canonical.semantic_scope(a, "team") == canonical.semantic_scope(a, "team")


@pytest.mark.parametrize(
    "other",
    [
        chat(SYSTEM, msg("user", "q"), model="other-model"),
        chat(msg("system", "You answer at length."), msg("user", "q")),
        chat(msg("user", "q")),
        chat(SYSTEM, msg("user", "earlier"), msg("assistant", "x"), msg("user", "q")),
        chat(SYSTEM, msg("user", "q"), sampling=chat_pb2.SamplingParams(temperature=0, seed=1)),
        chat(
            SYSTEM, msg("user", "q"), sampling=chat_pb2.SamplingParams(temperature=0, max_tokens=9)
        ),
        chat(SYSTEM, msg("user", "q"), tools=[chat_pb2.Tool(type="function", name="f")]),
        chat(SYSTEM, msg("user", "q"), response_format=chat_pb2.ResponseFormat(type="json_object")),
        chat(SYSTEM, msg("user", "q"), extra_json='{"logit_bias": {"1": 5}}'),
        chat(SYSTEM, msg("user", "q", name="alice")),
    ],
    ids=[
        "model",
        "system-prompt",
        "no-system-prompt",
        "earlier-turns",
        "seed",
        "max-tokens",
        "tools",
        "response-format",
        "pass-through",
        "user-name",
    ],
)
def test_scope_changes_with_everything_else(other: chat_pb2.ChatRequest) -> None:
    base = chat(SYSTEM, msg("user", "q"))
    assert canonical.semantic_scope(base, "team") != canonical.semantic_scope(other, "team")


def test_scope_is_per_team_and_never_equals_the_cache_key() -> None:
    req = chat(SYSTEM, msg("user", "q"))
    assert canonical.semantic_scope(req, "team-a") != canonical.semantic_scope(req, "team-b")
    assert canonical.semantic_scope(req, "t") != canonical.cache_key(req, "t")


def test_scope_leaves_the_request_untouched() -> None:
    req = chat(SYSTEM, msg("user", "q"))
    before = req.SerializeToString(deterministic=True)
    canonical.semantic_scope(req, "t")
    assert req.SerializeToString(deterministic=True) == before
