"""The budgets of keys and teams, as the key and team records in KV hold them, kept in
memory from each bucket's stream: every record from the first, then each change as it
is stored (``Bus.follow``, an ordered consumer; nothing acked, nothing left behind).

Key records are stored under the SHA-256 of their secret (beside the gateway's index
entries, ``id.``, ``team.``, ``name.``, which are skipped), so the key budgets are
indexed by the ``key_id`` inside each record (the hash only to forget a deleted
record); teams by the ``team_id`` inside theirs, whatever the bucket's key layout.
Nothing else of a record is kept. Until a bucket's history has been read, a budget is
unknown and no alert is due for it; the check reads the spend, not the events, so the
next batch of that key or team raises what was due.
"""

from __future__ import annotations

import logging
import re

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sluice.bus import Bus
from sluice.keys.v1 import keys_pb2
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import Buckets, BucketSpec

from services.cost_tracker.domain.alerts import Budgets, TeamPolicy

log = logging.getLogger(__name__)

_DELETES = ("DEL", "PURGE")
# A key record's entry: the SHA-256 of its secret, in hex.
_RECORD_ENTRY = re.compile(r"[0-9a-f]{64}")


def _budgets(b: tenancy_pb2.Budgets) -> Budgets:
    return Budgets(per_day=max(0, b.usd_nanos_per_day), per_month=max(0, b.usd_nanos_per_month))


class KvBudgetDirectory:
    def __init__(self) -> None:
        self._keys: dict[str, Budgets] = {}
        self._key_of_entry: dict[str, str] = {}
        self._teams: dict[str, TeamPolicy] = {}
        self._team_of_entry: dict[str, str] = {}
        self._subs: list[Subscription] = []
        self._bus: Bus | None = None

    # --- BudgetDirectory --------------------------------------------------------------

    def key_budgets(self, key_id: str) -> Budgets | None:
        return self._keys.get(key_id)

    def team(self, team_id: str) -> TeamPolicy | None:
        return self._teams.get(team_id)

    # --- following the buckets --------------------------------------------------------

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        for bucket, cb in ((Buckets.API_KEYS, self._on_key), (Buckets.TEAMS, self._on_team)):
            await bus.kv(bucket)  # the bucket's stream exists before it is followed
            self._subs.append(await bus.follow(_all_keys(bucket), bucket.stream_name, cb))

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await Bus.unsubscribe(sub)

    async def _on_key(self, msg: Msg) -> None:
        entry = msg.subject.split(".", 2)[-1]
        if not _RECORD_ENTRY.fullmatch(entry):
            return  # an index entry of the gateway's, not a key record
        if _deleted(msg):
            key_id = self._key_of_entry.pop(entry, None)
            if key_id is not None:
                self._keys.pop(key_id, None)
            return
        record = keys_pb2.ApiKeyRecord()
        try:
            record.ParseFromString(msg.data or b"")
        except DecodeError:
            log.warning("key record %s does not decode; its budgets are ignored", entry[:8])
            return
        if record.key_id:
            self._key_of_entry[entry] = record.key_id
            self._keys[record.key_id] = _budgets(record.budgets)

    async def _on_team(self, msg: Msg) -> None:
        entry = msg.subject.split(".", 2)[-1]
        if _deleted(msg):
            team_id = self._team_of_entry.pop(entry, None)
            if team_id is not None:
                self._teams.pop(team_id, None)
            return
        record = tenancy_pb2.Team()
        try:
            record.ParseFromString(msg.data or b"")
        except DecodeError:
            log.warning("team record %r does not decode; its budgets are ignored", entry)
            return
        if record.team_id:
            self._team_of_entry[entry] = record.team_id
            self._teams[record.team_id] = TeamPolicy(
                _budgets(record.budgets), record.alert_webhook_url
            )


def _all_keys(bucket: BucketSpec) -> str:
    return bucket.key_subject(">")


def _deleted(msg: Msg) -> bool:
    return bool(msg.headers) and (msg.headers or {}).get("KV-Operation") in _DELETES
