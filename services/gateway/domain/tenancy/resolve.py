"""Per request: the team of the caller's key and its tier, into the entitlements the
limiter gets on the reservation."""

from __future__ import annotations

from dataclasses import dataclass

from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.tenancy.policy import Entitlements, entitlements
from services.gateway.domain.tenancy.ports import TeamLookup
from services.gateway.domain.tenancy.tiers import Tier, TierTable

# Entitlements kept for reuse, per key, end user and priority class (then started over).
MEMO_SIZE = 4096


class Tenancy:
    def __init__(self, teams: TeamLookup, tiers: TierTable) -> None:
        self.teams = teams
        self.tiers = tiers
        # The last entitlements resolved for a key, end user and class, with the very
        # records they were resolved from: the key and team caches hand out the same
        # object until it changes, so an identical record means identical levels.
        self._memo: dict[tuple[str, str, str], _Resolved] = {}

    async def entitlements(
        self, key: keys_pb2.ApiKeyRecord, *, end_user: str, priority: PriorityClass
    ) -> Entitlements:
        # Keys outside any stored team (the dev key, keys made before teams) have their
        # own rates only.
        team = await self.teams.get(key.team_id) if key.team_id else None
        # The client names its end user: bounded, so it cannot bloat every reservation.
        end_user = end_user[:256]
        tier = self.tiers.get(team.tier) if team is not None else None
        memo_key = (key.key_id, end_user, priority)
        known = self._memo.get(memo_key)
        if known is not None and known.key is key and known.team is team and known.tier is tier:
            return known.found
        found = entitlements(key, team, tier, end_user=end_user, priority=priority)
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[memo_key] = _Resolved(key, team, tier, found)
        return found

    async def tier_of(self, key: keys_pb2.ApiKeyRecord) -> str:
        """The tier of the key's team ('' for keys outside a stored team)."""
        team = await self.teams.get(key.team_id) if key.team_id else None
        if team is None:
            return ""
        return team.tier or self.tiers.default

    async def fill(
        self,
        reserve: limiter_pb2.ReserveRequest,
        key: keys_pb2.ApiKeyRecord,
        *,
        end_user: str,
        priority: PriorityClass,
    ) -> Entitlements:
        """Resolve the request's levels and put them on its reservation."""
        found = await self.entitlements(key, end_user=end_user, priority=priority)
        found.fill(reserve)
        return found


@dataclass(frozen=True, slots=True)
class _Resolved:
    key: keys_pb2.ApiKeyRecord
    team: tenancy_pb2.Team | None
    tier: Tier | None
    found: Entitlements
