"""``GET /v1/usage``: where the money goes. The query's parameters (validated here, so a
bad one is a 400 naming it before anything is asked), who may read what, and the
answer's JSON.

**Who reads what.** A key reads its own team's usage. A key of the operators' team
(``admin``) with the ``usage:read`` scope reads every team's, or one team's with
``team_id``; ``usage:read`` on any other team's key (``*`` included, the dev key's)
reads only that team. Asking for another team without that is 403, whether the team
exists or not; the team filter is set here, before the query leaves the gateway, so the
ledger never returns another team's rows to such a key.

**Money** is exact: every amount is given in nano-USD (integers, ``*_usd_nanos``) and
as a decimal string of USD (``*_usd``), never as a float.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sluice.cost.v1 import cost_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.pricing import nanos_to_usd

from services.gateway.domain.dialects.parsing import validation_problem
from services.gateway.domain.tenancy.policy import ADMIN_TEAM_ID, Scope, has_scope

USAGE_READ_SCOPE = Scope.USAGE_READ

DIMENSIONS: dict[str, int] = {
    "key": cost_pb2.USAGE_DIMENSION_KEY,
    "team": cost_pb2.USAGE_DIMENSION_TEAM,
    "end_user": cost_pb2.USAGE_DIMENSION_END_USER,
    "model": cost_pb2.USAGE_DIMENSION_MODEL,
    "provider": cost_pb2.USAGE_DIMENSION_PROVIDER,
    "tag": cost_pb2.USAGE_DIMENSION_TAG,
    "day": cost_pb2.USAGE_DIMENSION_DAY,
    "hour": cost_pb2.USAGE_DIMENSION_HOUR,
}
_NAME_OF = {v: k for k, v in DIMENSIONS.items()}
# The row fields of each text dimension.
_FIELDS = {
    "key": "key_id",
    "team": "team_id",
    "end_user": "end_user",
    "model": "model",
    "provider": "provider",
    "tag": "tag",
}
DEFAULT_GROUP_BY = ("key", "model")
MAX_LIMIT = 10_000


class UsageLedger(Protocol):
    async def query(self, query: cost_pb2.UsageQuery) -> cost_pb2.UsageSummary:
        """The cost-tracker's answer; raises ``SluiceError`` (its problem, or
        ``service_unavailable`` when no cost-tracker answers)."""
        ...


def _instant(value: datetime | None, field: str) -> int:
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    nanos = int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000
    if nanos < 0:
        raise ValueError(f"{field} must be after 1970-01-01")
    return nanos


class UsageParams(BaseModel):
    """The query string of ``GET /v1/usage``."""

    model_config = ConfigDict(extra="forbid", str_max_length=256)

    # RFC 3339 times or dates (a date is its UTC midnight; a time without an offset is
    # UTC); since inclusive, until exclusive. Neither: all the ledger holds.
    since: datetime | None = None
    until: datetime | None = None
    group_by: list[str] = Field(default_factory=lambda: list(DEFAULT_GROUP_BY))
    key_id: str = ""
    team_id: str = ""
    model: str = ""
    provider: str = ""
    end_user: str = ""
    tag: str = ""
    limit: int = Field(default=1000, ge=1, le=MAX_LIMIT)

    @field_validator("group_by", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            parts = [p.strip() for v in value for p in str(v).split(",")]
            return [p for p in parts if p]
        return value

    @field_validator("group_by")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown dimension(s); use {', '.join(DIMENSIONS)}")
        if len(set(value)) != len(value):
            raise ValueError("a dimension is named twice")
        if "day" in value and "hour" in value:
            raise ValueError("group by day or by hour, not both")
        return value

    def range_nanos(self) -> tuple[int, int]:
        since = _instant(self.since, "since")
        until = _instant(self.until, "until")
        if until and since >= until:
            raise SluiceError(
                ErrorCode.INVALID_REQUEST,
                "since must be before until.",
                param="since",
                details={"errors": [{"loc": "since", "type": "value_error", "msg": "after until"}]},
            )
        return since, until


def parse_params(query: dict[str, list[str]]) -> UsageParams:
    """The query string (every value of each parameter) as ``UsageParams``, or a 400
    naming the parameter."""
    data: dict[str, Any] = {}
    for name, values in query.items():
        data[name] = values if name == "group_by" else values[-1]
    try:
        params = UsageParams.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc) from None
    for name in ("since", "until"):
        try:
            _instant(getattr(params, name), name)
        except ValueError as exc:
            raise SluiceError(ErrorCode.INVALID_REQUEST, f"{exc}.", param=name) from None
    return params


def may_read_every_team(key: keys_pb2.ApiKeyRecord) -> bool:
    """An operators' key (the admin team's) with ``usage:read``."""
    return key.team_id == ADMIN_TEAM_ID and has_scope(key, Scope.USAGE_READ)


def to_query(key: keys_pb2.ApiKeyRecord, params: UsageParams) -> cost_pb2.UsageQuery:
    """The ledger query this key may make: its own team's, unless it may read all."""
    team = params.team_id
    if not may_read_every_team(key):
        if team and team != key.team_id:
            raise SluiceError(
                ErrorCode.FORBIDDEN,
                f"This key reads its own team's usage only; another team's needs a key "
                f"of the '{ADMIN_TEAM_ID}' team with the '{USAGE_READ_SCOPE}' scope.",
                param="team_id",
            )
        team = key.team_id
    since, until = params.range_nanos()
    return cost_pb2.UsageQuery(
        key_id=params.key_id,
        team_id=team,
        model=params.model,
        provider=params.provider,
        end_user=params.end_user,
        tag=params.tag,
        since_unix_nanos=since,
        until_unix_nanos=until,
        group_by=[DIMENSIONS[d] for d in params.group_by],  # type: ignore[misc]
        limit=params.limit,
    )


