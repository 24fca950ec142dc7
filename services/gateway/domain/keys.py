"""API keys: stored as the SHA-256 of the secret, never in clear; the local dev key."""

from __future__ import annotations

import hashlib
import time

from sluice.keys.v1 import keys_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.versions import VERSIONS

DEV_KEY_ID = "dev"
DEV_TEAM_ID = "dev"
DEV_KEY_PREFIX = "sk-sluice-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def dev_key_record(secret: str) -> keys_pb2.ApiKeyRecord:
    """The record of the local dev key: every scope, the interactive tier."""
    return keys_pb2.ApiKeyRecord(
        key_id=DEV_KEY_ID,
        secret_sha256=hash_secret(secret),
        team_id=DEV_TEAM_ID,
        name="local dev key",
        scopes=["*"],
        tier=str(PriorityClass.INTERACTIVE),
        created_unix=int(time.time()),
        api_version=VERSIONS.current.name,
    )
