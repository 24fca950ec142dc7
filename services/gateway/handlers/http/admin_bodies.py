"""The admin API's bodies (pydantic, validated after the caller is known) and how teams,
keys and audit records are shown (never a secret or its hash: a key's secret appears
once, in the answer that created it)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field
from sluice.keys.v1 import keys_pb2
from sluice.tenancy.v1 import tenancy_pb2

from services.gateway.domain.tenancy.admin import (
    KeyChanges,
    KeySpec,
    TeamChanges,
    TeamSpec,
)
from services.gateway.domain.tenancy.limits import (
    BUDGET_FIELDS,
    Budgets,
    Limits,
    usd_to_nanos,
)
from services.gateway.domain.tenancy.policy import end_user_allowance, team_allowance
from services.gateway.domain.tenancy.tiers import Tier
from services.gateway.domain.versions import VERSIONS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsBody(_Strict):
    """0 or absent: not set at this level."""

    requests_per_minute: int | None = Field(default=None, ge=0)
    input_tokens_per_minute: int | None = Field(default=None, ge=0)
    output_tokens_per_minute: int | None = Field(default=None, ge=0)
    concurrent_requests: int | None = Field(default=None, ge=0)

    def given(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def limits(self) -> Limits:
        return Limits(**self.given())


class BudgetsBody(_Strict):
    """USD per UTC day or month (up to 9 decimals); 0 or absent: no budget here."""

    usd_per_day: Decimal | None = Field(default=None, ge=0, decimal_places=9)
    usd_per_month: Decimal | None = Field(default=None, ge=0, decimal_places=9)

    def given(self) -> dict[str, int]:
        return {
            BUDGET_FIELDS[k]: usd_to_nanos(v) for k, v in self.model_dump().items() if v is not None
        }

    def budgets(self) -> Budgets:
        return Budgets(**self.given())


Metadata = dict[str, str]


class TeamCreateBody(_Strict):
    team_id: str = Field(min_length=1, max_length=63)
    name: str = Field(default="", max_length=128)
    # A tier of config/tiers.yaml; empty: its default_tier.
    tier: str = ""
    limits: LimitsBody = LimitsBody()
    budgets: BudgetsBody = BudgetsBody()
    end_user_limits: LimitsBody = LimitsBody()
    end_user_budgets: BudgetsBody = BudgetsBody()
    alert_webhook_url: str = Field(default="", max_length=2048)
    metadata: Metadata = Field(default_factory=dict)

    def spec(self) -> TeamSpec:
        return TeamSpec(
            team_id=self.team_id,
            name=self.name,
            tier=self.tier,
            limits=self.limits.limits(),
            budgets=self.budgets.budgets(),
            end_user_limits=self.end_user_limits.limits(),
            end_user_budgets=self.end_user_budgets.budgets(),
            alert_webhook_url=self.alert_webhook_url,
            metadata=self.metadata,
        )


class TeamUpdateBody(_Strict):
    """Only what is given changes; limits and budgets field by field."""

    name: str | None = Field(default=None, max_length=128)
    tier: str | None = None
    limits: LimitsBody | None = None
    budgets: BudgetsBody | None = None
    end_user_limits: LimitsBody | None = None
    end_user_budgets: BudgetsBody | None = None
    alert_webhook_url: str | None = Field(default=None, max_length=2048)
    metadata: Metadata | None = None
    disabled: bool | None = None

    def changes(self) -> TeamChanges:
        return TeamChanges(
            name=self.name,
            tier=self.tier,
            limits=self.limits.given() if self.limits else None,
            budgets=self.budgets.given() if self.budgets else None,
            end_user_limits=self.end_user_limits.given() if self.end_user_limits else None,
            end_user_budgets=self.end_user_budgets.given() if self.end_user_budgets else None,
            alert_webhook_url=self.alert_webhook_url,
            metadata=self.metadata,
            disabled=self.disabled,
        )


def _expiry(at: datetime | None, seconds: int | None, now: float) -> int | None:
    if at is not None:
        return int(at.timestamp())
    if seconds is not None:
        return int(now) + seconds if seconds else 0
    return None


class KeyCreateBody(_Strict):
    team_id: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=128)
    scopes: list[str] = Field(default_factory=lambda: ["chat"], max_length=16)
    # Model names or globs (fnmatch: "gpt-4o*"); empty: every model served.
    model_allow: list[str] = Field(default_factory=list, max_length=64)
    limits: LimitsBody = LimitsBody()
    budgets: BudgetsBody = BudgetsBody()
    # When the key stops working: a time, or seconds from now (neither: never).
    expires_at: datetime | None = None
    expires_in_seconds: int | None = Field(default=None, gt=0)
    metadata: Metadata = Field(default_factory=dict)
    # Audit records of this key's requests carry the request body.
    audit_prompts: bool = False
    on_budget_exhausted: Literal["finish", "cut"] = "finish"
    # The API version (YYYY-MM-DD) of its requests without a Sluice-Version header;
    # absent: the current version.
    api_version: str | None = Field(default=None, max_length=40)

    def spec(self, now: float) -> KeySpec:
        return KeySpec(
            team_id=self.team_id,
            name=self.name,
            scopes=tuple(self.scopes),
            model_allow=tuple(self.model_allow),
            limits=self.limits.limits(),
            budgets=self.budgets.budgets(),
            expires_unix=_expiry(self.expires_at, self.expires_in_seconds, now) or 0,
            metadata=self.metadata,
            audit_prompts=self.audit_prompts,
            on_budget_exhausted=self.on_budget_exhausted,
            api_version=self.api_version or "",
        )


class KeyUpdateBody(_Strict):
    scopes: list[str] | None = Field(default=None, max_length=16)
    model_allow: list[str] | None = Field(default=None, max_length=64)
    limits: LimitsBody | None = None
    budgets: BudgetsBody | None = None
    expires_at: datetime | None = None
    # 0: never expires.
    expires_in_seconds: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    audit_prompts: bool | None = None
    on_budget_exhausted: Literal["finish", "cut"] | None = None
    api_version: str | None = Field(default=None, max_length=40)

    def changes(self, now: float) -> KeyChanges:
        return KeyChanges(
            scopes=tuple(self.scopes) if self.scopes is not None else None,
            model_allow=tuple(self.model_allow) if self.model_allow is not None else None,
            limits=self.limits.given() if self.limits else None,
            budgets=self.budgets.given() if self.budgets else None,
            expires_unix=_expiry(self.expires_at, self.expires_in_seconds, now),
            metadata=self.metadata,
            audit_prompts=self.audit_prompts,
            on_budget_exhausted=self.on_budget_exhausted,
            api_version=self.api_version,
        )


class KeyRotateBody(_Strict):
    # How long the old key keeps working beside the new one (0: it stops now).
    grace_seconds: int = Field(default=3600, ge=0, le=30 * 24 * 3600)


def _iso(unix: int) -> str | None:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z") if unix else None


def team_view(team: tenancy_pb2.Team) -> dict[str, Any]:
    return {
        "object": "team",
        "team_id": team.team_id,
        "name": team.name,
        "tier": team.tier,
        "limits": Limits.from_proto(team.limits).as_dict(),
        "budgets": Budgets.from_proto(team.budgets).as_dict(),
        "end_user_limits": Limits.from_proto(team.end_user_limits).as_dict(),
        "end_user_budgets": Budgets.from_proto(team.end_user_budgets).as_dict(),
        "alert_webhook_url": team.alert_webhook_url,
        "metadata": dict(team.metadata),
        "created_at": _iso(team.created_unix),
        "disabled": team.disabled,
    }


def effective_view(team: tenancy_pb2.Team, tier: Tier | None) -> dict[str, Any]:
    """What applies to the team and to each of its end users: its own values over its
    tier's defaults."""
    team_level = team_allowance(team, tier)
    user_level = end_user_allowance(team, tier)
    return {
        "limits": team_level.limits.as_dict(),
        "budgets": team_level.budgets.as_dict(),
        "end_user_limits": user_level.limits.as_dict(),
        "end_user_budgets": user_level.budgets.as_dict(),
        "priorities": sorted(str(p) for p in tier.priorities) if tier else [],
    }


