"""What tenancy needs from the outside, as protocols (adapters: ``adapters/keys.py``,
``adapters/teams.py``, ``adapters/audit.py``, ``adapters/identity.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sluice.keys.v1 import keys_pb2
from sluice.tenancy.v1 import tenancy_pb2


class KeyLookup(Protocol):
    async def authenticate(self, secret: str) -> keys_pb2.ApiKeyRecord:
        """The record stored for this secret, or ``unauthorized`` (unknown)."""
        ...


class KeyAdmin(Protocol):
    async def create(self, record: keys_pb2.ApiKeyRecord, *, claim_name: bool = True) -> None:
        """Store a new key and its index entries; with ``claim_name``, ``conflict`` when
        its name is taken in its team (nothing is stored then)."""
        ...

    async def get(self, key_id: str) -> keys_pb2.ApiKeyRecord | None: ...

    async def put(self, record: keys_pb2.ApiKeyRecord) -> None:
        """Replace a key's record (every gateway drops its cached copy at once)."""
        ...

    async def release_name(self, record: keys_pb2.ApiKeyRecord) -> None:
        """The key's name may be used again (a revoked key)."""
        ...

    async def move_name(self, record: keys_pb2.ApiKeyRecord) -> None:
        """The key's name now names this key (the new key of a rotation)."""
        ...

    async def list(self, team_id: str | None) -> list[keys_pb2.ApiKeyRecord]: ...


class TeamLookup(Protocol):
    async def get(self, team_id: str) -> tenancy_pb2.Team | None:
        """The team (from memory while no change was seen), None when there is none."""
        ...


class TeamAdmin(TeamLookup, Protocol):
    async def create(self, team: tenancy_pb2.Team) -> None:
        """``conflict`` when the id exists."""
        ...

    async def update(self, team: tenancy_pb2.Team, expected: tenancy_pb2.Team) -> None:
        """Replace ``expected`` by ``team``; ``conflict`` when it changed meanwhile."""
        ...

    async def list(self) -> list[tenancy_pb2.Team]: ...


@dataclass(frozen=True)
class AuditQuery:
    team_id: str | None = None
    key_id: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    # The cursor of the previous page's last record (its message's stream sequence times
    # ``CURSOR_SPAN`` plus its place in the message): the page starts after it.
    after: int = 0


@dataclass
class AuditPage:
    events: list[tuple[int, tenancy_pb2.AuditEvent]] = field(default_factory=list)
    # Where the next page starts (0: nothing after this page).
    next_after: int = 0


class AuditLog(Protocol):
    def record(self, event: tenancy_pb2.AuditEvent, kind: str) -> None:
        """Send one record in the background (a request's with the next batch)."""
        ...

    async def query(self, query: AuditQuery) -> AuditPage: ...


@dataclass(frozen=True)
class VerifiedToken:
    """A JWT whose signature, issuer, audience and times were checked."""

    issuer: str
    claims: dict[str, Any]


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> VerifiedToken:
        """The token's claims, or ``invalid_token`` with the reason."""
        ...
