"""Teams in the ``sluice_teams`` bucket, one record per team id; read through a cache
that every replica drops an entry of as soon as any replica changes the team."""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES, Bus
from sluice.errors import ErrorCode, SluiceError
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Buckets

from services.gateway.adapters.watched import WatchedCache
from services.gateway.domain.problems import unavailable

_UNAVAILABLE = "The team store did not answer."


class KvTeamStore:
    def __init__(self, kv: KeyValue, bus: Bus, ttl: float = 30.0) -> None:
        self._kv = kv
        self._bus = bus
        self.cache: WatchedCache[tenancy_pb2.Team] = WatchedCache(bus, Buckets.TEAMS, ttl=ttl)

    async def start(self) -> None:
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()

    async def _read(self, team_id: str) -> tuple[tenancy_pb2.Team, int] | None:
        try:
            entry = await self._kv.get(team_id)
        except KeyNotFoundError:
            return None
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        team = tenancy_pb2.Team()
        try:
            team.ParseFromString(entry.value or b"")
        except DecodeError:
            return None
        return team, int(entry.revision or 0)

    async def get(self, team_id: str) -> tenancy_pb2.Team | None:
        found, team = self.cache.lookup(team_id)
        if found:
            return team
        generation = self.cache.generation
        read = await self._read(team_id)
        team = read[0] if read is not None else None
        # Absences are cached too: team ids come from stored keys, not from clients.
        self.cache.put(team_id, team, generation)
        return team

    async def create(self, team: tenancy_pb2.Team) -> None:
        try:
            await self._kv.create(team.team_id, team.SerializeToString())
        except KeyWrongLastSequenceError:
            raise SluiceError(
                ErrorCode.CONFLICT, f"The team '{team.team_id}' exists already.", param="team_id"
            ) from None
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        self.cache.drop(team.team_id)

    async def update(self, team: tenancy_pb2.Team, expected: tenancy_pb2.Team) -> None:
        read = await self._read(team.team_id)
        if read is None or read[0] != expected:
            raise SluiceError(
                ErrorCode.CONFLICT,
                f"The team '{team.team_id}' changed meanwhile; read it again and retry.",
            )
        try:
            await self._kv.update(team.team_id, team.SerializeToString(), last=read[1])
        except KeyWrongLastSequenceError:
            raise SluiceError(
                ErrorCode.CONFLICT,
                f"The team '{team.team_id}' changed meanwhile; read it again and retry.",
            ) from None
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        self.cache.drop(team.team_id)

    async def list(self) -> list[tenancy_pb2.Team]:
        prefix = Buckets.TEAMS.key_subject("")
        try:
            subjects = await self._bus.stream_subjects(Buckets.TEAMS.stream_name, prefix + ">")
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        found = await asyncio.gather(*(self._read(s[len(prefix) :]) for s in subjects))
        return [f[0] for f in found if f is not None]
