"""Administration of teams and keys: what an admin may change, checked before anything
is stored, and one audit record per change.

Two kinds of administrator: the operators (the admin key, team ``admin``) administer
every team and alone create teams or change a team's tier, limits and budgets; a key
with the ``admin`` scope in another team administers that team's keys and reads that
team's audit trail, and sees no other team (another team's key or team is a 404, as if
it did not exist)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.tenancy.v1 import tenancy_pb2

from services.gateway.domain.tenancy import audit
from services.gateway.domain.tenancy.limits import Budgets, Limits
from services.gateway.domain.tenancy.policy import (
    ID_PATTERN,
    KNOWN_SCOPES,
    RESERVED_TEAM_IDS,
    Caller,
    Scope,
    is_operator,
    require_scope,
)
from services.gateway.domain.tenancy.ports import (
    AuditLog,
    AuditPage,
    AuditQuery,
    KeyAdmin,
    TeamAdmin,
)
from services.gateway.domain.tenancy.tiers import TierTable
from services.gateway.domain.versions import VERSIONS, VersionRegistry

KEY_PREFIX = "sk-sluice-"
# How much of a secret lists show, to recognise a key ("sk-sluice-AbCd").
SECRET_PREFIX_CHARS = 14
BUDGET_POLICIES = ("finish", "cut")
MAX_METADATA = 32


def _invalid(detail: str, param: str) -> SluiceError:
    return SluiceError(ErrorCode.INVALID_REQUEST, detail, param=param)


def _not_found(what: str, ident: str) -> SluiceError:
    return SluiceError(ErrorCode.NOT_FOUND, f"There is no {what} '{ident[:64]}'.")


def _forbidden(detail: str) -> SluiceError:
    return SluiceError(ErrorCode.FORBIDDEN, detail)


def check_metadata(metadata: dict[str, str], param: str) -> dict[str, str]:
    if len(metadata) > MAX_METADATA:
        raise _invalid(f"At most {MAX_METADATA} metadata entries.", param)
    for k, v in metadata.items():
        if not k or len(k) > 64 or len(v) > 512:
            raise _invalid("Metadata keys are 1-64 characters, values at most 512.", param)
    return metadata


@dataclass(frozen=True)
class TeamSpec:
    team_id: str
    name: str = ""
    tier: str = ""
    limits: Limits = field(default_factory=Limits)
    budgets: Budgets = field(default_factory=Budgets)
    end_user_limits: Limits = field(default_factory=Limits)
    end_user_budgets: Budgets = field(default_factory=Budgets)
    alert_webhook_url: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TeamChanges:
    """What an update changes; None leaves a part as it is. Limits and budgets given
    replace the team's own values field by field (0 goes back to the tier's)."""

    name: str | None = None
    tier: str | None = None
    limits: dict[str, int] | None = None
    budgets: dict[str, int] | None = None
    end_user_limits: dict[str, int] | None = None
    end_user_budgets: dict[str, int] | None = None
    alert_webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    disabled: bool | None = None


@dataclass(frozen=True)
class KeySpec:
    team_id: str
    name: str
    scopes: tuple[str, ...] = (Scope.CHAT,)
    model_allow: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    budgets: Budgets = field(default_factory=Budgets)
    expires_unix: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    audit_prompts: bool = False
    on_budget_exhausted: str = "finish"
    # The API version of its requests that name none (empty: the current one).
    api_version: str = ""


@dataclass(frozen=True)
class KeyChanges:
    scopes: tuple[str, ...] | None = None
    model_allow: tuple[str, ...] | None = None
    limits: dict[str, int] | None = None
    budgets: dict[str, int] | None = None
    expires_unix: int | None = None
    metadata: dict[str, str] | None = None
    audit_prompts: bool | None = None
    on_budget_exhausted: str | None = None
    api_version: str | None = None


@dataclass(frozen=True)
class IssuedKey:
    """A new key: the secret, shown this once and stored nowhere, and its record."""

    secret: str
    record: keys_pb2.ApiKeyRecord


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_scopes(scopes: tuple[str, ...], operator: bool) -> list[str]:
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise _invalid(
            f"Unknown scope(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(s for s in KNOWN_SCOPES))}.",
            "scopes",
        )
    if not scopes:
        raise _invalid("A key needs at least one scope.", "scopes")
    if Scope.ALL in scopes and not operator:
        raise _forbidden("Only operators may issue keys with every scope ('*').")
    return sorted(set(scopes))


def _check_models(models: tuple[str, ...]) -> list[str]:
    for m in models:
        if not m or len(m) > 128 or any(c.isspace() for c in m):
            raise _invalid(
                f"Model pattern {m[:64]!r} must be 1-128 characters without spaces.", "model_allow"
            )
    return list(dict.fromkeys(models))


def _patched_limits(base: Limits, changes: dict[str, int], param: str) -> Limits:
    for name, value in changes.items():
        if value < 0:
            raise _invalid(f"{name} cannot be below zero.", param)
    return replace(base, **changes)


def _patched_budgets(base: Budgets, changes: dict[str, int], param: str) -> Budgets:
    for name, value in changes.items():
        if value < 0:
            raise _invalid(f"A budget cannot be below zero ({name}).", param)
    return replace(base, **changes)


class AdminService:
    def __init__(
        self,
        *,
        teams: TeamAdmin,
        keys: KeyAdmin,
        audit_log: AuditLog,
        tiers: TierTable,
        clock: Callable[[], float] = time.time,
        versions: VersionRegistry = VERSIONS,
    ) -> None:
        self.versions = versions
        self.teams = teams
        self.keys = keys
        self.audit_log = audit_log
        self.tiers = tiers
        self.clock = clock

    # --- who may ---------------------------------------------------------------------

    @staticmethod
    def _admin(caller: Caller) -> None:
        require_scope(caller.key, Scope.ADMIN)

    def _operator(self, caller: Caller) -> None:
        self._admin(caller)
        if not is_operator(caller.key):
            raise _forbidden("Only operators (the admin key) may do this.")

    @staticmethod
    def _may_see_team(caller: Caller, team_id: str) -> bool:
        return is_operator(caller.key) or caller.key.team_id == team_id

    def _record(
        self, caller: Caller, action: str, team_id: str, target: str, trace_id: str, **details: str
    ) -> None:
        self.audit_log.record(
            audit.admin_event(
                actor=caller.actor,
                team_id=team_id,
                action=action,
                target=target,
                trace_id=trace_id,
                details={k: v for k, v in details.items() if v},
            ),
            audit.ADMIN,
        )

    # --- teams -----------------------------------------------------------------------

    def _check_tier(self, tier: str) -> str:
        if not self.tiers.tiers:
            raise _invalid(
                "No tiers are configured: add tiers.yaml to the configuration folder "
                "(see config/tiers.yaml) and restart the gateway.",
                "tier",
            )
        chosen = tier or self.tiers.default
        if not chosen:
            raise _invalid("Name a tier (no default_tier in tiers.yaml).", "tier")
        if self.tiers.get(chosen) is None:
            raise _invalid(
                f"Unknown tier '{chosen[:64]}'; tiers: {', '.join(sorted(self.tiers.tiers))}.",
                "tier",
            )
        return chosen

    async def create_team(self, caller: Caller, spec: TeamSpec, trace_id: str) -> tenancy_pb2.Team:
        self._operator(caller)
        if not ID_PATTERN.match(spec.team_id):
            raise _invalid(
                "A team id is 1-63 lower-case letters, digits, - or _, starting with a "
                "letter or digit.",
                "team_id",
            )
        if spec.team_id in RESERVED_TEAM_IDS:
            raise _invalid(f"The team id '{spec.team_id}' is reserved.", "team_id")
        team = tenancy_pb2.Team(
            team_id=spec.team_id,
            name=spec.name or spec.team_id,
            tier=self._check_tier(spec.tier),
            limits=spec.limits.to_proto(),
            budgets=spec.budgets.to_proto(),
            end_user_limits=spec.end_user_limits.to_proto(),
            end_user_budgets=spec.end_user_budgets.to_proto(),
            alert_webhook_url=spec.alert_webhook_url,
            metadata=check_metadata(spec.metadata, "metadata"),
            created_unix=int(self.clock()),
        )
        await self.teams.create(team)
        self._record(caller, "team.create", team.team_id, team.team_id, trace_id, tier=team.tier)
        return team

    async def team(self, caller: Caller, team_id: str) -> tenancy_pb2.Team:
        self._admin(caller)
        team = await self.teams.get(team_id) if self._may_see_team(caller, team_id) else None
        if team is None:
            raise _not_found("team", team_id)
        return team

    async def list_teams(self, caller: Caller) -> list[tenancy_pb2.Team]:
        self._admin(caller)
        teams = await self.teams.list()
        return sorted(
            (t for t in teams if self._may_see_team(caller, t.team_id)), key=lambda t: t.team_id
        )

    async def update_team(
        self, caller: Caller, team_id: str, changes: TeamChanges, trace_id: str
    ) -> tenancy_pb2.Team:
        self._operator(caller)
        current = await self.team(caller, team_id)
        team = tenancy_pb2.Team()
        team.CopyFrom(current)
        if changes.name is not None:
            team.name = changes.name or team.team_id
        if changes.tier is not None:
            team.tier = self._check_tier(changes.tier)
        if changes.limits is not None:
            team.limits.CopyFrom(
                _patched_limits(Limits.from_proto(team.limits), changes.limits, "limits").to_proto()
            )
        if changes.budgets is not None:
            team.budgets.CopyFrom(
                _patched_budgets(
                    Budgets.from_proto(team.budgets), changes.budgets, "budgets"
                ).to_proto()
            )
        if changes.end_user_limits is not None:
            team.end_user_limits.CopyFrom(
                _patched_limits(
                    Limits.from_proto(team.end_user_limits),
                    changes.end_user_limits,
                    "end_user_limits",
                ).to_proto()
            )
        if changes.end_user_budgets is not None:
            team.end_user_budgets.CopyFrom(
                _patched_budgets(
                    Budgets.from_proto(team.end_user_budgets),
                    changes.end_user_budgets,
                    "end_user_budgets",
                ).to_proto()
            )
        if changes.alert_webhook_url is not None:
            team.alert_webhook_url = changes.alert_webhook_url
        if changes.metadata is not None:
            team.metadata.clear()
            team.metadata.update(check_metadata(changes.metadata, "metadata"))
        if changes.disabled is not None:
            team.disabled = changes.disabled
        await self.teams.update(team, current)
        self._record(caller, "team.update", team.team_id, team.team_id, trace_id)
        return team

    # --- keys ------------------------------------------------------------------------

    async def _team_for_keys(self, caller: Caller, team_id: str) -> tenancy_pb2.Team:
        self._admin(caller)
        team = await self.teams.get(team_id) if self._may_see_team(caller, team_id) else None
        if team is None:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                f"There is no team '{team_id[:64]}'; create it first (sluice teams create).",
                param="team_id",
            )
        return team

    async def _key(self, caller: Caller, key_id: str) -> keys_pb2.ApiKeyRecord:
        self._admin(caller)
        record = await self.keys.get(key_id) if ID_PATTERN.match(key_id) else None
        if record is None or not self._may_see_team(caller, record.team_id):
            raise _not_found("key", key_id)
        return record

    async def create_key(self, caller: Caller, spec: KeySpec, trace_id: str) -> IssuedKey:
        team = await self._team_for_keys(caller, spec.team_id)
        name = spec.name.strip()
        if not name or len(name) > 128:
            raise _invalid("A key needs a name of 1-128 characters.", "name")
        if spec.on_budget_exhausted not in BUDGET_POLICIES:
            raise _invalid("on_budget_exhausted is 'finish' or 'cut'.", "on_budget_exhausted")
        if spec.expires_unix and spec.expires_unix <= self.clock():
            raise _invalid("The expiry must be in the future.", "expires_at")
        for param, value in (("limits", spec.limits), ("budgets", spec.budgets)):
            if any(v < 0 for v in value.__dict__.values()):
                raise _invalid(f"{param} cannot be below zero.", param)
        version = (
            self.versions.resolve(spec.api_version, "api_version")
            if spec.api_version
            else self.versions.current
        )
        secret = new_secret()
        record = keys_pb2.ApiKeyRecord(
            key_id=new_key_id(),
            secret_sha256=sha256_hex(secret),
            team_id=team.team_id,
            name=name,
            scopes=_check_scopes(spec.scopes, is_operator(caller.key)),
            created_unix=int(self.clock()),
            limits=spec.limits.to_proto(),
            budgets=spec.budgets.to_proto(),
            model_allow=_check_models(spec.model_allow),
            expires_unix=spec.expires_unix,
            metadata=check_metadata(spec.metadata, "metadata"),
            audit_prompts=spec.audit_prompts,
            on_budget_exhausted=spec.on_budget_exhausted,
            secret_prefix=secret[:SECRET_PREFIX_CHARS],
            api_version=version.name,
        )
        await self.keys.create(record)
        self._record(
            caller,
            "key.create",
            team.team_id,
            record.key_id,
            trace_id,
            key_id=record.key_id,
            name=name,
        )
        return IssuedKey(secret, record)

    async def key(self, caller: Caller, key_id: str) -> keys_pb2.ApiKeyRecord:
        return await self._key(caller, key_id)

    async def list_keys(self, caller: Caller, team_id: str | None) -> list[keys_pb2.ApiKeyRecord]:
        self._admin(caller)
        if not is_operator(caller.key):
            if team_id and team_id != caller.key.team_id:
                return []
            team_id = caller.key.team_id
        records = await self.keys.list(team_id)
        return sorted(records, key=lambda r: (r.team_id, r.created_unix, r.key_id))

    async def update_key(
        self, caller: Caller, key_id: str, changes: KeyChanges, trace_id: str
    ) -> keys_pb2.ApiKeyRecord:
        current = await self._key(caller, key_id)
        if current.revoked_unix:
            raise SluiceError(ErrorCode.CONFLICT, f"The key '{key_id}' is revoked.")
        record = keys_pb2.ApiKeyRecord()
        record.CopyFrom(current)
        if changes.scopes is not None:
            del record.scopes[:]
            record.scopes.extend(_check_scopes(changes.scopes, is_operator(caller.key)))
        if changes.model_allow is not None:
            del record.model_allow[:]
            record.model_allow.extend(_check_models(changes.model_allow))
        if changes.limits is not None:
            record.limits.CopyFrom(
                _patched_limits(
                    Limits.from_proto(record.limits), changes.limits, "limits"
                ).to_proto()
            )
        if changes.budgets is not None:
            record.budgets.CopyFrom(
                _patched_budgets(
                    Budgets.from_proto(record.budgets), changes.budgets, "budgets"
                ).to_proto()
            )
        if changes.expires_unix is not None:
            if changes.expires_unix and changes.expires_unix <= self.clock():
                raise _invalid("The expiry must be in the future (0: never).", "expires_at")
            record.expires_unix = changes.expires_unix
        if changes.metadata is not None:
            record.metadata.clear()
            record.metadata.update(check_metadata(changes.metadata, "metadata"))
        if changes.audit_prompts is not None:
            record.audit_prompts = changes.audit_prompts
        if changes.on_budget_exhausted is not None:
            if changes.on_budget_exhausted not in BUDGET_POLICIES:
                raise _invalid("on_budget_exhausted is 'finish' or 'cut'.", "on_budget_exhausted")
            record.on_budget_exhausted = changes.on_budget_exhausted
        if changes.api_version is not None:
            record.api_version = self.versions.resolve(changes.api_version, "api_version").name
        await self.keys.put(record)
        self._record(caller, "key.update", record.team_id, key_id, trace_id, key_id=key_id)
        return record

    async def rotate_key(
        self, caller: Caller, key_id: str, grace_seconds: int, trace_id: str
    ) -> IssuedKey:
        """A new key with the same team, scopes, models, limits and policies; the old
        one keeps working for ``grace_seconds`` (0: it stops now), then stops."""
        current = await self._key(caller, key_id)
        if current.revoked_unix or current.replaced_by:
            raise SluiceError(
                ErrorCode.CONFLICT,
                f"The key '{key_id}' was already "
                f"{'revoked' if current.revoked_unix else 'rotated'}.",
            )
        if grace_seconds < 0:
            raise _invalid("The grace period cannot be below zero.", "grace_seconds")
        now = self.clock()
        secret = new_secret()
        fresh = keys_pb2.ApiKeyRecord()
        fresh.CopyFrom(current)
        fresh.key_id = new_key_id()
        fresh.secret_sha256 = sha256_hex(secret)
        fresh.secret_prefix = secret[:SECRET_PREFIX_CHARS]
        fresh.created_unix = int(now)
        fresh.metadata["rotated_from"] = key_id
        old = keys_pb2.ApiKeyRecord()
        old.CopyFrom(current)
        old.replaced_by = fresh.key_id
        # A grace of 0 ends it at once: the instant is already past at the next request.
        old.grace_until_unix = int(now + grace_seconds) if grace_seconds else int(now) - 1
        # The new key takes the name over from the old one.
        await self.keys.create(fresh, claim_name=False)
        await self.keys.move_name(fresh)
        await self.keys.put(old)
        self._record(
            caller,
            "key.rotate",
            current.team_id,
            key_id,
            trace_id,
            key_id=key_id,
            replaced_by=fresh.key_id,
            grace_seconds=str(grace_seconds),
        )
        return IssuedKey(secret, fresh)

    async def revoke_key(self, caller: Caller, key_id: str, trace_id: str) -> keys_pb2.ApiKeyRecord:
        current = await self._key(caller, key_id)
        if current.revoked_unix:
            return current
        record = keys_pb2.ApiKeyRecord()
        record.CopyFrom(current)
        record.revoked_unix = int(self.clock())
        record.disabled = True
        await self.keys.put(record)
        await self.keys.release_name(record)
        self._record(caller, "key.revoke", record.team_id, key_id, trace_id, key_id=key_id)
        return record

    # --- audit -----------------------------------------------------------------------

    async def audit(self, caller: Caller, query: AuditQuery) -> AuditPage:
        """An operator reads every team's records; a team's admin its team's only."""
        self._admin(caller)
        if query.team_id and not (
            ID_PATTERN.match(query.team_id) or query.team_id == audit.NO_TEAM
        ):
            raise _invalid("team_id is not a team id.", "team_id")
        if not is_operator(caller.key):
            if query.team_id and query.team_id != caller.key.team_id:
                return AuditPage()
            query = replace(query, team_id=caller.key.team_id)
        return await self.audit_log.query(query)
