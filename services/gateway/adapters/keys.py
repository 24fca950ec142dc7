"""API keys in the ``sluice_api_keys`` bucket, by the SHA-256 of their secret; positive
lookups cached in memory; the local dev key bootstrapped from the environment or
generated once into the state directory."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.keys import DEV_KEY_PREFIX, dev_key_record, hash_secret
from services.gateway.domain.problems import unavailable

log = logging.getLogger(__name__)

DEV_KEY_FILENAME = "dev-key"


def _unauthorized(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.UNAUTHORIZED, detail)


class KvKeyStore:
    """Resolves a secret to its record; a key found stays trusted for ``ttl`` seconds."""

    def __init__(self, kv: KeyValue, ttl: float = 30.0, max_entries: int = 10_000) -> None:
        self._kv = kv
        self._ttl = ttl
        self._max_entries = max_entries
        self._cache: dict[str, tuple[keys_pb2.ApiKeyRecord, float]] = {}

    async def authenticate(self, secret: str) -> keys_pb2.ApiKeyRecord:
        digest = hash_secret(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            entry = await self._kv.get(digest)
        except KeyNotFoundError:
            raise _unauthorized("The API key is not valid.") from None
        except NATS_FAILURES as exc:
            log.warning("key lookup failed: %s", type(exc).__name__)
            raise unavailable("The key store did not answer.") from None
        record = keys_pb2.ApiKeyRecord()
        record.ParseFromString(entry.value or b"")
        if record.disabled or record.secret_sha256 != digest:
            raise _unauthorized("The API key is disabled or not valid.")
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[digest] = (record, now + self._ttl)
        return record


def _read_or_create_dev_key(state_dir: Path) -> str:
    path = state_dir / DEV_KEY_FILENAME
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    secret = DEV_KEY_PREFIX + secrets.token_urlsafe(32)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    log.info("generated a local dev API key; it is in %s", path)
    return secret


async def bootstrap_dev_key(
    kv: KeyValue, configured: str | None, *, state_dir: Path, is_local: bool
) -> keys_pb2.ApiKeyRecord:
    """Store the hash of the dev key. Outside ``local`` a missing key is a start failure."""
    if configured:
        secret = configured
    elif is_local:
        secret = _read_or_create_dev_key(state_dir)
    else:
        raise RuntimeError(
            "SLUICE_DEV_API_KEY is not set and the environment is not local: refusing to "
            "start without a configured key"
        )
    record = dev_key_record(secret)
    await kv.put(record.secret_sha256, record.SerializeToString())
    return record
