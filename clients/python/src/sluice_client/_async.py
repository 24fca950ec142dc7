"""The asynchronous client, ``AsyncSluice`` (the same API as ``Sluice``, awaited)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from sluice_client import _base, errors
from sluice_client._messages import MessageGroups, UnnumberedResume
from sluice_client._sse import ExactlyOnce, SseEvent, SseParser, is_plain_delta, split_id
from sluice_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Estimate,
    Job,
    JobEvent,
    JobList,
    Message,
    MessageStreamEvent,
    Model,
    ResponseInfo,
    UsageReport,
)

__all__ = ["AsyncChatStream", "AsyncMessageStream", "AsyncSluice"]


class _Ended(Exception):
    """A stream's body ended without its terminal event."""


class AsyncSluice:
    """An asyncio client for the Sluice gateway (see ``Sluice``).

    ``api_key`` defaults to ``SLUICE_API_KEY``, ``base_url`` to ``SLUICE_BASE_URL``
    (else ``http://127.0.0.1:8080``). Calls that cost money carry an
    ``Idempotency-Key`` made per call and reused by its retries; broken connections,
    429, 503 and 409 (the first attempt still running) are retried up to
    ``max_retries`` times with backoff, honouring ``Retry-After``. Streams resume by
    themselves after a dropped connection (``Last-Event-ID``). While the first attempt
    of a call still runs (409 ``idempotency_key_in_use``) the client waits for its
    answer up to ``timeout`` seconds."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        retry: _base.RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = _base.resolve_base_url(base_url)
        self.retry = retry or _base.RetryPolicy(max_retries=max_retries)
        self.timeout = timeout
        self._headers = _base.default_headers(_base.resolve_api_key(api_key), headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0))
        )
        self.chat = _Chat(self)
        self.messages = _Messages(self)
        self.jobs = _Jobs(self)
        self.webhooks = _Webhooks(self)

    # --- lifecycle ------------------------------------------------------------------

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncSluice:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- plumbing -------------------------------------------------------------------

    def _build(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        merged = dict(self._headers)
        merged.update(headers or {})
        return self._http.build_request(
            method, self.base_url + path, json=json, params=params, headers=merged
        )

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        safe: bool = True,
        retries: int | None = None,
    ) -> httpx.Response:
        """One logical call: sent again on the retryable failures, else the answer (a
        2xx; for ``stream`` its body still unread) or its typed error."""
        limit = self.retry.max_retries if retries is None else retries
        attempt = 0
        waiting_since: float | None = None
        while True:
            request = self._build(method, path, json=json, params=params, headers=headers)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt > limit or not _base.connection_retryable(exc, safe=safe):
                    raise _base.connection_error(exc, attempt) from exc
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            if response.is_success:
                return response
            content = await response.aread()
            await response.aclose()
            err = errors.from_response(response, content)
            if isinstance(err, errors.IdempotencyKeyInUse) and limit > 0:
                # The first attempt is still running: wait for its answer as long as the
                # call itself may take, rather than count these against the retries.
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since < self.timeout:
                    await asyncio.sleep(self.retry.delay(1, err.retry_after))
                    continue
            attempt += 1
            if attempt > limit or not _base.is_retryable(err, response):
                raise err
            await asyncio.sleep(self.retry.delay(attempt, err.retry_after))

    async def _json(self, method: str, path: str, **kw: Any) -> tuple[Any, ResponseInfo]:
        idempotency_key = (kw.get("headers") or {}).get(_base.IDEMPOTENCY_HEADER)
        response = await self._send(method, path, **kw)
        return _base.parse_json(response), _base.response_info(response, idempotency_key)

    # --- models, estimate and usage ------------------------------------------------

    async def models(self) -> list[Model]:
        """The models this gateway serves (``GET /v1/models``)."""
        data, _info = await self._json("GET", "/v1/models")
        return [Model.model_validate(item) for item in data.get("data", [])]

    async def estimate(
        self, *, model: str, messages: Iterable[Mapping[str, Any]], **params: Any
    ) -> Estimate:
        """What a chat completion would cost (``POST /v1/estimate``); nothing is called,
        reserved or recorded."""
        data, info = await self._json(
            "POST", "/v1/estimate", json=_base.chat_body(model, messages, params)
        )
        out = Estimate.model_validate(data)
        out._info = info
        return out

    async def usage(
        self,
        *,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        group_by: Iterable[str] | str | None = None,
        key_id: str | None = None,
        team_id: str | None = None,
        model: str | None = None,
        provider: str | None = None,
        end_user: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
    ) -> UsageReport:
        """Cost, tokens, requests and cache savings, grouped (``GET /v1/usage``)."""
        params = _base.usage_params(
            since=since,
            until=until,
            group_by=group_by,
            key_id=key_id,
            team_id=team_id,
            model=model,
            provider=provider,
            end_user=end_user,
            tag=tag,
            limit=limit,
        )
        data, info = await self._json("GET", "/v1/usage", params=params)
        out = UsageReport.model_validate(data)
        out._info = info
        return out


class _Resumable:
    """The reconnect loop of a stream: read events, and after a broken connection wait,
    reconnect and drop what was already delivered, until the stream's end."""

    def __init__(
        self,
        client: AsyncSluice,
        *,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        idempotency_key: str | None,
    ) -> None:
        self._client = client
        self._path = path
        self._body = body
        self._headers = headers
        self.idempotency_key = idempotency_key
        self.stream_id: str | None = None
        self.resumes = 0
        self.info = ResponseInfo()
        self._response: httpx.Response | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()
            self._response = None

    async def _post(self) -> httpx.Response:
        headers = dict(self._headers)
        headers["Accept"] = "text/event-stream"
        return await self._client._send(
            "POST",
            self._path,
            json=self._body,
            headers=headers,
            stream=True,
            safe=self.idempotency_key is not None,
        )

    async def _resume(self, after: int) -> httpx.Response:
        """The stream again after sequence ``after``: ``GET /v1/streams/{id}``, or the
        same POST with the same ``Idempotency-Key`` (which attaches to the first run)."""
        if self.stream_id is not None:
            headers = {"Accept": "text/event-stream"}
            if after > 0:
                headers["Last-Event-ID"] = f"{self.stream_id}:{after}"
            try:
                return await self._client._send(
                    "GET", f"/v1/streams/{self.stream_id}", headers=headers, stream=True, retries=0
                )
            except errors.NotFound:
                if self.idempotency_key is None:
                    raise
        if self.idempotency_key is None:
            raise _base.interrupted(
                "The connection broke before the stream could be named; it cannot resume.",
                self.stream_id,
            )
        return await self._client._send(
            "POST",
            self._path,
            json=self._body,
            headers={**self._headers, "Accept": "text/event-stream"},
            stream=True,
            retries=0,
        )

    async def events(self) -> AsyncIterator[SseEvent]:
        """Every event of the stream once, in order, across reconnects."""
        state = ExactlyOnce()
        failures = 0
        response = await self._post()
        try:
            while True:
                self._response = response
                self.info = _base.response_info(response, self.idempotency_key)
                if self.stream_id is None and self.idempotency_key is None:
                    self.stream_id = self.info.request_id
                state.new_connection()
                parser = SseParser()
                try:
                    async for chunk in response.aiter_bytes():
                        for event in parser.feed(chunk):
                            if event.data == "[DONE]":
                                return
                            ids = split_id(event.id)
                            if ids is not None:
                                self.stream_id = ids[0]
                                if not state.accept(ids[1]):
                                    continue
                                state.mark(
                                    single=event.event is None and is_plain_delta(event.data)
                                )
                            failures = 0
                            _base.raise_for_event(event)
                            yield event
                            if event.event == "message_stop":
                                return
                    raise _Ended
                except (httpx.TransportError, _Ended) as exc:
                    if self._closed:
                        return
                    await response.aclose()
                    failures, response = await self._reconnect(failures, state.resume_after, exc)
        finally:
            if self._response is not None:
                await self._response.aclose()

    async def _reconnect(
        self, failures: int, after: int, cause: Exception
    ) -> tuple[int, httpx.Response]:
        retry = self._client.retry
        while True:
            failures += 1
            if failures > retry.max_retries:
                raise _base.interrupted(
                    f"The stream broke and could not be resumed after {retry.max_retries} "
                    f"attempt(s): {cause!r}",
                    self.stream_id,
                ) from cause
            wait: float | None = None
            try:
                await asyncio.sleep(retry.delay(failures))
                response = await self._resume(after)
                self.resumes += 1
                return failures, response
            except httpx.TransportError as exc:
                cause = exc
            except errors.SluiceError as exc:
                if isinstance(exc, errors.APIConnectionError) or _base.is_retryable(exc, None):
                    cause, wait = exc, exc.retry_after
                else:
                    raise
            if wait:
                await asyncio.sleep(wait)


