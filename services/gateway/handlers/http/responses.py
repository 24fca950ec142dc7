"""The domain's ``Answer`` as a Litestar response."""

from __future__ import annotations

from typing import Any

import orjson
from litestar import Response
from litestar.response import Stream

from services.gateway.domain.exchange import JSON, Answer


def to_response(answer: Answer) -> Response[Any]:
    if answer.stream is not None:
        return Stream(
            answer.stream,
            status_code=answer.status,
            media_type=answer.media_type,
            headers=answer.headers,
        )
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=answer.media_type,
        headers=answer.headers,
    )


def json_response(view: dict[str, Any], status: int = 200) -> Response[bytes]:
    return Response(orjson.dumps(view), status_code=status, media_type=JSON)
