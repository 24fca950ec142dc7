"""Canonical forms: the exact-cache key of a chat request, and the semantic-cache scope.

Two requests that would make the provider produce the same distribution of answers get
the same key: the model, messages, sampling, tools, response format and pass-through
fields count; delivery options (stream, include_usage), ``user`` and ``metadata`` do not.

The semantic cache compares only the last user message's text (by embedding); every
other part of the request must be identical, and ``semantic_scope`` hashes exactly those
parts, so a paraphrase can only ever be answered by an entry of the same scope.
"""

from __future__ import annotations

import hashlib

from sluice.common.v1 import chat_pb2

CACHE_KEY_VERSION = "c1"
SEMANTIC_SCOPE_VERSION = "s1"


def _canonical(request: chat_pb2.ChatRequest) -> chat_pb2.ChatRequest:
    canonical = chat_pb2.ChatRequest()
    canonical.CopyFrom(request)
    canonical.stream = False
    canonical.include_usage = False
    canonical.user = ""
    canonical.metadata.clear()
    return canonical


def _digest(version: str, scope: str, canonical: chat_pb2.ChatRequest) -> str:
    digest = hashlib.sha256()
    digest.update(f"{version}|{scope}|".encode())
    digest.update(canonical.SerializeToString(deterministic=True))
    return digest.hexdigest()


def cache_key(request: chat_pb2.ChatRequest, scope: str) -> str:
    """Hex key, namespaced by ``scope`` (the team) so teams never see each other's answers."""
    return _digest(CACHE_KEY_VERSION, scope, _canonical(request))


def semantic_text(request: chat_pb2.ChatRequest) -> str | None:
    """The text the semantic cache compares: the last message, when it is a user message
    made of text only. None otherwise (images, or a conversation that does not end on the
    user's turn, such as a tool result), and such requests use the exact cache alone."""
    if not request.messages:
        return None
    last = request.messages[-1]
    if last.role != "user" or last.tool_calls:
        return None
    if last.HasField("text"):
        text = last.text
    elif last.parts and all(p.type == "text" and not p.raw_json for p in last.parts):
        text = "\n".join(p.text for p in last.parts)
    else:
        return None
    text = text.strip()
    return text or None


def semantic_scope(request: chat_pb2.ChatRequest, scope: str) -> str:
    """Hex hash of everything but the last user message's text: team ``scope``, model,
    system prompt and earlier turns, sampling, tools, response format, pass-through
    fields. The last message stays as a text-less user turn (its ``name`` counts)."""
    canonical = _canonical(request)
    if canonical.messages:
        last = canonical.messages[-1]
        last.ClearField("text")
        del last.parts[:]
    return _digest(SEMANTIC_SCOPE_VERSION, scope, canonical)
