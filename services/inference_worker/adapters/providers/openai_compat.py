"""Adapter for OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, Ollama, the
simulator) over one pooled aiohttp session per provider.

Streams are parsed as SSE (``data:`` lines, ``[DONE]``) and relayed delta by delta. The
role-only first chunk is held back and merged into the first real delta, so that
"output has started" means a token reached the client; before that, a failure can be
retried invisibly. Usage is always requested upstream and counted locally with the
gateway's tokenizer when a provider omits it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import msgspec
from sluice import tokens
from sluice.catalog import ProviderConfig
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import inference_pb2

from services.inference_worker.adapters.providers import wire
from services.inference_worker.adapters.providers.http import PooledHttpProvider
from services.inference_worker.domain.upstream import (
    ChoiceAssembler,
    DeltaSink,
    UpstreamAnswer,
    UpstreamFailure,
)

log = logging.getLogger(__name__)

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
_MAX_ERROR_BODY = 64 * 1024


class _StreamState:
    """What a stream produced so far: for the answer, and for partial usage on failure."""

    def __init__(self) -> None:
        self.assembler = ChoiceAssembler()
        self.relayed = False
        self.first_at: float | None = None
        self.usage: chat_pb2.Usage | None = None
        self.response_id = ""
        self.model = ""
        self.created = 0
        self.fingerprint = ""
        self.done = False
        self.pending_role: dict[int, str] = {}


class OpenAICompatProvider(PooledHttpProvider):
    """One OpenAI-compatible deployment (``ProviderConfig.kind == "openai"``)."""

    path = "/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self.config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def chat(
        self,
        request: chat_pb2.ChatRequest,
        upstream_model: str,
        *,
        on_delta: DeltaSink | None = None,
        deadline: float | None = None,
    ) -> UpstreamAnswer:
        stream = on_delta is not None
        body = _ENCODER.encode(wire.request_to_json(request, upstream_model, stream=stream))
        started = time.monotonic()
        state = _StreamState()
        try:
            async with self._client().post(
                self._url, data=body, timeout=self._timeout(deadline, stream)
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.content.read(_MAX_ERROR_BODY)
                    error, permanent = wire.error_from_status(
                        resp.status, resp.headers, raw, self.config.name
                    )
                    raise UpstreamFailure(error, upstream_status=resp.status, permanent=permanent)
                if on_delta is None:
                    data = _DECODER.decode(await resp.read())
                    return self._answer_from_json(request, data, started)
                await self._read_stream(resp, state, on_delta, started)
        except UpstreamFailure as failure:
            failure.relayed = state.relayed
            if state.relayed:
                failure.usage = self._partial_usage(request, state)
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_TIMEOUT,
                f"provider {self.config.name} timed out",
                "timeout",
            ) from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if state.relayed or state.first_at is not None:
                raise self._failure(
                    request,
                    state,
                    ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
                    f"provider {self.config.name} closed the stream",
                    "connection_closed",
                ) from exc
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_UNAVAILABLE,
                f"cannot reach provider {self.config.name}",
                "connect",
            ) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientError, ConnectionError) as exc:
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_STREAM_INTERRUPTED
                if state.relayed
                else ErrorCode.UPSTREAM_ERROR,
                f"provider {self.config.name} broke the connection",
                "connection_closed",
            ) from exc
        except (msgspec.DecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise self._failure(
                request,
                state,
                ErrorCode.UPSTREAM_ERROR,
                f"provider {self.config.name} sent a malformed answer",
                "malformed",
            ) from exc
        return self._answer_from_stream(request, state, started)

    def _failure(
        self,
        request: chat_pb2.ChatRequest,
        state: _StreamState,
        code: ErrorCode,
        detail: str,
        cause: str,
    ) -> UpstreamFailure:
        if state.relayed:
            # After output, any failure leaves a partial answer: report it as interrupted.
            code = ErrorCode.UPSTREAM_STREAM_INTERRUPTED
        error = SluiceError(code, detail, {"provider": self.config.name, "cause": cause})
        usage = self._partial_usage(request, state) if state.relayed else chat_pb2.Usage()
        return UpstreamFailure(error, usage=usage, relayed=state.relayed)

    @staticmethod
    def _partial_usage(request: chat_pb2.ChatRequest, state: _StreamState) -> chat_pb2.Usage:
        if state.usage is not None:
            return state.usage
        return chat_pb2.Usage(
            input_tokens=tokens.count_chat(request),
            output_tokens=state.assembler.output_text_tokens(),
        )

    # --- non-stream -----------------------------------------------------------------

    def _answer_from_json(
        self, request: chat_pb2.ChatRequest, data: Any, started: float
    ) -> UpstreamAnswer:
        if not isinstance(data, dict):
            raise ValueError("answer is not a JSON object")
        if "error" in data and not data.get("choices"):
            error, permanent = wire.error_from_stream_event(data, self.config.name)
            raise UpstreamFailure(error, permanent=permanent)
        choices = wire.choices_from_json(data)
        usage = wire.usage_from_json(data.get("usage"))
        reported = usage is not None
        if usage is None:
            usage = chat_pb2.Usage(
                input_tokens=tokens.count_chat(request), output_tokens=wire.count_choices(choices)
            )
        return UpstreamAnswer(
            response_id=str(data.get("id") or ""),
            model=str(data.get("model") or ""),
            created_unix=int(data.get("created") or time.time()),
            choices=choices,
            usage=usage,
            usage_reported=reported,
            system_fingerprint=str(data.get("system_fingerprint") or ""),
            total_s=time.monotonic() - started,
        )

    # --- stream ---------------------------------------------------------------------

    async def _read_stream(
        self,
        resp: aiohttp.ClientResponse,
        state: _StreamState,
        on_delta: DeltaSink,
        started: float,
    ) -> None:
        data_lines: list[bytes] = []
        async for raw_line in resp.content:
            line = raw_line.rstrip(b"\r\n")
            if line:
                if line.startswith(b"data:"):
                    data_lines.append(line[5:].lstrip(b" "))
                # "event:", "id:", "retry:" and ":" comments carry nothing we relay.
                continue
            if not data_lines:
                continue
            payload = b"\n".join(data_lines)
            data_lines.clear()
            if payload == b"[DONE]":
                state.done = True
                break
            await self._on_chunk(_DECODER.decode(payload), state, on_delta, started)
        if data_lines and data_lines[0] != b"[DONE]":
            # A last event without its blank line: still an event.
            await self._on_chunk(_DECODER.decode(b"\n".join(data_lines)), state, on_delta, started)
        elif data_lines:
            state.done = True
        await self._flush_roles(state, on_delta, started)
        if not state.done and not state.assembler.finished():
            # The body ended cleanly but the answer did not: treat as a cut stream.
            raise aiohttp.ClientPayloadError("stream ended before [DONE]")

    async def _on_chunk(
        self, data: Any, state: _StreamState, on_delta: DeltaSink, started: float
    ) -> None:
        if not isinstance(data, dict):
            raise ValueError("stream chunk is not a JSON object")
        if "error" in data:
            error, permanent = wire.error_from_stream_event(data, self.config.name)
            raise UpstreamFailure(error, permanent=permanent)
        if not state.response_id:
            state.response_id = str(data.get("id") or "")
            state.model = str(data.get("model") or "")
            state.created = int(data.get("created") or 0)
        if data.get("system_fingerprint"):
            state.fingerprint = str(data["system_fingerprint"])
        usage = wire.usage_from_json(data.get("usage"))
        if usage is not None:
            state.usage = usage
        for choice in data.get("choices") or ():
            delta = wire.delta_from_json(choice)
            if (
                delta.role
                and not delta.content
                and not delta.tool_calls
                and not delta.refusal
                and not delta.finish_reason
            ):
                # Role-only opener: merged into the choice's first real delta.
                state.pending_role[delta.choice_index] = delta.role
                continue
            if not (delta.content or delta.tool_calls or delta.refusal or delta.finish_reason):
                continue
            await self._relay(delta, state, on_delta, started)

    async def _relay(
        self, delta: inference_pb2.Delta, state: _StreamState, on_delta: DeltaSink, started: float
    ) -> None:
        role = state.pending_role.pop(delta.choice_index, None)
        if role and not delta.role:
            delta.role = role
        state.assembler.add(delta)
        if state.first_at is None:
            state.first_at = time.monotonic() - started
        await on_delta(delta)
        state.relayed = True

    async def _flush_roles(self, state: _StreamState, on_delta: DeltaSink, started: float) -> None:
        for index, role in list(state.pending_role.items()):
            # A choice that produced nothing but its role (an empty answer).
            await self._relay(
                inference_pb2.Delta(choice_index=index, role=role), state, on_delta, started
            )

    def _answer_from_stream(
        self, request: chat_pb2.ChatRequest, state: _StreamState, started: float
    ) -> UpstreamAnswer:
        choices = state.assembler.choices()
        reported = state.usage is not None
        usage = state.usage or chat_pb2.Usage(
            input_tokens=tokens.count_chat(request),
            output_tokens=state.assembler.output_text_tokens(),
        )
        return UpstreamAnswer(
            response_id=state.response_id,
            model=state.model,
            created_unix=state.created or int(time.time()),
            choices=choices,
            usage=usage,
            usage_reported=reported,
            system_fingerprint=state.fingerprint,
            ttft_s=state.first_at,
            total_s=time.monotonic() - started,
        )


def build_provider(config: ProviderConfig) -> OpenAICompatProvider:
    if config.kind != "openai":
        raise ValueError(f"provider {config.name!r} has unsupported kind {config.kind!r}")
    return OpenAICompatProvider(config)


__all__ = ["OpenAICompatProvider", "build_provider"]
