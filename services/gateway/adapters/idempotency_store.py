"""Idempotency records in the ``sluice_idempotency`` bucket: the first request's
``create`` is the only arbiter between duplicates, on every replica."""

from __future__ import annotations

import contextlib

from google.protobuf.message import DecodeError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES
from sluice.errors import ErrorCode
from sluice.jobs.v1 import jobs_pb2

from services.gateway.domain.problems import GatewayError


def _unavailable() -> GatewayError:
    return GatewayError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "The idempotency store did not answer.",
        retry_after_ms=1000,
    )


class KvIdempotencyStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, key: str, record: jobs_pb2.IdempotencyRecord) -> int | None:
        try:
            return int(await self.kv.create(key, record.SerializeToString()))
        except KeyWrongLastSequenceError:
            return None
        except NATS_FAILURES:
            raise _unavailable() from None

    async def get(self, key: str) -> tuple[jobs_pb2.IdempotencyRecord, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except NATS_FAILURES:
            raise _unavailable() from None
        record = jobs_pb2.IdempotencyRecord()
        try:
            record.ParseFromString(entry.value or b"")
        except DecodeError:
            # Unreadable: no fingerprint, so the key is taken over as an expired one.
            record = jobs_pb2.IdempotencyRecord()
        return record, int(entry.revision or 0)

    async def update(self, key: str, record: jobs_pb2.IdempotencyRecord, revision: int) -> bool:
        try:
            await self.kv.update(key, record.SerializeToString(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        except NATS_FAILURES:
            raise _unavailable() from None
        return True

    async def delete(self, key: str, revision: int) -> None:
        # A delete with a stale revision fails as a plain BadRequestError (err_code
        # 10071), not as KeyWrongLastSequenceError, so every NATS failure is swallowed.
        with contextlib.suppress(*NATS_FAILURES):
            await self.kv.delete(key, last=revision)
