"""Reading a request: who sent it (API key), what it is (media type) and its body,
within the size limit."""

from __future__ import annotations

from typing import Any

from litestar import Request
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.exchange import JSON
from services.gateway.domain.ports import KeyLookup

# A client that sent too much is read to the end before the 413, up to this many bytes:
# answering mid-upload makes many clients report a reset connection instead of the 413.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
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
            raise _unauthorized("The Authorization header must be 'Bearer <key>'.")
        return token.strip()
    if x_api_key:
        return x_api_key.strip()
    raise _unauthorized("No API key was sent.")


async def authenticate(request: Request[Any, Any, Any], keys: KeyLookup) -> keys_pb2.ApiKeyRecord:
    """The caller's key (``Authorization: Bearer`` or ``x-api-key``), or a 401."""
    headers = request.headers
    return await keys.authenticate(
        extract_secret(headers.get("authorization"), headers.get("x-api-key"))
    )


async def authenticated_body(
    request: Request[Any, Any, Any], keys: KeyLookup, limit: int
) -> tuple[keys_pb2.ApiKeyRecord, bytes]:
    """A POST's key, then its JSON body (in that order: an unknown caller is refused
    before anything is read)."""
    key = await authenticate(request, keys)
    check_content_type(request.headers.get("content-type"))
    return key, await read_body(request, limit)