def key_status(key: keys_pb2.ApiKeyRecord, now: float) -> str:
    if key.revoked_unix:
        return "revoked"
    if key.expires_unix and now >= key.expires_unix:
        return "expired"
    if key.replaced_by:
        return "rotating" if key.grace_until_unix > now else "rotated"
    return "disabled" if key.disabled else "active"


def key_view(key: keys_pb2.ApiKeyRecord, now: float) -> dict[str, Any]:
    return {
        "object": "key",
        "key_id": key.key_id,
        "name": key.name,
        "team_id": key.team_id,
        "status": key_status(key, now),
        "secret_prefix": key.secret_prefix,
        "scopes": list(key.scopes),
        "model_allow": list(key.model_allow),
        "limits": Limits.from_proto(key.limits).as_dict(),
        "budgets": Budgets.from_proto(key.budgets).as_dict(),
        "created_at": _iso(key.created_unix),
        "expires_at": _iso(key.expires_unix),
        "replaced_by": key.replaced_by or None,
        "grace_until": _iso(key.grace_until_unix) if key.replaced_by else None,
        "revoked_at": _iso(key.revoked_unix),
        "metadata": dict(key.metadata),
        "audit_prompts": key.audit_prompts,
        "on_budget_exhausted": key.on_budget_exhausted or "finish",
        "api_version": key.api_version or VERSIONS.first.name,
    }


def audit_view(cursor: int, event: tenancy_pb2.AuditEvent) -> dict[str, Any]:
    view = MessageToDict(event, preserving_proto_field_name=True)
    # Counts as JSON numbers (protobuf's JSON mapping writes 64-bit integers as text).
    for name in ("at_unix_nanos", "cost_usd_nanos"):
        if name in view:
            view[name] = int(view[name])
    if "usage" in view:
        view["usage"] = {k: int(v) for k, v in view["usage"].items()}
    view["object"] = "audit_event"
    view["cursor"] = cursor
    view["at"] = (
        datetime.fromtimestamp(event.at_unix_nanos / 1e9, UTC).isoformat().replace("+00:00", "Z")
    )
    return view
