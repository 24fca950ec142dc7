"""Job records in the ``sluice_jobs`` bucket: ``job.<id>`` holds the record, an empty
``team.<token>.<id>`` per job indexes a team's jobs for listing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sluice.bus import NATS_FAILURES, Bus
from sluice.jobs.v1 import jobs_pb2
from sluice.topology import Buckets

from services.gateway.domain.jobs.webhooks import team_token
from services.gateway.domain.problems import unavailable

_UNAVAILABLE = "The job store did not answer."


class KvJobStore:
    def __init__(self, kv: KeyValue, bus: Bus) -> None:
        self.kv = kv
        self.bus = bus

    @staticmethod
    def _key(job_id: str) -> str:
        return f"job.{job_id}"

    async def create(self, record: jobs_pb2.JobRecord) -> int:
        # Both writes in flight at once; an index entry whose record failed to be created
        # is skipped by listing.
        try:
            revision, _ = await asyncio.gather(
                self.kv.create(self._key(record.job_id), record.SerializeToString()),
                self.kv.put(f"team.{team_token(record.team_id)}.{record.job_id}", b""),
            )
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        return int(revision)

    async def update_if(self, record: jobs_pb2.JobRecord, revision: int) -> bool:
        try:
            await self.kv.update(
                self._key(record.job_id), record.SerializeToString(), last=revision
            )
        except KeyWrongLastSequenceError:
            return False
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        return True

    async def get(self, job_id: str) -> tuple[jobs_pb2.JobRecord, int] | None:
        try:
            entry = await self.kv.get(self._key(job_id))
        except KeyNotFoundError:
            return None
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        record = jobs_pb2.JobRecord()
        try:
            record.ParseFromString(entry.value or b"")
        except DecodeError:
            return None
        return record, int(entry.revision or 0)

    async def delete(self, job_id: str) -> None:
        with contextlib.suppress(KeyNotFoundError, *NATS_FAILURES):
            await self.kv.delete(self._key(job_id))

    async def mutate(
        self, job_id: str, change: Callable[[jobs_pb2.JobRecord], bool]
    ) -> jobs_pb2.JobRecord | None:
        for _ in range(20):
            found = await self.get(job_id)
            if found is None:
                return None
            record, revision = found
            if not change(record):
                return record
            if await self.update_if(record, revision):
                return record
            await asyncio.sleep(0.005)
        raise unavailable("The job record is changing too fast; retry.")

    async def team_job_ids(self, team_id: str) -> list[str]:
        """From the server's subject index of the bucket, not a KV watcher: nats-py's
        can end its initial replay before every key arrived (nats-io/nats.py#842) and
        list a team's jobs short."""
        prefix = Buckets.JOBS.key_subject(f"team.{team_token(team_id)}.")
        try:
            subjects = await self.bus.stream_subjects(Buckets.JOBS.stream_name, prefix + ">")
        except NATS_FAILURES:
            raise unavailable(_UNAVAILABLE) from None
        return sorted((s[len(prefix) :] for s in subjects if s.startswith(prefix)), reverse=True)
