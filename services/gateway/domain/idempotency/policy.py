"""``Idempotency-Key`` as policy (IETF httpapi idempotency draft): the key, the
request's fingerprint, what of a response is kept, and when a duplicate may take a key
over. ``service.py`` applies it over the record store.

The first request with a key wins an atomic ``kv.create`` in the ``sluice_idempotency``
bucket (key: sha256 of team and key) and runs; the record keeps the request's
fingerprint and, once finished, its response. A duplicate:

- with another body: 422 ``idempotency_key_reused``;
- while the first runs: 409 ``idempotency_key_in_use`` with its progress, or, for a
  streamed request asked with ``Accept: text/event-stream``, the same stream (replayed
  from SLUICE_STREAMS, then live);
- after it finished: the stored response again, with ``Idempotent-Replayed: true``
  (a stream is replayed from its stored events).

What is kept, and what frees the key again:

- a response the first request got, success or error, once work reached the worker
  (an upstream 4xx/5xx, a failure mid-stream) is stored and replayed: the money may
  have been spent;
- a request refused before any work ran (bad body, unknown model, rate limit, the bus
  down before the work was queued) releases the key, so a corrected retry runs;
- a request whose client went away (or timed out at the gateway) after its work was
  queued stays in flight: the worker's lifecycle ``finished`` event completes the record
  (also when the gateway that ran it died), and a retry gets that outcome instead of a
  second run. A run the worker reports ``cancelled`` (``x-sluice-on-disconnect:
  cancel``) releases the key;
- a job (``POST /v1/jobs``, ``Prefer``) is stored as soon as it exists, its 202 or its
  inline answer; a job refused before it was created releases the key.

A streamed response is stored as the bytes sent (without heartbeats) when it is small
enough, and otherwise replayed from its events in ``SLUICE_STREAMS``.

Keys expire ``idempotency_ttl_seconds`` after the first request (the record says so, and
the bucket's TTL follows the setting).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.exchange import RequestContext

MAX_KEY_LENGTH = 255


REPLAYED = "idempotent-replayed"


# Headers worth replaying; rate-limit figures of the first answer would be stale.
STORED_HEADERS = frozenset(
    {
        "content-type",
        "location",
        "preference-applied",
        "x-sluice-cache",
        "x-sluice-cache-reason",
        "x-sluice-job-id",
        "cache-control",
        "x-accel-buffering",
        "x-should-retry",
    }
)


# A streamed answer up to this size is stored as sent; a longer one is replayed from
# SLUICE_STREAMS (KV values must fit in one NATS message).
MAX_STORED_STREAM_BYTES = 256 * 1024


# How long a duplicate asking for the stream waits for the first request's stream to
# open in SLUICE_STREAMS (admission runs before it does) before answering 409.
ATTACH_WAIT_SECONDS = 2.0


def _bad_key(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.INVALID_REQUEST, detail, param="Idempotency-Key")


def parse_key(value: str) -> str:
    """The key from an ``Idempotency-Key`` header: a structured-field string
    (``"abc"``) or, as many clients send it, the bare value."""
    text = value.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped:
                if ch not in '"\\':
                    raise _bad_key("Idempotency-Key is not a valid structured-field string.")
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                raise _bad_key("Idempotency-Key is not a valid structured-field string.")
            else:
                out.append(ch)
        if escaped:
            raise _bad_key("Idempotency-Key is not a valid structured-field string.")
        text = "".join(out)
    if not text:
        raise _bad_key("Idempotency-Key must not be empty.")
    if len(text) > MAX_KEY_LENGTH:
        raise _bad_key(f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters.")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in text):
        raise _bad_key("Idempotency-Key must be printable ASCII.")
    return text


def record_key(team_id: str, key: str) -> str:
    return hashlib.sha256(f"{team_id}:{key}".encode()).hexdigest()


def fingerprint(route: str, raw: bytes) -> str:
    """sha256 of the route and the canonical body (JSON with sorted keys)."""
    try:
        canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(route.encode() + b"\n" + canonical).hexdigest()


@dataclass(frozen=True)
class IdempotentRequest:
    key: keys_pb2.ApiKeyRecord
    raw_key: str
    route: str
    body: bytes
    ctx: RequestContext
    accept: str = ""
    stream: bool = False
    model: str = ""
    include_usage: bool = False
    # True for routes whose response is known at once (job submission).
    quick: bool = False
    # The route's public API (``Dialect.name``): stored answers and errors take its shape.
    dialect: str = "openai"
