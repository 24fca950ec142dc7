"""``GET /docs/asyncapi``: the AsyncAPI document of the events other services may
subscribe to (cost recorded, usage, lifecycle), beside the OpenAPI one at ``/docs``."""

from __future__ import annotations

import functools

from litestar import Controller, Response, get
from sluice.events import asyncapi_json

from services.gateway.domain.exchange import JSON


@functools.cache
def _document() -> bytes:
    # Built from the declarations on first use: the same bytes as docs/asyncapi.json.
    return asyncapi_json()


class DocsController(Controller):
    path = "/docs"
    tags = ["operations"]

    @get(
        "/asyncapi",
        operation_id="getAsyncApi",
        summary="AsyncAPI document of the published events",
    )
    async def asyncapi(self) -> Response[bytes]:
        """The NATS subjects other services may subscribe to, their protobuf payloads as
        JSON Schema, who publishes each, when, and with what delivery guarantee
        (AsyncAPI 3.0)."""
        return Response(_document(), media_type=JSON)
