"""Who a request was made for and how the caller labelled it, carried onto its usage
event so that spend can be grouped by them (``GET /v1/usage?group_by=end_user,tag``).

- **End user**: the one a JWT vouches for (its ``sub``), else the request's ``user``
  (OpenAI) or ``metadata.user_id`` (Anthropic, which its normaliser maps onto the same
  field): the end user the limiter's end-user level applies to.
- **Tags**: the ``x-sluice-tags`` header and the request's ``metadata.tags``, each a
  comma-separated list; the request carries their union, sorted. A tag is 1 to 64 of
  letters, digits and ``_ - . : / = @``, starting with a letter or digit; at most 16
  per request. Anything else is a 400 naming the header or field, so a typo never
  becomes a group of its own silently.
"""

from __future__ import annotations

import re

from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError

TAGS_HEADER = "x-sluice-tags"
TAGS_FIELD = "metadata.tags"
MAX_TAGS = 16
MAX_END_USER = 256
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:/=@]{0,63}")


def parse_tags(value: str | None, *, param: str) -> tuple[str, ...]:
    if not value:
        return ()
    tags: list[str] = []
    for part in value.split(","):
        tag = part.strip()
        if not tag:
            continue
        if not _TAG.fullmatch(tag):
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                f"{param} takes comma-separated tags of 1 to 64 letters, digits and "
                "_ - . : / = @, each starting with a letter or digit.",
                param=param,
            )
        tags.append(tag)
    return tuple(tags)


def request_labels(
    request: chat_pb2.ChatRequest, header_tags: tuple[str, ...], vouched_end_user: str = ""
) -> tuple[str, tuple[str, ...]]:
    """The request's end user (``vouched_end_user``, a JWT's ``sub``, else the body's)
    and tags (header and ``metadata.tags``, sorted, unique)."""
    tags = sorted({*header_tags, *parse_tags(request.metadata.get("tags"), param=TAGS_FIELD)})
    if len(tags) > MAX_TAGS:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            f"A request takes at most {MAX_TAGS} tags ({TAGS_HEADER} and {TAGS_FIELD} together).",
            param=TAGS_HEADER,
        )
    if len(request.user) > MAX_END_USER:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST,
            f"user is longer than {MAX_END_USER} characters.",
            param="user",
        )
    return vouched_end_user or request.user, tuple(tags)
