"""Per request: the team of the caller's key and its tier, into the entitlements the
limiter gets on the reservation."""

from __future__ import annotations

from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.tenancy.policy import Entitlements, entitlements
from services.gateway.domain.tenancy.ports import TeamLookup
from services.gateway.domain.tenancy.tiers import TierTable


class Tenancy:
    def __init__(self, teams: TeamLookup, tiers: TierTable) -> None:
        self.teams = teams
        self.tiers = tiers

    async def entitlements(
        self, key: keys_pb2.ApiKeyRecord, *, end_user: str, priority: PriorityClass
    ) -> Entitlements:
        # Keys outside any stored team (the dev key, keys made before teams) have their
        # own rates only.
        team = await self.teams.get(key.team_id) if key.team_id else None
        # The client names its end user: bounded, so it cannot bloat every reservation.
        end_user = end_user[:256]
        tier = self.tiers.get(team.tier) if team is not None else None
        return entitlements(key, team, tier, end_user=end_user, priority=priority)

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
