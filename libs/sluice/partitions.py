"""Which limiter partition holds a request's state: the one place the gateway and the
limiter agree on it.

Everything one reservation is counted against (the key, its team, the team's end users)
must live in one partition, so that one owner decides with every level in view: the
partition is a hash of the team (of the key when it has none). Reservation ids begin
with their partition (``p<n>.``), so a release or a lease share finds its owner with
nothing but the id.
"""

from __future__ import annotations

import zlib

from sluice.topology import LIMITER_PARTITIONS


def partition_of(team_id: str, key_id: str, partitions: int = LIMITER_PARTITIONS) -> int:
    owner = team_id or key_id
    return zlib.crc32(owner.encode()) % partitions


def id_prefix(partition: int) -> str:
    """What a partition's reservation ids begin with."""
    return f"p{partition}."


def reservation_partition(reservation_id: str) -> int | None:
    """The partition a reservation id (or a lease share id) names; None for one made
    without partitions."""
    if not reservation_id.startswith("p"):
        return None
    head, dot, _ = reservation_id[1:].partition(".")
    if not dot or not head.isdigit():
        return None
    return int(head)
