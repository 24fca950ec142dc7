"""A simulated OpenAI-compatible provider for tests, benchmarks and chaos drills.

``POST /v1/chat/completions`` (streamed or not) and ``GET /v1/models``, with defaults
for time to first token, tokens per second and output length, overridable per request
with a pass-through body member ``"sim": {...}`` (the gateway forwards unknown members):

- ``ttft_ms``, ``tokens_per_second`` (0: unlimited), ``output_tokens``
- ``fault``: ``429`` (with Retry-After), ``500``, ``503``, ``connect_timeout`` (hold
  before the response headers for ``hold_ms``), ``stall`` (pause mid-stream for
  ``stall_ms`` after ``stall_after`` tokens), ``cut`` (drop the connection after
  ``cut_after`` tokens), ``refusal``, ``truncate`` (finish_reason ``length``),
  ``content_filter`` (finish_reason ``content_filter``), ``context_length`` (400
  ``context_length_exceeded``)
- ``replies``: a list of answer texts with ``id``: the Nth attempt carrying that ``id``
  answers the Nth text (the last one after that), for tests that need a given answer
  (JSON that breaks a schema, then JSON that keeps it)
- ``logprob``: the log probability every token gets when the request asks for
  ``logprobs`` (default -0.05; ``top_logprobs`` lists the token itself)
- ``fail_times``: N with ``id``: only the first N attempts carrying that ``id`` fail
  (``fault`` defaults to ``500``); later attempts succeed, for retry tests
- ``tool_call``: answer with a call of the first (or the chosen) tool
- ``omit_usage``, ``cached_tokens``, ``reasoning_tokens``: shape the reported usage

A trailing assistant message with string content is a prefill: the answer continues it
(as llama.cpp's server does). The simulator produces the same words it would have
produced without the prefill, skipping as many as the prefill holds, so a continued
answer equals the uninterrupted one (for a seed or temperature 0); ``max_tokens`` then
bounds the new tokens only.

Usage is counted the way a real provider reports it: prompt tokens with the
gateway's tokenizer over the message contents (plus OpenAI's chat framing), output
tokens as the number of tokens emitted. ``GET /_sim/stats`` returns request counts
(total and by ``sim.id``), and per ``sim.id`` the tokens streamed, the streams the
client closed early (``aborted_by_id``) and the requests that carried a prefill;
``POST /_sim/reset`` clears them (and the chaos below).

Chaos by upstream model, for drills and the chaos benchmark: ``POST /_sim/chaos`` with
``{"models": {"<model>": {"error_rate": 0.05, "stall_rate": 0.05, "stall_ms": 3000,
"seed": 1}}}`` makes that share of the calls naming the model (without a ``sim.fault``
of their own) fail with a 500 or 503, and that share hold their response headers for
``stall_ms`` (a provider gone slow); ``{"models": {}}`` ends it. ``GET /_sim/stats``
counts the injected faults by model (``chaos_by_model``).

Run ``sluice simulator --port 8090`` or, in-process, ``await start_simulator(port)``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import msgspec
from aiohttp import web

from sluice import tokens

DEFAULT_MODELS = ("sim-fast",)
_VOCAB = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dogs",
    "while",
    "careful",
    "engineers",
    "measure",
    "every",
    "stream",
    "token",
    "and",
    "cost",
    "across",
    "gateways",
    "queues",
    "workers",
    "providers",
    "caches",
    "limits",
    "traces",
    "metrics",
    "retries",
    "fallbacks",
    "circuits",
    "answers",
    "questions",
    "code",
    "tests",
    "data",
]
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
# Pre-encoded token texts (JSON string literals): the streaming hot path concatenates
# bytes instead of encoding a chunk object per token.
_TOKEN_TEXT = [" " + word for word in _VOCAB]
_TOKEN_JSON = [_ENCODER.encode(text) for text in _TOKEN_TEXT]
_DONE = b"data: [DONE]\n\n"
_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
FAULTS = frozenset(
    {
        "429",
        "500",
        "503",
        "connect_timeout",
        "stall",
        "cut",
        "refusal",
        "truncate",
        "content_filter",
        "context_length",
    }
)


@dataclass(frozen=True)
class SimConfig:
    """Defaults applied when a request does not override them."""

    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0
    output_tokens: int = 16
    models: tuple[str, ...] = DEFAULT_MODELS
    retry_after_ms: int = 1000
    hold_ms: float = 60_000.0
    stall_ms: float = 5_000.0
    context_window: int = 32768


@dataclass
class SimStats:
    total: int = 0
    by_id: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    tokens_by_id: Counter[str] = field(default_factory=Counter)
    aborted_by_id: Counter[str] = field(default_factory=Counter)
    prefill_by_id: Counter[str] = field(default_factory=Counter)
    chaos_by_model: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chaos_by_model": dict(self.chaos_by_model),
            "total": self.total,
            "by_id": dict(self.by_id),
            "faults": dict(self.faults),
            "tokens_by_id": dict(self.tokens_by_id),
            "aborted_by_id": dict(self.aborted_by_id),
            "prefill_by_id": dict(self.prefill_by_id),
        }


@dataclass(frozen=True)
class Plan:
    """What one request will do, resolved from the defaults and ``sim``."""

    ttft_ms: float
    tokens_per_second: float
    output_tokens: int
    fault: str | None
    retry_after_ms: int
    hold_ms: float
    stall_ms: float
    stall_after: int
    cut_after: int
    tool_call: bool
    omit_usage: bool
    cached_tokens: int
    reasoning_tokens: int
    sim_id: str = ""
    # The answer's text when sim.replies chose one.
    reply: str | None = None
    logprob: float = -0.05


@dataclass(frozen=True)
class Chaos:
    """Faults drawn at random for the calls naming one upstream model."""

    error_rate: float = 0.0
    stall_rate: float = 0.0
    stall_ms: float = 3000.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def draw(self) -> tuple[str, float] | None:
        roll = self.rng.random()
        if roll < self.error_rate:
            return ("500" if self.rng.random() < 0.5 else "503"), 0.0
        if roll < self.error_rate + self.stall_rate:
            return "connect_timeout", self.stall_ms
        return None


class SimError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        err_type: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _ENCODER.encode(
            {"error": {"message": message, "type": err_type, "param": param, "code": code}}
        )
        self.headers = {**_JSON_HEADERS, **(headers or {})}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


def _prefill(body: dict[str, Any]) -> str | None:
    """The text of a trailing assistant message, which the answer continues."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        content = last.get("content")
        if isinstance(content, str) and content:
            return content
    return None


