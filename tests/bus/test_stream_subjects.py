"""Listing a bucket's keys under a prefix from the server's subject index."""

from __future__ import annotations

import uuid

from sluice.bus import Bus
from sluice.topology import Buckets


async def test_lists_every_key_under_the_prefix_and_nothing_else(bus: Bus) -> None:
    kv = await bus.kv(Buckets.JOBS)
    team, other = uuid.uuid4().hex, uuid.uuid4().hex
    mine = [f"team.{team}.job_{i:04d}" for i in range(250)]
    for key in [*mine, f"team.{other}.job_0001", f"job.{team}"]:
        await kv.put(key, b"")
    prefix = Buckets.JOBS.key_subject(f"team.{team}.")
    subjects = await bus.stream_subjects(Buckets.JOBS.stream_name, prefix + ">")
    assert sorted(subjects) == [Buckets.JOBS.key_subject(k) for k in mine]


async def test_an_unknown_prefix_lists_nothing(bus: Bus) -> None:
    prefix = Buckets.JOBS.key_subject(f"team.{uuid.uuid4().hex}.")
    assert await bus.stream_subjects(Buckets.JOBS.stream_name, prefix + ">") == []
