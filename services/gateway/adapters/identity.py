"""JWT verification (PyJWT with cryptography) against each configured issuer's JWKS, read
from a file or fetched by URL (aiohttp) and kept for ``jwks_cache_seconds``; a token
signed by a key id the set does not have fetches the set again, at most every
``jwks_min_refresh_seconds`` (the issuer rotated its keys)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson

from services.gateway.domain.tenancy.identity import ClaimsMapping, invalid_token
from services.gateway.domain.tenancy.ports import VerifiedToken
from services.gateway.settings import JwtIssuer

log = logging.getLogger(__name__)


def mapping_of(issuer: JwtIssuer) -> ClaimsMapping:
    return ClaimsMapping(
        name=issuer.name,
        issuer=issuer.issuer,
        team_claim=issuer.team_claim,
        scopes_claim=issuer.scopes_claim,
        user_claim=issuer.user_claim,
        default_scopes=tuple(issuer.default_scopes),
        model_allow=tuple(issuer.model_allow),
    )


class _KeySet:
    def __init__(
        self,
        issuer: JwtIssuer,
        *,
        cache_seconds: float,
        min_refresh_seconds: float,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.cache_seconds = cache_seconds
        self.min_refresh = min_refresh_seconds
        self.timeout = timeout
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.unnamed: list[jwt.PyJWK] = []
        self.fetched_at = -1e18
        self._lock = asyncio.Lock()

    async def _load(self) -> bytes:
        if self.issuer.jwks_file is not None:
            return await asyncio.to_thread(self.issuer.jwks_file.read_bytes)
        assert self.issuer.jwks_url is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.issuer.jwks_url) as response,
        ):
            if response.status != 200:
                raise OSError(f"JWKS answered {response.status}")
            return await response.read()

    async def refresh(self, *, force: bool) -> None:
        async with self._lock:
            age = self.clock() - self.fetched_at
            if age < (self.min_refresh if force else self.cache_seconds):
                return
            try:
                raw = await self._load()
                document: Any = orjson.loads(raw)
                keyset = jwt.PyJWKSet.from_dict(document)
            except (
                OSError,
                aiohttp.ClientError,
                TimeoutError,
                orjson.JSONDecodeError,
                jwt.PyJWKSetError,
            ) as exc:
                # Keep the keys we had: a provider's hiccup must not lock everyone out.
                log.warning("JWKS of issuer %s not loaded: %s", self.issuer.name, exc)
                self.fetched_at = self.clock() - self.cache_seconds + self.min_refresh
                return
            self.keys = {k.key_id: k for k in keyset.keys if k.key_id}
            self.unnamed = [k for k in keyset.keys if not k.key_id]
            self.fetched_at = self.clock()

    async def candidates(self, kid: str | None) -> list[jwt.PyJWK]:
        await self.refresh(force=False)
        if kid is None:
            return list(self.keys.values()) + self.unnamed
        if kid not in self.keys:
            await self.refresh(force=True)
        found = self.keys.get(kid)
        return [found] if found is not None else []


class JwksVerifier:
    def __init__(
        self,
        issuers: list[JwtIssuer],
        *,
        cache_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sets = {
            i.issuer: _KeySet(
                i,
                cache_seconds=cache_seconds,
                min_refresh_seconds=min_refresh_seconds,
                timeout=timeout,
                clock=clock,
            )
            for i in issuers
        }

    async def start(self) -> None:
        """Load every issuer's keys now, so the first token does not wait for them."""
        await asyncio.gather(*(s.refresh(force=False) for s in self.sets.values()))

    async def verify(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise invalid_token("malformed", "The bearer token is not a well-formed JWT.") from None
        iss = unverified.get("iss")
        keyset = self.sets.get(iss) if isinstance(iss, str) else None
        if keyset is None:
            raise invalid_token("unknown_issuer", "The token's issuer is not configured here.")
        issuer = keyset.issuer
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise invalid_token(
                "algorithm_not_allowed", f"Tokens signed with '{alg}' are not accepted."
            )
        kid = header.get("kid")
        candidates = await keyset.candidates(kid if isinstance(kid, str) else None)
        if not candidates:
            raise invalid_token(
                "unknown_signing_key", "The token is signed by a key its issuer does not publish."
            )
        failure: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=issuer.algorithms,
                    audience=issuer.audience,
                    issuer=issuer.issuer,
                    leeway=issuer.leeway_seconds,
                    options={"require": ["exp", "iss", "aud"]},
                )
                return VerifiedToken(issuer=issuer.issuer, claims=claims)
            except jwt.InvalidSignatureError as exc:
                failure = exc
                continue
            except (TypeError, ValueError):
                # The header's algorithm is of another family than the key (an EC
                # signature claiming an RSA key's id): it cannot verify.
                failure = jwt.InvalidSignatureError()
                continue
            except jwt.PyJWTError as exc:
                failure = exc
                break
        raise _reason(failure)


def _reason(exc: Exception | None) -> Exception:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return invalid_token("expired", "The token has expired.")
    if isinstance(exc, jwt.InvalidAudienceError):
        return invalid_token("wrong_audience", "The token is not meant for this audience.")
    if isinstance(exc, jwt.InvalidIssuerError):
        return invalid_token("unknown_issuer", "The token's issuer is not configured here.")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return invalid_token("not_yet_valid", "The token is not valid yet.")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return invalid_token("missing_claim", f"The token lacks the '{exc.claim}' claim.")
    if isinstance(exc, jwt.InvalidSignatureError):
        return invalid_token("bad_signature", "The token's signature does not verify.")
    return invalid_token("invalid", "The token could not be verified.")
