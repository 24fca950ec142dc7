"""Who a caller is and what it may do: scopes, the model allow-list, a key's expiry,
rotation grace and revocation, and the limits and budgets that apply to one request at
each level (key, team, end user)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.tenancy.limits import Allowance, Budgets, Limits
from services.gateway.domain.tenancy.tiers import LimiterFailure, Tier


class Scope(StrEnum):
    CHAT = "chat"
    JOBS = "jobs"
    USAGE_READ = "usage:read"
    ADMIN = "admin"
    PRIORITY_SYSTEM = "priority:system"
    ALL = "*"


KNOWN_SCOPES = frozenset(Scope)
# The operators' own team: the admin key's. No team of that id can be created, and only
# its keys administer every team (an admin key of another team administers its own).
ADMIN_TEAM_ID = "admin"
ADMIN_KEY_ID = "admin"
RESERVED_TEAM_IDS = frozenset({ADMIN_TEAM_ID, "dev"})
# Team and key ids travel in NATS subjects and KV keys: one token of safe characters.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def has_scope(key: keys_pb2.ApiKeyRecord, scope: Scope) -> bool:
    return scope in key.scopes or Scope.ALL in key.scopes


def require_scope(key: keys_pb2.ApiKeyRecord, scope: Scope) -> None:
    """403 ``insufficient_scope`` naming the scope the route needs."""
    if not has_scope(key, scope):
        raise SluiceError(
            ErrorCode.INSUFFICIENT_SCOPE,
            f"This route needs the '{scope}' scope, which this key does not have.",
            details={"scope": str(scope), "key_scopes": list(key.scopes)},
        )


def is_operator(key: keys_pb2.ApiKeyRecord) -> bool:
    """An administrator of every team (the admin key), not only of its own."""
    return key.team_id == ADMIN_TEAM_ID and has_scope(key, Scope.ADMIN)


def model_allowed(key: keys_pb2.ApiKeyRecord, model: str) -> bool:
    if not key.model_allow:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in key.model_allow)


def check_model_allowed(key: keys_pb2.ApiKeyRecord, model: str) -> None:
    """403 ``model_not_allowed`` naming the model, for a key with an allow-list."""
    if not model_allowed(key, model):
        raise SluiceError(
            ErrorCode.MODEL_NOT_ALLOWED,
            f"This key may not use the model '{model[:100]}'.",
            param="model",
            details={"model": model[:100], "allowed": list(key.model_allow)},
        )


def check_usable(key: keys_pb2.ApiKeyRecord, now_unix: float) -> None:
    """401 for a key that was revoked, disabled, is past its expiry, or was rotated and
    is past its grace; saying which, so the owner knows what to do."""
    if key.revoked_unix:
        raise SluiceError(ErrorCode.UNAUTHORIZED, "This API key was revoked.")
    if key.disabled:
        raise SluiceError(ErrorCode.UNAUTHORIZED, "This API key is disabled.")
    if key.expires_unix and now_unix >= key.expires_unix:
        raise SluiceError(
            ErrorCode.KEY_EXPIRED,
            "This API key expired.",
            details={"expired_unix": key.expires_unix},
        )
    if key.replaced_by and key.grace_until_unix and now_unix >= key.grace_until_unix:
        raise SluiceError(
            ErrorCode.KEY_EXPIRED,
            "This API key was rotated and its grace period is over: use the new key.",
            details={"replaced_by": key.replaced_by, "grace_until_unix": key.grace_until_unix},
        )


@dataclass(frozen=True)
class Caller:
    """Who sent a request: an API key's record (for a JWT, a record made from its
    claims), the actor the audit trail names, and the end user the token vouches for."""

    key: keys_pb2.ApiKeyRecord
    actor: str
    end_user: str = ""
    via: str = "key"


def team_allowance(team: tenancy_pb2.Team, tier: Tier | None) -> Allowance:
    own = Allowance(Limits.from_proto(team.limits), Budgets.from_proto(team.budgets))
    return own.over(tier.team) if tier is not None else own


def end_user_allowance(team: tenancy_pb2.Team, tier: Tier | None) -> Allowance:
    own = Allowance(
        Limits.from_proto(team.end_user_limits), Budgets.from_proto(team.end_user_budgets)
    )
    return own.over(tier.end_user) if tier is not None else own


@dataclass(frozen=True)
class Entitlements:
    """What one request may use and spend at each level, as the limiter gets it."""

    key: Allowance
    team: Allowance
    end_user_id: str
    end_user: Allowance
    priority: PriorityClass
    # What the request gets while the limiter does not answer (the tier's choice).
    limiter_failure: LimiterFailure = LimiterFailure.FAIL_CLOSED
    # The tier's share of each limit for batch work (0: the limiter's setting).
    batch_share: float = 0.0

    @cached_property
    def _levels(self) -> limiter_pb2.ReserveRequest:
        """The levels as reservation fields, built once: a request merges them in."""
        return limiter_pb2.ReserveRequest(
            key_limits=self.key.limits.to_proto(),
            key_budgets=self.key.budgets.to_proto(),
            team_limits=self.team.limits.to_proto(),
            team_budgets=self.team.budgets.to_proto(),
            end_user=self.end_user_id,
            end_user_limits=self.end_user.limits.to_proto(),
            end_user_budgets=self.end_user.budgets.to_proto(),
            priority=str(self.priority),
            batch_share=self.batch_share,
        )

    def fill(self, reserve: limiter_pb2.ReserveRequest) -> None:
        """Put the levels on a reservation that has none yet."""
        reserve.MergeFrom(self._levels)


def entitlements(
    key: keys_pb2.ApiKeyRecord,
    team: tenancy_pb2.Team | None,
    tier: Tier | None,
    *,
    end_user: str,
    priority: PriorityClass,
) -> Entitlements:
    """Resolve the levels of one request: the team's own values over its tier's, the
    key's over its team's, the end user's (when the request names one) from the team's
    end-user values over the tier's. Refuses a disabled team and a priority class the
    tier does not offer."""
    if team is not None and team.disabled:
        raise SluiceError(
            ErrorCode.FORBIDDEN,
            f"The team '{team.team_id}' is disabled.",
            details={"team_id": team.team_id},
        )
    if tier is not None and priority not in tier.priorities:
        raise SluiceError(
            ErrorCode.FORBIDDEN,
            f"The '{tier.name}' tier does not offer the '{priority}' priority class.",
            param="x-sluice-priority",
            details={"tier": tier.name, "allowed": sorted(str(p) for p in tier.priorities)},
        )
    team_level = team_allowance(team, tier) if team is not None else Allowance()
    own = Allowance(Limits.from_proto(key.limits), Budgets.from_proto(key.budgets))
    user_level = Allowance()
    if end_user and team is not None:
        user_level = end_user_allowance(team, tier)
    return Entitlements(
        key=own.over(team_level),
        team=team_level,
        end_user_id=end_user,
        end_user=user_level,
        priority=priority,
        limiter_failure=tier.limiter_failure if tier is not None else LimiterFailure.FAIL_CLOSED,
        batch_share=tier.batch_share if tier is not None else 0.0,
    )