def _logprobs_wanted(body: dict[str, Any]) -> int | None:
    """None without ``logprobs``; else how many ``top_logprobs`` to list."""
    if not body.get("logprobs"):
        return None
    return max(0, _int(body.get("top_logprobs"), 0))


def _token_logprob(text: str, logprob: float, top: int) -> dict[str, Any]:
    raw = list(text.encode())
    item: dict[str, Any] = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
    if top:
        item["top_logprobs"] = [{"token": text, "logprob": logprob, "bytes": raw}]
    return item


@lru_cache(maxsize=4096)
def _count(text: str) -> int:
    # Benchmarks repeat the same prompts; tokenizing them once keeps the simulator cheap.
    return tokens.count_text(text)


def prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of an OpenAI body: contents plus OpenAI's per-message framing."""
    total = tokens.REPLY_PRIMING_TOKENS
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += tokens.TOKENS_PER_MESSAGE + _count(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            total += _count(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    total += _count(str(part.get("text", "")))
                else:
                    total += tokens.TOKENS_PER_IMAGE
        for call in message.get("tool_calls") or ():
            function = (call.get("function") or {}) if isinstance(call, dict) else {}
            total += _count(str(function.get("name", ""))) + _count(
                str(function.get("arguments", ""))
            )
    return total


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class Simulator:
    """The request handlers and their state (stats, ``fail_times`` attempt counts)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self.chaos: dict[str, Chaos] = {}
        self._models_body = _ENCODER.encode(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "simulator"}
                    for m in config.models
                ],
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/_sim/stats", self.get_stats)
        app.router.add_post("/_sim/reset", self.reset)
        app.router.add_post("/_sim/chaos", self.set_chaos)
        app.router.add_get("/health", self.health)
        return app

    # --- small routes ---------------------------------------------------------------

    async def models(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, headers=_JSON_HEADERS)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', headers=_JSON_HEADERS)

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=_ENCODER.encode(self.stats.as_dict()), headers=_JSON_HEADERS)

    async def reset(self, _request: web.Request) -> web.Response:
        self.stats = SimStats()
        self.chaos = {}
        return web.Response(body=b"{}", headers=_JSON_HEADERS)

    async def set_chaos(self, request: web.Request) -> web.Response:
        try:
            body = _DECODER.decode(await request.read())
            models = body["models"]
            chaos = {
                str(name): Chaos(
                    error_rate=float(spec.get("error_rate", 0.0)),
                    stall_rate=float(spec.get("stall_rate", 0.0)),
                    stall_ms=float(spec.get("stall_ms", 3000.0)),
                    rng=random.Random(spec.get("seed")),
                )
                for name, spec in models.items()
            }
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
            return SimError(
                400,
                'expected {"models": {"<model>": {"error_rate": r, "stall_rate": r, '
                '"stall_ms": ms, "seed": n}}}',
                "invalid_request_error",
            ).response()
        self.chaos = chaos
        return web.Response(body=b"{}", headers=_JSON_HEADERS)

    # --- chat -----------------------------------------------------------------------

    def plan(self, body: dict[str, Any]) -> Plan:
        sim = body.get("sim")
        sim = sim if isinstance(sim, dict) else {}
        cfg = self.config
        output = max(0, _int(sim.get("output_tokens"), cfg.output_tokens))
        fault = sim.get("fault")
        fault = str(fault) if fault is not None else None
        sim_id = str(sim.get("id", "")) if sim.get("id") is not None else ""
        self.stats.total += 1
        if sim_id:
            self.stats.by_id[sim_id] += 1
        if fault is not None and fault not in FAULTS:
            raise SimError(
                400, f"unknown sim.fault {fault!r}", "invalid_request_error", param="sim.fault"
            )
        fail_times = sim.get("fail_times")
        if fail_times is not None:
            if not sim_id:
                raise SimError(
                    400, "sim.fail_times needs sim.id", "invalid_request_error", param="sim.id"
                )
            fault = (fault or "500") if self.stats.by_id[sim_id] <= _int(fail_times, 0) else None
        hold_ms = _float(sim.get("hold_ms"), cfg.hold_ms)
        chaos = self.chaos.get(str(body.get("model", "")))
        if fault is None and chaos is not None:
            drawn = chaos.draw()
            if drawn is not None:
                fault, stall = drawn
                hold_ms = stall or hold_ms
                self.stats.chaos_by_model[str(body.get("model", ""))] += 1
        if fault is not None:
            self.stats.faults[fault] += 1
        replies = sim.get("replies")
        reply = None
        if replies is not None:
            if not sim_id or not isinstance(replies, list) or not replies:
                raise SimError(
                    400,
                    "sim.replies needs sim.id and a non-empty list of texts",
                    "invalid_request_error",
                    param="sim.replies",
                )
            reply = str(replies[min(self.stats.by_id[sim_id], len(replies)) - 1])
        return Plan(
            ttft_ms=max(0.0, _float(sim.get("ttft_ms"), cfg.ttft_ms)),
            tokens_per_second=max(0.0, _float(sim.get("tokens_per_second"), cfg.tokens_per_second)),
            output_tokens=output,
            fault=fault,
            retry_after_ms=_int(sim.get("retry_after_ms"), cfg.retry_after_ms),
            hold_ms=hold_ms,
            stall_ms=_float(sim.get("stall_ms"), cfg.stall_ms),
            stall_after=_int(sim.get("stall_after"), max(1, output // 2)),
            cut_after=_int(sim.get("cut_after"), max(1, output // 2)),
            tool_call=bool(sim.get("tool_call", False)),
            omit_usage=bool(sim.get("omit_usage", False)),
            cached_tokens=max(0, _int(sim.get("cached_tokens"), 0)),
            reasoning_tokens=max(0, _int(sim.get("reasoning_tokens"), 0)),
            sim_id=sim_id,
            reply=reply,
            logprob=min(0.0, _float(sim.get("logprob"), -0.05)),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = _DECODER.decode(await request.read())
        except msgspec.DecodeError:
            return SimError(
                400, "request body is not valid JSON", "invalid_request_error"
            ).response()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return SimError(
                400, "'messages' is required", "invalid_request_error", param="messages"
            ).response()
        try:
            plan = self.plan(body)
            return await self._answer(request, body, plan)
        except SimError as exc:
            return exc.response()

    async def _answer(
        self, request: web.Request, body: dict[str, Any], plan: Plan
    ) -> web.StreamResponse:
        fault = plan.fault
        if fault == "connect_timeout":
            # Nothing is sent until the client gives up; the handler is cancelled when it
            # disconnects (handler_cancellation).
            await asyncio.sleep(plan.hold_ms / 1000)
        elif fault == "429":
            seconds = max(1, -(-plan.retry_after_ms // 1000))
            raise SimError(
                429,
                "Rate limit reached for requests (simulated).",
                "requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(seconds), "retry-after-ms": str(plan.retry_after_ms)},
            )
        elif fault == "500":
            raise SimError(
                500, "The server had an error while processing your request.", "server_error"
            )
        elif fault == "503":
            raise SimError(
                503,
                "The engine is currently overloaded, please try again later.",
                "server_error",
                headers={"Retry-After": "1"},
            )
        elif fault == "context_length":
            used = prompt_tokens(body)
            window = self.config.context_window
            raise SimError(
                400,
                f"This model's maximum context length is {window} tokens. However, your "
                f"messages resulted in {max(used, window + 1)} tokens. Please reduce the "
                "length of the messages.",
                "invalid_request_error",
                code="context_length_exceeded",
                param="messages",
            )

        model = str(body.get("model") or self.config.models[0])
        n = max(1, _int(body.get("n"), 1))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        prefill = _prefill(body)
        skip = len(prefill.split()) if prefill is not None else 0
        if prefill is not None:
            self.stats.prefill_by_id[plan.sim_id] += 1
        count = max(0, plan.output_tokens - skip)
        finish = "stop"
        if max_tokens is not None and 0 <= _int(max_tokens, count) < count:
            count = _int(max_tokens, count)
            finish = "length"
        if fault == "truncate":
            finish = "length"
        elif fault == "content_filter":
            finish = "content_filter"
        tool = self._tool_to_call(body) if plan.tool_call or self._tool_forced(body) else None
        unprefilled = body if prefill is None else {**body, "messages": body["messages"][:-1]}
        words = self._words(unprefilled, skip + count)[skip:]
        if plan.reply is not None:
            texts = re.findall(r"\s*\S+", plan.reply) or [plan.reply]
        else:
            texts = [_TOKEN_TEXT[w] for w in words]
        prompt = prompt_tokens(body)
        logprobs = _logprobs_wanted(body)
        if body.get("stream"):
            return await self._stream(
                request,
                body,
                plan,
                model=model,
                n=n,
                words=words,
                texts=texts,
                logprobs=logprobs,
                finish=finish,
                tool=tool,
                prompt=prompt,
            )
        return await self._complete(
            plan,
            model=model,
            n=n,
            texts=texts,
            logprobs=logprobs,
            finish=finish,
            tool=tool,
            prompt=prompt,
        )

    @staticmethod
    def _tool_forced(body: dict[str, Any]) -> bool:
        choice = body.get("tool_choice")
        return bool(body.get("tools")) and (choice == "required" or isinstance(choice, dict))

    @staticmethod
    def _tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
        tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
        if not tools:
            return None
        chosen = tools[0]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            chosen = next(
                (t for t in tools if (t.get("function") or {}).get("name") == name), chosen
            )
        function = chosen.get("function") or {}
        params = function.get("parameters") or {}
        args: dict[str, Any] = {}
        for prop, schema in (params.get("properties") or {}).items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            args[prop] = {
                "integer": 1,
                "number": 1.5,
                "boolean": True,
                "array": [],
                "object": {},
            }.get(str(kind), "sim")
        return {
            "name": str(function.get("name", "tool")),
            "arguments": _ENCODER.encode(args).decode(),
        }

    @staticmethod
    def _words(body: dict[str, Any], count: int) -> list[int]:
        """Indices into the vocabulary; deterministic for a seed or temperature 0."""
        seed = body.get("seed")
        if seed is None and body.get("temperature") == 0:
            digest = hashlib.sha256(_ENCODER.encode(body.get("messages"))).digest()
            seed = int.from_bytes(digest[:8], "big")
        rng = random.Random(seed) if seed is not None else random
        return [rng.randrange(len(_VOCAB)) for _ in range(count)]

    @staticmethod
    def _usage(plan: Plan, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(plan.cached_tokens, prompt)},
            "completion_tokens_details": {
                "reasoning_tokens": min(plan.reasoning_tokens, completion)
            },
        }

    async def _pace(self, plan: Plan, start: float, emitted: int) -> None:
        """Sleep until token ``emitted`` is due (schedule-based: no drift)."""
        if plan.tokens_per_second > 0:
            due = start + emitted / plan.tokens_per_second
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _complete(
        self,
        plan: Plan,
        *,
        model: str,
        n: int,
        texts: list[str],
        logprobs: int | None,
        finish: str,
        tool: dict[str, Any] | None,
        prompt: int,
    ) -> web.Response:
        if plan.ttft_ms:
            await asyncio.sleep(plan.ttft_ms / 1000)
        if plan.tokens_per_second > 0 and texts:
            await asyncio.sleep(len(texts) * n / plan.tokens_per_second)
        completion = 0
        choices = []
        for index in range(n):
            message: dict[str, Any] = {"role": "assistant", "content": None}
            reason = finish
            if plan.fault == "refusal":
                message["refusal"] = _REFUSAL_TEXT
                completion += _count(_REFUSAL_TEXT)
            elif tool is not None:
                message["tool_calls"] = [
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": tool["name"], "arguments": tool["arguments"]},
                    }
                ]
                completion += _count(tool["name"]) + _count(tool["arguments"])
                reason = "tool_calls" if finish == "stop" else finish
            else:
                message["content"] = "".join(texts)
                completion += len(texts)
            choice: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": reason,
                "logprobs": None,
            }
            if logprobs is not None and message.get("content"):
                choice["logprobs"] = {
                    "content": [_token_logprob(t, plan.logprob, logprobs) for t in texts],
                    "refusal": None,
                }
            choices.append(choice)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_sluice_sim",
            "choices": choices,
        }
        if not plan.omit_usage:
            out["usage"] = self._usage(plan, prompt, completion)
        return web.Response(body=_ENCODER.encode(out), headers=_JSON_HEADERS)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        plan: Plan,
        *,
        model: str,
        n: int,
        words: list[int],
        texts: list[str],
        logprobs: int | None,
        finish: str,
        tool: dict[str, Any] | None,
        prompt: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        head = (
            b'data: {"id":"chatcmpl-'
            + uuid.uuid4().hex.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + _ENCODER.encode(model)
            + b',"system_fingerprint":"fp_sluice_sim","choices":'
        )
        pieces: list[bytes] = []
        for index in range(n):
            pieces.append(
                head + b'[{"index":%d,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n' % index
            )
        # (choice index, chunk bytes, counts as an output token)
        steps: list[tuple[bytes, int]] = []
        completion = 0
        reason = finish
        if plan.fault == "refusal":
            refusal_words = _REFUSAL_TEXT.split(" ")
            for index in range(n):
                for i, word in enumerate(refusal_words):
                    text = word if i == 0 else " " + word
                    steps.append(
                        (
                            head + b'[{"index":%d,"delta":{"refusal":%s},"logprobs":null,'
                            b'"finish_reason":null}]}\n\n' % (index, _ENCODER.encode(text)),
                            1,
                        )
                    )
        elif tool is not None:
            reason = "tool_calls" if finish == "stop" else finish
            args = tool["arguments"]
            thirds = [
                args[: len(args) // 3],
                args[len(args) // 3 : 2 * len(args) // 3],
                args[2 * len(args) // 3 :],
            ]
            for index in range(n):
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                first = {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool["name"], "arguments": ""},
                }
                steps.append(
                    (
                        head + b'[{"index":%d,"delta":{"tool_calls":[%s]},"logprobs":null,'
                        b'"finish_reason":null}]}\n\n' % (index, _ENCODER.encode(first)),
                        1,
                    )
                )
                for part in thirds:
                    delta = {"index": 0, "function": {"arguments": part}}
                    steps.append(
                        (
                            head + b'[{"index":%d,"delta":{"tool_calls":[%s]},'
                            b'"logprobs":null,"finish_reason":null}]}\n\n'
                            % (index, _ENCODER.encode(delta)),
                            1,
                        )
                    )
        elif plan.reply is None and logprobs is None:
            for w in words:
                for index in range(n):
                    steps.append(
                        (
                            head + b'[{"index":%d,"delta":{"content":%s},"logprobs":null,'
                            b'"finish_reason":null}]}\n\n' % (index, _TOKEN_JSON[w]),
                            1,
                        )
                    )
        else:
            for text in texts:
                lp = b"null"
                if logprobs is not None:
                    lp = _ENCODER.encode(
                        {"content": [_token_logprob(text, plan.logprob, logprobs)]}
                    )
                for index in range(n):
                    steps.append(
                        (
                            head + b'[{"index":%d,"delta":{"content":%s},"logprobs":%s,'
                            b'"finish_reason":null}]}\n\n' % (index, _ENCODER.encode(text), lp),
                            1,
                        )
                    )
        tail: list[bytes] = [
            head
            + b'[{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s"}]}\n\n'
            % (index, reason.encode())
            for index in range(n)
        ]
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")

        if plan.ttft_ms:
            await asyncio.sleep(plan.ttft_ms / 1000)
        paced = plan.tokens_per_second > 0 or plan.fault in {"stall", "cut"}
        if not paced:
            # Unlimited speed: one write for the whole stream.
            completion = sum(c for _, c in steps)
            self.stats.tokens_by_id[plan.sim_id] += completion
            usage = self._usage_chunk(head, plan, include_usage, prompt, completion)
            await resp.write(b"".join([*pieces, *(s for s, _ in steps), *tail, usage, _DONE]))
            await resp.write_eof()
            return resp
        await resp.write(b"".join(pieces))
        start = time.monotonic()
        try:
            for i, (chunk, counted) in enumerate(steps):
                if plan.fault == "stall" and i == plan.stall_after:
                    await asyncio.sleep(plan.stall_ms / 1000)
                    start += plan.stall_ms / 1000
                if plan.fault == "cut" and i == plan.cut_after:
                    # Drop the connection mid-body: the client sees an incomplete body.
                    if request.transport is not None:
                        request.transport.abort()
                    raise asyncio.CancelledError
                await self._pace(plan, start, i)
                await resp.write(chunk)
                completion += counted
                self.stats.tokens_by_id[plan.sim_id] += counted
        except (asyncio.CancelledError, ConnectionResetError):
            if plan.fault != "cut":
                # The client went away mid-answer (handler cancelled, or a failed write).
                self.stats.aborted_by_id[plan.sim_id] += 1
            raise
        usage = self._usage_chunk(head, plan, include_usage, prompt, completion)
        await resp.write(b"".join([*tail, usage, _DONE]))
        await resp.write_eof()
        return resp

    def _usage_chunk(
        self, head: bytes, plan: Plan, include_usage: Any, prompt: int, completion: int
    ) -> bytes:
        if not include_usage or plan.omit_usage:
            return b""
        return (
            head
            + b'[],"usage":'
            + _ENCODER.encode(self._usage(plan, prompt, completion))
            + b"}\n\n"
        )


# --- running ------------------------------------------------------------------------


async def start_simulator(
    port: int, host: str = "127.0.0.1", config: SimConfig | None = None
) -> web.AppRunner:
    """Serve the simulator in the running loop; stop it with ``await runner.cleanup()``.

    The ``Simulator`` is at ``runner.app["simulator"]`` for stats in tests.
    """
    sim = Simulator(config or SimConfig())
    app = sim.app()
    app[SIMULATOR_KEY] = sim
    # handler_cancellation: a held or paced handler stops when its client goes away.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return runner


SIMULATOR_KEY = web.AppKey("simulator", Simulator)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SLUICE_SIM_{name}", default)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sluice simulator",
        description="Simulated OpenAI-compatible provider (fault injection, benchmarks). "
        "Defaults also come from SLUICE_SIM_<FLAG> environment variables.",
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("PORT", "8090")))
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=float(_env("TTFT_MS", "0")),
        help="delay before the first token (ms)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=float(_env("TOKENS_PER_SECOND", "0")),
        help="output pace; 0 means unlimited",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=int(_env("OUTPUT_TOKENS", "16")),
        help="tokens per answer unless max_tokens is lower",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help="model id listed by /v1/models (repeatable; any id is answered)",
    )
    parser.add_argument("--retry-after-ms", type=int, default=int(_env("RETRY_AFTER_MS", "1000")))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    models = (
        tuple(args.models)
        if args.models
        else tuple(m for m in _env("MODELS", ",".join(DEFAULT_MODELS)).split(",") if m)
    )
    return replace(
        SimConfig(),
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        output_tokens=args.output_tokens,
        models=models,
        retry_after_ms=args.retry_after_ms,
    )


async def _serve(args: argparse.Namespace) -> None:
    runner = await start_simulator(args.port, args.host, config_from_args(args))
    print(f"simulator listening on http://{args.host}:{args.port}/v1", flush=True)  # noqa: T201
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> int:
    """``sluice simulator [--port N] [--ttft-ms MS] [--tokens-per-second R] ...``"""
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.run(_serve(args))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0