class AsyncChatStream(AsyncIterator[ChatCompletionChunk]):
    """A streamed chat completion: ``async for`` over ``ChatCompletionChunk``s. Each token is
    yielded exactly once, in order, whatever connections break on the way (up to the
    client's retry budget; then ``StreamInterrupted``)."""

    def __init__(self, resumable: _Resumable) -> None:
        self._resumable = resumable
        self._events = resumable.events()
        self.text = ""
        self.final: ChatCompletionChunk | None = None

    @property
    def stream_id(self) -> str | None:
        """The request id that names the stream (``GET /v1/streams/{id}``)."""
        return self._resumable.stream_id

    @property
    def resumes(self) -> int:
        """How many times the stream was resumed after a broken connection."""
        return self._resumable.resumes

    @property
    def response_info(self) -> ResponseInfo:
        return self._resumable.info

    @property
    def idempotency_key(self) -> str | None:
        return self._resumable.idempotency_key

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        event = await anext(self._events)
        chunk = _base.chunk_of(event)
        self.text += chunk.text
        if chunk.sluice is not None:
            self.final = chunk
        return chunk

    async def close(self) -> None:
        await self._resumable.close()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncMessageStream(AsyncIterator[MessageStreamEvent]):
    """A streamed Anthropic-style message: iterate for its events (``message_start`` ...
    ``message_stop``). Each event is yielded exactly once, in order, whatever connections
    break on the way (up to the client's retry budget; then ``StreamInterrupted``)."""

    def __init__(self, resumable: _Resumable) -> None:
        self._resumable = resumable
        self._events = resumable.events()
        self.text = ""

    @property
    def stream_id(self) -> str | None:
        """The request id that names the stream."""
        return self._resumable.stream_id

    @property
    def resumes(self) -> int:
        """How many times the stream was resumed after a broken connection."""
        return self._resumable.resumes

    @property
    def response_info(self) -> ResponseInfo:
        """The answer of the last connection (the first request's, or a resume's)."""
        return self._resumable.info

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` the request and its resumes carry."""
        return self._resumable.idempotency_key

    def __aiter__(self) -> AsyncMessageStream:
        return self

    async def __anext__(self) -> MessageStreamEvent:
        event = _base.message_event_of(await anext(self._events))
        self.text += event.text
        return event

    async def close(self) -> None:
        await self._resumable.close()

    async def __aenter__(self) -> AsyncMessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Completions:
    def __init__(self, client: AsyncSluice) -> None:
        self._client = client

    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        idempotency_key: str | None = None,
        tags: Iterable[str] | None = None,
        priority: str | None = None,
        cache_control: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """``POST /v1/chat/completions``. ``params`` are the body's other members
        (``max_tokens``, ``temperature``, ``tools``, ...; unknown ones pass through to
        the provider)."""
        body = _base.chat_body(model, messages, params)
        body.pop("stream", None)
        key = idempotency_key or _base.new_idempotency_key()
        data, info = await self._client._json(
            "POST",
            _base.CHAT_PATH,
            json=body,
            headers=_base.extra_headers(
                idempotency_key=key,
                tags=tags,
                priority=priority,
                cache_control=cache_control,
                headers=headers,
            ),
        )
        out = ChatCompletion.model_validate(data)
        out._info = info
        return out

    async def stream(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        idempotency_key: str | None = None,
        tags: Iterable[str] | None = None,
        priority: str | None = None,
        cache_control: str | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncChatStream:
        """A streamed chat completion that resumes by itself after a dropped
        connection. The request is sent at once; errors before the first event raise
        here."""
        body = _base.chat_body(model, messages, params)
        body["stream"] = True
        key = idempotency_key or _base.new_idempotency_key()
        resumable = _Resumable(
            self._client,
            path=_base.CHAT_PATH,
            body=body,
            headers=_base.extra_headers(
                idempotency_key=key,
                tags=tags,
                priority=priority,
                cache_control=cache_control,
                headers=headers,
            ),
            idempotency_key=key,
        )
        stream = AsyncChatStream(resumable)
        stream._events = await _prime(stream._events)
        return stream


async def _prime(events: AsyncIterator[SseEvent]) -> AsyncIterator[SseEvent]:
    """Sends the request now (a generator starts lazily), so that an error before the
    first event raises at the call."""
    try:
        head: SseEvent | None = await anext(events)
    except StopAsyncIteration:
        head = None

    async def chained() -> AsyncIterator[SseEvent]:
        if head is None:
            return
        yield head
        async for event in events:
            yield event

    return chained()


class _Chat:
    def __init__(self, client: AsyncSluice) -> None:
        self.completions = _Completions(client)


class _Messages:
    """Anthropic Messages API (``POST /v1/messages``) on the same data path."""

    def __init__(self, client: AsyncSluice) -> None:
        self._client = client

    def _headers(
        self,
        idempotency_key: str,
        headers: Mapping[str, str] | None,
        tags: Iterable[str] | None,
    ) -> dict[str, str]:
        out = _base.extra_headers(idempotency_key=idempotency_key, tags=tags, headers=headers)
        out.setdefault("anthropic-version", _base.ANTHROPIC_VERSION)
        return out

    async def create(
        self,
        *,
        model: str,
        max_tokens: int,
        messages: Iterable[Mapping[str, Any]],
        idempotency_key: str | None = None,
        tags: Iterable[str] | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> Message:
        """``POST /v1/messages``. Like a chat completion it carries an
        ``Idempotency-Key`` (made per call unless given) reused by its retries, so a
        broken connection, 429, 503 or 409 is retried without running it twice."""
        body = _base.chat_body(model, messages, {"max_tokens": max_tokens, **params})
        body.pop("stream", None)
        key = idempotency_key or _base.new_idempotency_key()
        data, info = await self._client._json(
            "POST", _base.MESSAGES_PATH, json=body, headers=self._headers(key, headers, tags)
        )
        out = Message.model_validate(data)
        out._info = info
        return out

    async def stream(
        self,
        *,
        model: str,
        max_tokens: int,
        messages: Iterable[Mapping[str, Any]],
        idempotency_key: str | None = None,
        tags: Iterable[str] | None = None,
        headers: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncMessageStream:
        """A streamed message that resumes by itself after a dropped connection, each
        event exactly once (``GET /v1/streams/{id}`` with ``Last-Event-ID``, or the same
        POST with the same ``Idempotency-Key``). The request is sent at once; errors
        before the first event raise here."""
        body = _base.chat_body(model, messages, {"max_tokens": max_tokens, **params})
        body["stream"] = True
        key = idempotency_key or _base.new_idempotency_key()
        resumable = _MessagesResumable(
            self._client,
            path=_base.MESSAGES_PATH,
            body=body,
            headers=self._headers(key, headers, tags),
            idempotency_key=key,
        )
        stream = AsyncMessageStream(resumable)
        stream._events = await _prime(stream._events)
        return stream


class _MessagesResumable(_Resumable):
    """A Messages stream, passed on by whole groups of events (``_messages``): after a
    broken connection it resumes after the last group passed on, and a group that comes
    again is dropped whole."""

    async def events(self) -> AsyncIterator[SseEvent]:
        groups = MessageGroups()
        failures = 0
        response = await self._post()
        try:
            while True:
                self._response = response
                self.info = _base.response_info(response, self.idempotency_key)
                groups.new_connection()
                parser = SseParser()
                try:
                    async for chunk in response.aiter_bytes():
                        for event in parser.feed(chunk):
                            ready = groups.feed(event)
                            self.stream_id = groups.stream_id or self.stream_id
                            for item in ready:
                                _base.raise_for_event(item)
                                failures = 0
                                yield item
                            if groups.ended:
                                return
                    raise _Ended
                except (httpx.TransportError, _Ended) as exc:
                    if self._closed:
                        return
                    await response.aclose()
                    failures, response = await self._reconnect(failures, groups.last, exc)
                except UnnumberedResume as exc:
                    raise _base.interrupted(
                        f"The message could not be resumed: {exc}.", self.stream_id
                    ) from exc
        finally:
            if self._response is not None:
                await self._response.aclose()


class _Jobs:
    """``/v1/jobs``: chat completions run in the background."""

    def __init__(self, client: AsyncSluice) -> None:
        self._client = client

    async def submit(
        self,
        request: Mapping[str, Any],
        *,
        webhook_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        priority: str | None = None,
        tags: Iterable[str] | None = None,
    ) -> Job:
        """Queues ``request`` (a chat completion body). With ``wait``, the gateway may
        hold the call up to that many seconds (``Prefer: wait=N``): a job done in time
        comes back completed (its ``result`` set)."""
        body = _base.drop_none(
            {
                "request": dict(request),
                "webhook_url": webhook_url,
                "metadata": dict(metadata) if metadata else None,
            }
        )
        headers = _base.extra_headers(
            idempotency_key=idempotency_key or _base.new_idempotency_key(),
            tags=tags,
            priority=priority,
        )
        if wait is not None:
            headers["Prefer"] = f"wait={wait:g}"
        response = await self._client._send("POST", "/v1/jobs", json=body, headers=headers)
        data = _base.parse_json(response)
        info = _base.response_info(response, headers[_base.IDEMPOTENCY_HEADER])
        if data.get("object") == "chat.completion":
            # Done within Prefer: wait: the answer came inline; the job holds it too.
            job_id = response.headers.get("x-sluice-job-id") or str(data.get("id", ""))
            job = await self.get(job_id)
        else:
            job = Job.model_validate(data)
        job._info = info
        return job

    async def get(self, job_id: str) -> Job:
        data, info = await self._client._json("GET", f"/v1/jobs/{job_id}")
        job = Job.model_validate(data)
        job._info = info
        return job

    async def list(self, *, limit: int = 20, after: str | None = None) -> JobList:
        params = _base.drop_none({"limit": str(limit), "after": after})
        data, _info = await self._client._json("GET", "/v1/jobs", params=params)
        return JobList.model_validate(data)

    async def cancel(self, job_id: str) -> Job:
        data, info = await self._client._json("POST", f"/v1/jobs/{job_id}/cancel")
        job = Job.model_validate(data)
        job._info = info
        return job

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 600.0,
        poll_interval: float = 0.25,
        max_poll_interval: float = 5.0,
    ) -> Job:
        """Polls until the job ends (completed, failed or cancelled), backing off from
        ``poll_interval`` to ``max_poll_interval``. A failed job is returned, not
        raised: its ``error`` holds the problem (``raise_for_job`` turns it into the
        typed error). Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        interval = poll_interval
        while True:
            job = await self.get(job_id)
            if job.done:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            await asyncio.sleep(min(interval, left))
            interval = min(max_poll_interval, interval * 2)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """``status`` events (the job, at once and on every change) and ``token`` events
        (each generated piece) until the job ends. A broken connection is followed
        again (bounded retries with backoff); tokens already yielded are skipped by
        their sequence, so each comes once."""
        retry = self._client.retry
        last_token = 0
        failures = 0
        while True:
            response = await self._client._send(
                "GET",
                f"/v1/jobs/{job_id}/events",
                headers={"Accept": "text/event-stream"},
                stream=True,
            )
            cause: Exception
            try:
                parser = SseParser()
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        item = _base.job_event_of(event)
                        if item is None:
                            continue
                        if item.event == "token":
                            if (item.sequence or 0) <= last_token:
                                continue
                            last_token = item.sequence or 0
                        failures = 0
                        yield item
                        if item.job is not None and item.job.done:
                            return
                cause = _Ended()
            except httpx.TransportError as exc:
                cause = exc
            finally:
                await response.aclose()
            failures += 1
            if failures > retry.max_retries:
                raise _base.interrupted(
                    f"The events of job {job_id} broke off {failures} times in a row.", job_id
                ) from cause
            await asyncio.sleep(retry.delay(failures))


class _Webhooks:
    def __init__(self, client: AsyncSluice) -> None:
        self._client = client

    async def secret(self) -> str:
        """The team's webhook signing secret (``whsec_...``)."""
        data, _info = await self._client._json("GET", "/v1/webhooks/secret")
        return str(data["secret"])
