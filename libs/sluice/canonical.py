"""Canonical forms: the exact-cache key of a chat request.

Two requests that would make the provider produce the same distribution of answers get
the same key: the model, messages, sampling, tools, response format and pass-through
fields count; delivery options (stream, include_usage), ``user`` and ``metadata`` do not.
"""

from __future__ import annotations

import hashlib

from sluice.common.v1 import chat_pb2

CACHE_KEY_VERSION = "c1"


def cache_key(request: chat_pb2.ChatRequest, scope: str) -> str:
    """Hex key, namespaced by ``scope`` (the team) so teams never see each other's answers."""
    canonical = chat_pb2.ChatRequest()
    canonical.CopyFrom(request)
    canonical.stream = False
    canonical.include_usage = False
    canonical.user = ""
    canonical.metadata.clear()
    digest = hashlib.sha256()
    digest.update(f"{CACHE_KEY_VERSION}|{scope}|".encode())
    digest.update(canonical.SerializeToString(deterministic=True))
    return digest.hexdigest()
