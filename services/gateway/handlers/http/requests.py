"""Reading a request: who sent it (API key), what it is (media type) and its body,
within the size limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from opentelemetry import trace
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.console import KEY_ATTRIBUTE, TEAM_ATTRIBUTE
from services.gateway.domain.exchange import JSON
from services.gateway.domain.tenancy.identity import Authenticator
from services.gateway.domain.tenancy.policy import Caller, Scope, require_scope
from services.gateway.handlers.http.middleware import request_context


class HttpRequest(Protocol):
    """What reading a request needs of it: a Litestar ``Request``, or the bare ASGI
    request of a direct route (``direct.AsgiRequest``)."""

    @property
    def scope(self) -> Any: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def receive(self) -> Awaitable[Any]: ...


# A client that sent too much is read to the end before the 413, up to this many bytes:
# answering mid-upload makes many clients report a reset connection instead of the 413.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else -1
    too_large = length > limit
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            too_large = True
        if not too_large:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > limit + _DRAIN_LIMIT_BYTES:
            break
        if size == length and not too_large:
            # The declared body is all here. Granian marks a body's last chunk as
            # ``more_body`` and says it ended only on another ``receive``, a second
            # hand-off from its runtime thread to the event loop, before admission.
            break
    if too_large:
        raise SluiceError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"The request body is above the gateway's limit of {limit} bytes.",
            details={"limit_bytes": limit},
        )
    return b"".join(chunks)


def check_content_type(value: str | None) -> None:
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != JSON and not media.endswith("+json"):
        raise SluiceError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "The body must be JSON (Content-Type: application/json).",
        )


def _unauthorized(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.UNAUTHORIZED, detail)


def extract_secret(authorization: str | None, x_api_key: str | None) -> str:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("The Authorization header must be 'Bearer <key or JWT>'.")
        return token.strip()
    if x_api_key:
        return x_api_key.strip()
    raise _unauthorized("No API key was sent.")


async def authenticate_caller(
    request: HttpRequest, keys: Authenticator, scope: Scope | None
) -> Caller:
    """The caller (an API key in ``Authorization: Bearer`` or ``x-api-key``, or a JWT
    in ``Authorization: Bearer``), or a 401; then the scope the route needs, or a 403.
    The request's audit notes get who it is."""
    headers = request.headers
    caller = await keys.authenticate(
        extract_secret(headers.get("authorization"), headers.get("x-api-key"))
    )
    ctx = request_context(request.scope)
    notes = ctx.notes
    notes.actor = caller.actor
    notes.key_id = caller.key.key_id
    notes.team_id = caller.key.team_id
    notes.end_user = caller.end_user
    notes.audit_prompts = caller.key.audit_prompts
    # The key's own API version, unless the request named one (a dict lookup).
    ctx.version.settle_for_key(caller.key.api_version)
    # Whose trace this is (GET /v1/traces/{id} shows it to that team only).
    span = trace.get_current_span()
    span.set_attribute(TEAM_ATTRIBUTE, caller.key.team_id)
    span.set_attribute(KEY_ATTRIBUTE, caller.key.key_id)
    if scope is not None:
        require_scope(caller.key, scope)
    return caller


async def authenticate(
    request: HttpRequest, keys: Authenticator, scope: Scope | None
) -> keys_pb2.ApiKeyRecord:
    """The caller's key record (see ``authenticate_caller``)."""
    return (await authenticate_caller(request, keys, scope)).key


async def authenticated_body(
    request: HttpRequest,
    keys: Authenticator,
    limit: int,
    scope: Scope,
    scrub: Callable[[str], str] | None = None,
) -> tuple[Caller, bytes]:
    """A POST's caller, then its JSON body (in that order: an unknown caller is refused
    before anything is read). ``scrub`` cleans the body kept as an audited prompt (the
    input guard's rules)."""
    caller = await authenticate_caller(request, keys, scope)
    check_content_type(request.headers.get("content-type"))
    body = await read_body(request, limit)
    notes = request_context(request.scope).notes
    if notes.audit_prompts:
        # Only for keys whose policy asks: the body as sent is the prompt of record.
        notes.prompt = body.decode("utf-8", "replace")
        if scrub is not None:
            notes.prompt = scrub(notes.prompt)
    return caller, body
