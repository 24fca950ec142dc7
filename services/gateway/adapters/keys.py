"""API keys in the ``sluice_api_keys`` bucket: the record under the SHA-256 of its
secret (the lookup on every request), ``id.<key_id>`` holding that hash and an empty
``team.<team_id>.<key_id>`` (administration by id and by team), ``name.<team_id>.<hash
of the name>`` claiming a name in its team. Records found are cached in memory and
dropped on every replica the moment one of them changes (``WatchedCache``). The local
dev key and the admin key are bootstrapped from the environment or generated once into
the state directory."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from pathlib import Path

from google.protobuf.message import DecodeError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES, Bus
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.topology import Buckets

from services.gateway.adapters.watched import WatchedCache
from services.gateway.domain.keys import DEV_KEY_PREFIX, dev_key_record, hash_secret
from services.gateway.domain.problems import unavailable
from services.gateway.domain.tenancy.policy import ADMIN_KEY_ID, ADMIN_TEAM_ID, Scope
from services.gateway.domain.versions import VERSIONS

log = logging.getLogger(__name__)

DEV_KEY_FILENAME = "dev-key"
ADMIN_KEY_FILENAME = "admin-key"
ADMIN_KEY_PREFIX = "sk-sluice-admin-"
_UNAVAILABLE = "The key store did not answer."


def _unauthorized(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.UNAUTHORIZED, detail)


def _parse(raw: bytes | None) -> keys_pb2.ApiKeyRecord | None:
    record = keys_pb2.ApiKeyRecord()
    try:
        record.ParseFromString(raw or b"")
    except DecodeError:
        return None
    return record


def _name_key(record: keys_pb2.ApiKeyRecord) -> str:
    digest = hashlib.sha256(record.name.encode()).hexdigest()[:32]
    return f"name.{record.team_id}.{digest}"


class KvKeyStore:
    """Resolves a secret to its record (``authenticate``) and administers records."""

    def __init__(self, kv: KeyValue, bus: Bus, ttl: float = 30.0) -> None:
        self._kv = kv
        self._bus = bus
        self.cache: WatchedCache[keys_pb2.ApiKeyRecord] = WatchedCache(
            bus, Buckets.API_KEYS, ttl=ttl
        )

    async def start(self) -> None:
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()

    async def authenticate(self, secret: str) -> keys_pb2.ApiKeyRecord:
        digest = hash_secret(secret)
        found, record = self.cache.lookup(digest)
        if found and record is not None:
            return record
        generation = self.cache.generation
        try:
            entry = await self._kv.get(digest)
        except KeyNotFoundError:
            # Unknown secrets are not cached: anyone can send many.
            raise _unauthorized("The API key is not valid.") from None
        except NATS_FAILURES as exc:
            log.warning("key lookup failed: %s", type(exc).__name__)
            raise unavailable("The key store did not answer.") from None
        record = _parse(entry.value)
        if record is None or record.secret_sha256 != digest:
            raise _unauthorized("The API key is not valid.")
        # Revoked and expired keys are cached too: the caller checks what the record says.
        self.cache.put(digest, record, generation)
        return record

    # --- administration -------------------------------------------------------------

    async def create(self, record: keys_pb2.ApiKeyRecord, *, claim_name: bool = True) -> None:
        try:
            if claim_name:
                try:
                    await self._kv.create(_name_key(record), record.key_id.encode())
                except KeyWrongLastSequenceError:
                    raise SluiceError(
                        ErrorCode.CONFLICT,
                        f"The team '{record.team_id}' has a key named '{record.name[:128]}' "
                        "already.",
                        param="name",
                    ) from None
            await self._kv.create(record.secret_sha256, record.SerializeToString())
            await asyncio.gather(
                self._kv.put(f"id.{record.key_id}", record.secret_sha256.encode()),
                self._kv.put(f"team.{record.team_id}.{record.key_id}", b""),
            )
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None

    async def get(self, key_id: str) -> keys_pb2.ApiKeyRecord | None:
        try:
            pointer = await self._kv.get(f"id.{key_id}")
            entry = await self._kv.get((pointer.value or b"").decode())
        except KeyNotFoundError:
            return None
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        return _parse(entry.value)

    async def put(self, record: keys_pb2.ApiKeyRecord) -> None:
        try:
            await self._kv.put(record.secret_sha256, record.SerializeToString())
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        # This replica's own copy goes now, not when its watch sees the change.
        self.cache.drop(record.secret_sha256)

    async def release_name(self, record: keys_pb2.ApiKeyRecord) -> None:
        try:
            entry = await self._kv.get(_name_key(record))
            if (entry.value or b"").decode() == record.key_id:
                await self._kv.delete(_name_key(record))
        except KeyNotFoundError:
            return
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None

    async def move_name(self, record: keys_pb2.ApiKeyRecord) -> None:
        try:
            await self._kv.put(_name_key(record), record.key_id.encode())
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None

    async def list(self, team_id: str | None) -> list[keys_pb2.ApiKeyRecord]:
        """From the server's subject index of the bucket (as jobs are listed), then
        each record; ids whose record is missing are skipped."""
        prefix = Buckets.API_KEYS.key_subject(f"team.{team_id}." if team_id else "id.")
        try:
            subjects = await self._bus.stream_subjects(Buckets.API_KEYS.stream_name, prefix + ">")
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        ids = [s[len(prefix) :] for s in subjects if s.startswith(prefix)]
        found = await asyncio.gather(*(self.get(key_id) for key_id in ids))
        return [r for r in found if r is not None]


def _read_or_create(state_dir: Path, filename: str, prefix: str, what: str) -> str:
    path = state_dir / filename
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    secret = prefix + secrets.token_urlsafe(32)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another gateway starting beside this one wrote it first.
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    log.info("generated a local %s; it is in %s", what, path)
    return secret


def _read_or_create_dev_key(state_dir: Path) -> str:
    return _read_or_create(state_dir, DEV_KEY_FILENAME, DEV_KEY_PREFIX, "dev API key")


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


def admin_key_record(secret: str, created_unix: int) -> keys_pb2.ApiKeyRecord:
    return keys_pb2.ApiKeyRecord(
        key_id=ADMIN_KEY_ID,
        secret_sha256=hash_secret(secret),
        team_id=ADMIN_TEAM_ID,
        name="admin key",
        scopes=[Scope.ADMIN],
        created_unix=created_unix,
        secret_prefix=secret[: len(ADMIN_KEY_PREFIX) + 4],
        api_version=VERSIONS.current.name,
    )


async def bootstrap_admin_key(
    kv: KeyValue, configured: str | None, *, state_dir: Path, is_local: bool, now: int
) -> keys_pb2.ApiKeyRecord:
    """Store the hash of the admin key (``SLUICE_ADMIN_API_KEY``; in ``local``, generated
    once into ``<state>/admin-key``). A different admin key stored before is revoked, so
    that changing the variable retires the old secret."""
    if configured:
        secret = configured
    elif is_local:
        secret = _read_or_create(state_dir, ADMIN_KEY_FILENAME, ADMIN_KEY_PREFIX, "admin API key")
    else:
        raise RuntimeError(
            "SLUICE_ADMIN_API_KEY is not set and the environment is not local: refusing to "
            "start without a configured admin key"
        )
    record = admin_key_record(secret, now)
    try:
        previous = await kv.get(f"id.{ADMIN_KEY_ID}")
        old_digest = (previous.value or b"").decode()
    except KeyNotFoundError:
        old_digest = ""
    if old_digest and old_digest != record.secret_sha256:
        try:
            old = _parse((await kv.get(old_digest)).value)
        except KeyNotFoundError:
            old = None
        if old is not None and not old.revoked_unix:
            old.revoked_unix = now
            old.disabled = True
            await kv.put(old_digest, old.SerializeToString())
            log.info("the admin key changed: the previous one is revoked")
    await kv.put(record.secret_sha256, record.SerializeToString())
    await kv.put(f"id.{ADMIN_KEY_ID}", record.secret_sha256.encode())
    return record
