"""The answer routes (``POST /v1/chat/completions`` and ``POST /v1/messages``) served
straight from the edge, without Litestar's routing, request and response objects.

They are every request's path, and Litestar's layers cost about a tenth of the gateway's
CPU per request there (routing, a ``Request`` and its ``Headers``, a ``Response``, the
exception middleware, an anyio task group per stream). The routes stay declared in
Litestar (the OpenAPI document, and the same code if the edge is not in front) and run
the same functions; only the ASGI around them is this module's. Errors take the shape
the Litestar handler gives them (``errors.problem_answer``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from sluice.metrics import Instruments

from services.gateway.domain.exchange import Answer
from services.gateway.handlers.http.controllers.chat import chat_completion
from services.gateway.handlers.http.controllers.messages import create_message
from services.gateway.handlers.http.deps import ApiDeps
from services.gateway.handlers.http.errors import as_error, problem_answer
from services.gateway.handlers.http.middleware import request_context
from services.gateway.handlers.http.routes import CHAT_ROUTE, MESSAGES_ROUTE
from services.gateway.handlers.http.sending import Receive, Send, send_answer, send_stream

SERVICE = "gateway"

RouteWork = Callable[[Any, ApiDeps], Awaitable[Answer]]
DirectRoute = Callable[[Any, Receive, Send], Awaitable[None]]


class AsgiHeaders(dict[str, str]):
    """A request's headers by lower-case name (the first value of a repeated one, as
    Litestar's ``Headers.get`` gives; ``getall`` gives every one), looked up
    case-insensitively."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        super().__init__()
        self._repeated: dict[str, list[str]] = {}
        for raw_name, raw_value in raw:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name in self:
                self._repeated.setdefault(name, [super().__getitem__(name)]).append(value)
            else:
                self[name] = value

    def getall(self, key: str, default: list[str] | None = None) -> list[str]:
        name = key.lower()
        if name in self._repeated:
            return list(self._repeated[name])
        if name in self:
            return [super().__getitem__(name)]
        if default is None:
            raise KeyError(key)
        return default

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


class AsgiRequest:
    """What the route functions read of a request (``requests.HttpRequest``)."""

    __slots__ = ("headers", "receive", "scope")

    def __init__(self, scope: Any, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.headers = AsgiHeaders(scope["headers"])


def _route(work: RouteWork, deps: ApiDeps, instruments: Instruments) -> DirectRoute:
    async def serve(scope: Any, receive: Receive, send: Send) -> None:
        try:
            answer = await work(AsgiRequest(scope, receive), deps)
        except Exception as exc:  # every error becomes the route's error shape
            ctx = request_context(scope)
            err = as_error(exc, ctx)
            instruments.errors.add(1, {"code": str(err.code), "service": SERVICE})
            ctx.notes.code = str(err.code)
            await send_answer(send, problem_answer(err, ctx))
            return
        if answer.stream is None:
            await send_answer(send, answer)
        else:
            await send_stream(send, receive, answer)

    return serve


def direct_routes(deps: ApiDeps) -> Mapping[tuple[str, str], DirectRoute]:
    """The routes the edge serves itself, by method and path."""
    return {
        ("POST", CHAT_ROUTE): _route(chat_completion, deps, deps.instruments),
        ("POST", MESSAGES_ROUTE): _route(create_message, deps, deps.instruments),
    }
