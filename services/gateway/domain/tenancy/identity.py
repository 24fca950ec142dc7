"""Enterprise identity: a verified JWT's claims into a caller (team, scopes, end user),
by the names each issuer's configuration gives them; and the one authenticator that
takes either a JWT or an API key."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2

from services.gateway.domain.tenancy.policy import (
    ADMIN_TEAM_ID,
    KNOWN_SCOPES,
    Caller,
    check_usable,
)
from services.gateway.domain.tenancy.ports import KeyLookup, TeamLookup, TokenVerifier
from services.gateway.domain.versions import VERSIONS


@dataclass(frozen=True)
class ClaimsMapping:
    """Which claim holds what, for one issuer."""

    # A short name for the issuer: the key id of its callers is ``jwt-<name>``.
    name: str
    issuer: str
    team_claim: str = "team"
    # Space-separated text (OAuth's ``scope``) or a list.
    scopes_claim: str = "scope"
    user_claim: str = "sub"
    # Scopes every token of this issuer has, beside its own.
    default_scopes: tuple[str, ...] = ()
    # Model allow-list of this issuer's callers (empty: every model).
    model_allow: tuple[str, ...] = ()


def invalid_token(reason: str, detail: str) -> SluiceError:
    return SluiceError(ErrorCode.INVALID_TOKEN, detail, details={"reason": reason})


def looks_like_jwt(credential: str) -> bool:
    """A compact JWS: three base64url parts, the header a JSON object (``eyJ``). Sluice
    keys never contain a dot."""
    return credential.startswith("eyJ") and credential.count(".") == 2


def _claim(claims: dict[str, object], name: str) -> object:
    """A claim by name; a dotted name reaches into nested objects (``org.team``)."""
    value: object = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def caller_from_claims(mapping: ClaimsMapping, claims: dict[str, object]) -> Caller:
    team = _claim(claims, mapping.team_claim)
    if not isinstance(team, str) or not team:
        raise invalid_token(
            "missing_team_claim", f"The token has no '{mapping.team_claim}' claim naming a team."
        )
    if team == ADMIN_TEAM_ID:
        raise invalid_token(
            "reserved_team", "Tokens cannot act for the operators' team; use the admin key."
        )
    user = _claim(claims, mapping.user_claim)
    if not isinstance(user, str) or not user:
        raise invalid_token("missing_subject", f"The token has no '{mapping.user_claim}' claim.")
    raw = _claim(claims, mapping.scopes_claim)
    scopes: list[str] = list(mapping.default_scopes)
    if isinstance(raw, str):
        scopes.extend(raw.split())
    elif isinstance(raw, list):
        scopes.extend(s for s in raw if isinstance(s, str))
    # Only Sluice's scopes mean anything here ("*" is never taken from a token).
    kept = sorted({s for s in scopes if s in KNOWN_SCOPES and s != "*"})
    key = keys_pb2.ApiKeyRecord(
        key_id=f"jwt-{mapping.name}",
        team_id=team,
        name=f"JWT from {mapping.issuer}",
        scopes=kept,
        model_allow=list(mapping.model_allow),
        api_version=VERSIONS.current.name,
    )
    return Caller(key=key, actor=f"jwt:{mapping.issuer}:{user}", end_user=user, via="jwt")


@dataclass
class Authenticator:
    """An API key (looked up by its hash) or a JWT (verified against its issuer's JWKS),
    into the caller; 401 with the reason otherwise."""

    keys: KeyLookup
    teams: TeamLookup
    tokens: TokenVerifier | None = None
    mappings: dict[str, ClaimsMapping] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    async def authenticate(self, credential: str) -> Caller:
        if looks_like_jwt(credential):
            return await self._from_token(credential)
        key = await self.keys.authenticate(credential)
        check_usable(key, self.clock())
        return Caller(key=key, actor=key.key_id)

    async def _from_token(self, token: str) -> Caller:
        if self.tokens is None:
            raise invalid_token(
                "no_issuers", "This gateway accepts no JWTs (no issuer is configured)."
            )
        verified = await self.tokens.verify(token)
        mapping = self.mappings.get(verified.issuer)
        if mapping is None:
            raise invalid_token("unknown_issuer", "The token's issuer is not configured here.")
        caller = caller_from_claims(mapping, verified.claims)
        team = await self.teams.get(caller.key.team_id)
        if team is None:
            raise invalid_token(
                "unknown_team",
                f"The team '{caller.key.team_id[:64]}' named by the token does not exist here.",
            )
        return caller
