"""``GET /v1/models``: the model names this gateway serves."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get

from services.gateway.domain.exchange import JSON
from services.gateway.handlers.http.deps import deps_of
from services.gateway.handlers.http.requests import authenticate


class ModelsController(Controller):
    path = "/v1"
    tags = ["models"]

    @get("/models", operation_id="listModels", summary="List models")
    async def list_models(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """The model names this gateway serves, in OpenAI's list shape."""
        deps = deps_of(request)
        await authenticate(request, deps.keys, None)
        return Response(deps.models_body, media_type=JSON)