def usd(nanos: int) -> str:
    """Exact USD as a decimal string (no float ever holds the amount)."""
    return format(nanos_to_usd(nanos).normalize(), "f") if nanos else "0"


def _iso(nanos: int, *, day: bool) -> str:
    moment = datetime.fromtimestamp(nanos // 1_000_000_000, tz=UTC)
    return moment.date().isoformat() if day else moment.isoformat().replace("+00:00", "Z")


def _amounts(requests: int, usage: Any, cost: int, saved: int, cache_hits: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_usd": usd(cost),
        "cost_usd_nanos": cost,
        "saved_usd": usd(saved),
        "saved_usd_nanos": saved,
        "cache_hits": cache_hits,
    }


def render(
    key: keys_pb2.ApiKeyRecord,
    query: cost_pb2.UsageQuery,
    summary: cost_pb2.UsageSummary,
) -> dict[str, Any]:
    dims = [_NAME_OF[d] for d in summary.group_by] or [_NAME_OF[d] for d in query.group_by]
    data = []
    for row in summary.rows:
        item: dict[str, Any] = {}
        for dim in dims:
            if dim in ("day", "hour"):
                item[dim] = _iso(row.period_start_unix_nanos, day=dim == "day")
            else:
                item[_FIELDS[dim]] = getattr(row, _FIELDS[dim])
        item.update(
            _amounts(
                row.requests, row.usage, row.cost_usd_nanos, row.saved_usd_nanos, row.cache_hits
            )
        )
        data.append(item)
    return {
        "object": "usage",
        "team_id": query.team_id or None,
        "since": _iso(query.since_unix_nanos, day=False) if query.since_unix_nanos else None,
        "until": _iso(query.until_unix_nanos, day=False) if query.until_unix_nanos else None,
        "group_by": dims,
        "totals": _amounts(
            summary.requests,
            summary.usage,
            summary.cost_usd_nanos,
            summary.saved_usd_nanos,
            summary.cache_hits,
        ),
        "data": data,
        "has_more": summary.truncated,
    }


class UsageReports:
    """``GET /v1/usage`` over the cost-tracker."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    async def report(self, key: keys_pb2.ApiKeyRecord, params: UsageParams) -> dict[str, Any]:
        query = to_query(key, params)
        return render(key, query, await self.ledger.query(query))
