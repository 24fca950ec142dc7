"""Token-aware admission: sliding windows of sub-buckets, reservations, reconciliation.

Algorithm: a sliding window made of fixed sub-buckets (1 s by default) per key and per
policy ("tpm" counts tokens, "rpm" counts requests). A reservation adds its amount to the
sub-bucket of the moment it was made; the window's usage is the sum of the live
sub-buckets. Chosen over GCRA/token bucket because:

- it enforces what the quota promises, "at most N per any 60 s", where a token bucket
  lets a key spend a full burst and then the refill, up to twice N in one minute;
- reconciliation is exact: the actual usage replaces the reserved amount in the very
  sub-bucket that holds it, so it ages out when the reservation would have, with no
  refund arithmetic on a continuous rate;
- ``remaining``, ``reset_ms`` and ``retry_after_ms`` read straight off the buckets, and
  the state is plain integers that snapshot and restore as they are.

A sub-bucket stays counted until the window plus the rest of its own sub-bucket has
passed: spend is held between 60 and 61 s (with 1 s sub-buckets), never less than the
window. The error is one sub-bucket, always on the conservative side.

Everything here is synchronous, allocation-light and free of I/O: the NATS handlers call
it on the event loop. Time is passed in as wall-clock milliseconds so that snapshots
remain meaningful across restarts; a clock that steps back is clamped to the newest
sub-bucket already seen.
"""

from __future__ import annotations

import itertools
import json
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sluice.leases import Share, parse_share

TPM = "tpm"
RPM = "rpm"

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class LimiterConfig:
    default_tokens_per_minute: int = 100_000
    default_requests_per_minute: int = 600
    window_ms: int = 60_000
    sub_bucket_ms: int = 1_000
    # Reservations without usage after this long are forgotten, keeping their full
    # reserved amount (see ``Limiter.expire``).
    reservation_ttl_ms: int = 600_000
    # Admission leases (see ``Limiter.reserve``): how long a holder may admit from one,
    # and the share of what a key has left that one lease may take (1/divisor).
    lease_ttl_ms: int = 2_000
    lease_divisor: int = 8

    def __post_init__(self) -> None:
        if self.sub_bucket_ms <= 0 or self.window_ms <= 0:
            raise ValueError("window and sub-bucket must be positive")
        if self.window_ms % self.sub_bucket_ms:
            raise ValueError("window_ms must be a multiple of sub_bucket_ms")
        if self.default_tokens_per_minute <= 0 or self.default_requests_per_minute <= 0:
            raise ValueError("default quotas must be positive")
        if self.lease_ttl_ms <= 0 or self.lease_divisor < 1:
            raise ValueError("lease TTL must be positive and the divisor at least 1")


@dataclass(slots=True)
class Window:
    """Amounts per sub-bucket index, oldest first, with their running total.

    Indices only ever grow (the limiter clamps the clock), so dict insertion order is
    age order and eviction pops from the front.
    """

    buckets: dict[int, int] = field(default_factory=dict)
    total: int = 0

    def evict(self, oldest_live: int) -> None:
        buckets = self.buckets
        while buckets:
            idx = next(iter(buckets))
            if idx >= oldest_live:
                return
            self.total -= buckets.pop(idx)

    def add(self, idx: int, amount: int) -> None:
        self.buckets[idx] = self.buckets.get(idx, 0) + amount
        self.total += amount

    def adjust(self, idx: int, delta: int) -> bool:
        """Change a live bucket by ``delta``; False when it has already aged out."""
        if idx not in self.buckets:
            return False
        self.buckets[idx] += delta
        self.total += delta
        return True


@dataclass(slots=True)
class KeyState:
    tokens: Window = field(default_factory=Window)
    requests: Window = field(default_factory=Window)
    # Last quotas asked for by this key (per-key overrides), reported by GetQuota.
    tpm_quota: int = 0
    rpm_quota: int = 0
    open_reservations: int = 0


@dataclass(slots=True)
class Reservation:
    reservation_id: str
    key_id: str
    request_id: str
    bucket: int
    tokens: int
    created_ms: int
    expires_ms: int
    # A lease holds ``requests`` requests and ``tokens`` tokens for several requests;
    # ``settled`` are the share numbers whose usage has been applied.
    requests: int = 1
    lease: bool = False
    settled: set[int] = field(default_factory=set)


@dataclass(slots=True)
class PolicyView:
    """One policy after a decision: what the RateLimit headers need."""

    name: str
    quota: int
    remaining: int
    window_seconds: int
    reset_ms: int


@dataclass(slots=True)
class Decision:
    allowed: bool
    policies: tuple[PolicyView, PolicyView]
    reservation_id: str = ""
    reserved_tokens: int = 0
    denied_by: str = ""
    retry_after_ms: int = 0
    # Granted beyond this request when a lease was asked for and the key has room.
    lease_tokens: int = 0
    lease_requests: int = 0


@dataclass(slots=True)
class Settlement:
    """A reservation replaced by actual usage. ``delta`` = actual - reserved."""

    reservation: Reservation
    actual_tokens: int
    delta: int


@dataclass(slots=True)
class QuotaView:
    key_id: str
    policies: tuple[PolicyView, PolicyView]
    open_reservations: int


@dataclass(slots=True)
class Snapshot:
    """Plain copies of the limiter state, safe to encode off the event loop."""

    taken_ms: int
    last_bucket: int
    keys: dict[str, dict[str, Any]]
    reservations: list[dict[str, Any]]


class Limiter:
    """Per-key TPM and RPM sliding windows with reservations."""

    def __init__(self, config: LimiterConfig) -> None:
        self.config = config
        self._n_buckets = config.window_ms // config.sub_bucket_ms
        self._window_seconds = config.window_ms // 1000
        self._keys: dict[str, KeyState] = {}
        # Insertion order = creation order; all share one TTL, so expiry pops the front.
        self._reservations: dict[str, Reservation] = {}
        # Closed leases, kept to their TTL so that late usage of their shares still
        # lands in the right sub-bucket, once.
        self._closed_leases: dict[str, Reservation] = {}
        self._last_bucket = 0
        # Unique across restarts (fresh prefix per process) without a uuid per request.
        self._id_prefix = secrets.token_hex(6)
        self._ids: Iterator[int] = itertools.count(1)
        self.expired_total = 0

    # --- time -----------------------------------------------------------------------

    def _bucket(self, now_ms: int) -> int:
        idx = now_ms // self.config.sub_bucket_ms
        if idx < self._last_bucket:
            return self._last_bucket
        self._last_bucket = idx
        return idx

    def _expiry_ms(self, idx: int) -> int:
        """Wall-clock time at which sub-bucket ``idx`` stops counting."""
        return (idx + self._n_buckets + 1) * self.config.sub_bucket_ms

    def _oldest_live(self, current: int) -> int:
        return current - self._n_buckets

    # --- decisions ------------------------------------------------------------------

    def reserve(
        self,
        key_id: str,
        *,
        input_tokens: int,
        max_output_tokens: int,
        now_ms: int,
        request_id: str = "",
        tokens_per_minute: int = 0,
        requests_per_minute: int = 0,
        lease_tokens: int = 0,
        lease_requests: int = 0,
    ) -> Decision:
        """Admit or refuse one request that may spend ``input + max_output`` tokens.

        With ``lease_tokens`` and ``lease_requests`` the caller also asks for a lease: a
        reservation of up to that much more, from which it admits the key's next
        requests itself (one round trip here per lease instead of per request). The
        lease counts in the window from the moment it is granted, so the quota holds
        across every holder; a lease takes at most 1/``lease_divisor`` of what the key
        has left, and when that is not room for even one more request it is not granted
        (the caller comes back for each request, as without leases).
        """
        cfg = self.config
        tpm = tokens_per_minute if tokens_per_minute > 0 else cfg.default_tokens_per_minute
        rpm = requests_per_minute if requests_per_minute > 0 else cfg.default_requests_per_minute
        need = max(0, input_tokens) + max(0, max_output_tokens)
        current = self._bucket(now_ms)
        state = self._state(key_id, current)
        state.tpm_quota, state.rpm_quota = tpm, rpm

        retry_tpm = self._retry_after(state.tokens, need, tpm, now_ms)
        retry_rpm = self._retry_after(state.requests, 1, rpm, now_ms)
        if retry_tpm or retry_rpm:
            denied_by = TPM if retry_tpm >= retry_rpm else RPM
            return Decision(
                allowed=False,
                policies=self._views(state, now_ms),
                denied_by=denied_by,
                retry_after_ms=max(retry_tpm, retry_rpm),
            )

        extra_tokens = extra_requests = 0
        if lease_tokens > 0 and lease_requests > 0:
            extra_tokens = min(lease_tokens, (tpm - state.tokens.total - need) // cfg.lease_divisor)
            extra_requests = min(
                lease_requests, (rpm - state.requests.total - 1) // cfg.lease_divisor
            )
            if extra_tokens < max(1, need) or extra_requests <= 0:
                extra_tokens = extra_requests = 0
        state.tokens.add(current, need + extra_tokens)
        state.requests.add(current, 1 + extra_requests)
        state.open_reservations += 1
        reservation_id = f"{self._id_prefix}-{next(self._ids):x}"
        self._reservations[reservation_id] = Reservation(
            reservation_id=reservation_id,
            key_id=key_id,
            request_id=request_id,
            bucket=current,
            tokens=need + extra_tokens,
            created_ms=now_ms,
            expires_ms=now_ms + cfg.reservation_ttl_ms,
            requests=1 + extra_requests,
            lease=extra_tokens > 0,
        )
        return Decision(
            allowed=True,
            policies=self._views(state, now_ms),
            reservation_id=reservation_id,
            reserved_tokens=need,
            lease_tokens=extra_tokens,
            lease_requests=extra_requests,
        )

    def _retry_after(self, window: Window, need: int, quota: int, now_ms: int) -> int:
        """0 when ``need`` fits now; otherwise ms until enough old sub-buckets age out.

        An amount larger than the whole quota never fits: the answer is the full window,
        a clear "not within this minute" rather than a retry that is bound to fail.
        """
        if window.total + need <= quota:
            return 0
        if need > quota:
            return self.config.window_ms
        freed = 0
        for idx, amount in window.buckets.items():
            freed += amount
            if window.total - freed + need <= quota:
                return max(1, self._expiry_ms(idx) - now_ms)
        return self.config.window_ms  # unreachable while need <= quota: all buckets free

    def settle(self, reservation_id: str, actual_tokens: int, now_ms: int) -> Settlement | None:
        """Replace a reservation by the tokens really used; None if not open any more.

        Settling removes the reservation, so a redelivered usage event (or a commit after
        the usage event) finds nothing and changes nothing: each reservation settles once.
        When its sub-bucket is still in the window the difference goes there. When it has
        aged out, a refund has nothing left to refund, but usage above the reservation
        was spent just now and is charged to the current sub-bucket.
        """
        share = parse_share(reservation_id)
        if share is not None:
            return self._settle_share(share, actual_tokens, now_ms)
        reservation = self._reservations.get(reservation_id)
        if reservation is None or reservation.lease:
            return None
        del self._reservations[reservation_id]
        actual = max(0, actual_tokens)
        delta = actual - reservation.tokens
        state = self._apply_delta(reservation, delta, now_ms)
        state.open_reservations = max(0, state.open_reservations - 1)
        return Settlement(reservation=reservation, actual_tokens=actual, delta=delta)

    def _apply_delta(self, reservation: Reservation, delta: int, now_ms: int) -> KeyState:
        """Actual minus reserved tokens, into the reservation's sub-bucket while it is
        counted; once it has aged out, only an excess is charged, to the current one."""
        current = self._bucket(now_ms)
        state = self._state(reservation.key_id, current)
        if delta and not state.tokens.adjust(reservation.bucket, delta) and delta > 0:
            state.tokens.add(current, delta)
        return state

    def _settle_share(self, share: Share, actual_tokens: int, now_ms: int) -> Settlement | None:
        """One request admitted from a lease: its actual usage replaces its share, in the
        lease's sub-bucket (or, when that has aged out, any excess in the current one).
        Each share settles once; the lease itself stays open for its other requests."""
        lease = self._reservations.get(share.lease_id) or self._closed_leases.get(share.lease_id)
        if lease is None or not lease.lease or share.number in lease.settled:
            return None
        lease.settled.add(share.number)
        actual = max(0, actual_tokens)
        delta = actual - share.tokens
        self._apply_delta(lease, delta, now_ms)
        return Settlement(reservation=lease, actual_tokens=actual, delta=delta)

    def close_lease(
        self, lease_id: str, unused_tokens: int, unused_requests: int, now_ms: int
    ) -> bool:
        """The holder stopped admitting from a lease: what it never handed out goes
        back (into the lease's sub-bucket, if still counted). False if unknown."""
        lease = self._reservations.get(lease_id)
        if lease is None or not lease.lease:
            return False
        del self._reservations[lease_id]
        current = self._bucket(now_ms)
        state = self._state(lease.key_id, current)
        state.open_reservations = max(0, state.open_reservations - 1)
        tokens = min(max(0, unused_tokens), lease.tokens)
        requests = min(max(0, unused_requests), lease.requests)
        if tokens:
            state.tokens.adjust(lease.bucket, -tokens)
        if requests:
            state.requests.adjust(lease.bucket, -requests)
        self._closed_leases[lease_id] = lease
        return True

    def quota(self, key_id: str, now_ms: int) -> QuotaView:
        current = self._bucket(now_ms)
        state = self._keys.get(key_id)
        if state is None:
            state = KeyState()
        else:
            self._evict(state, current)
        return QuotaView(key_id, self._views(state, now_ms), state.open_reservations)

    def expire(self, now_ms: int) -> int:
        """Forget reservations past their TTL and keys with nothing left to count.

        An expired reservation keeps its full reserved amount: no usage ever came (a
        crashed path, a lost event), and charging the reservation is the conservative
        reading. By then its sub-bucket has long aged out of the window anyway, so
        expiry only frees memory and the open-reservation count.
        """
        expired = 0
        reservations = self._reservations
        while reservations:
            rid = next(iter(reservations))
            reservation = reservations[rid]
            if reservation.expires_ms > now_ms:
                break
            del reservations[rid]
            expired += 1
            state = self._keys.get(reservation.key_id)
            if state is not None:
                state.open_reservations = max(0, state.open_reservations - 1)
        self.expired_total += expired
        for lease_id in [i for i, r in self._closed_leases.items() if r.expires_ms <= now_ms]:
            del self._closed_leases[lease_id]

        current = self._bucket(now_ms)
        idle = []
        for key_id, state in self._keys.items():
            self._evict(state, current)
            empty = not state.tokens.buckets and not state.requests.buckets
            if empty and not state.open_reservations:
                idle.append(key_id)
        for key_id in idle:
            del self._keys[key_id]
        return expired

    @property
    def open_reservations(self) -> int:
        return len(self._reservations)

    @property
    def tracked_keys(self) -> int:
        return len(self._keys)

    # --- helpers --------------------------------------------------------------------

    def _state(self, key_id: str, current: int) -> KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = KeyState(
                tpm_quota=self.config.default_tokens_per_minute,
                rpm_quota=self.config.default_requests_per_minute,
            )
        else:
            self._evict(state, current)
        return state

    def _evict(self, state: KeyState, current: int) -> None:
        oldest = self._oldest_live(current)
        state.tokens.evict(oldest)
        state.requests.evict(oldest)

    def _views(self, state: KeyState, now_ms: int) -> tuple[PolicyView, PolicyView]:
        tpm = state.tpm_quota or self.config.default_tokens_per_minute
        rpm = state.rpm_quota or self.config.default_requests_per_minute
        return (
            self._view(TPM, state.tokens, tpm, now_ms),
            self._view(RPM, state.requests, rpm, now_ms),
        )

    def _view(self, name: str, window: Window, quota: int, now_ms: int) -> PolicyView:
        reset_ms = 0
        if window.total > 0:
            for idx in reversed(window.buckets):
                if window.buckets[idx]:
                    reset_ms = max(0, self._expiry_ms(idx) - now_ms)
                    break
        return PolicyView(
            name=name,
            quota=quota,
            remaining=max(0, quota - window.total),
            window_seconds=self._window_seconds,
            reset_ms=reset_ms,
        )

    # --- snapshots ------------------------------------------------------------------

    def snapshot(self, now_ms: int) -> Snapshot:
        """Copy the live state (cheap: integers only) for encoding elsewhere."""
        current = self._bucket(now_ms)
        keys: dict[str, dict[str, Any]] = {}
        for key_id, state in self._keys.items():
            self._evict(state, current)
            keys[key_id] = {
                "tokens": list(state.tokens.buckets.items()),
                "requests": list(state.requests.buckets.items()),
                "tpm_quota": state.tpm_quota,
                "rpm_quota": state.rpm_quota,
            }
        reservations = [
            {
                "id": r.reservation_id,
                "key": r.key_id,
                "request": r.request_id,
                "bucket": r.bucket,
                "tokens": r.tokens,
                "created_ms": r.created_ms,
                "expires_ms": r.expires_ms,
                "requests": r.requests,
                "lease": r.lease,
                "settled": sorted(r.settled),
            }
            for r in self._reservations.values()
        ]
        return Snapshot(now_ms, self._last_bucket, keys, reservations)

    def restore(self, snapshot: Snapshot, now_ms: int) -> None:
        """Replace the state by a snapshot, dropping what has aged out since it was taken."""
        self._keys.clear()
        self._reservations.clear()
        self._closed_leases.clear()
        self._last_bucket = max(self._last_bucket, snapshot.last_bucket)
        for key_id, data in snapshot.keys.items():
            state = KeyState(tpm_quota=int(data["tpm_quota"]), rpm_quota=int(data["rpm_quota"]))
            for idx, amount in sorted(data["tokens"]):
                state.tokens.add(int(idx), int(amount))
            for idx, amount in sorted(data["requests"]):
                state.requests.add(int(idx), int(amount))
            self._keys[key_id] = state
        for raw in sorted(snapshot.reservations, key=lambda r: int(r["created_ms"])):
            reservation = Reservation(
                reservation_id=str(raw["id"]),
                key_id=str(raw["key"]),
                request_id=str(raw["request"]),
                bucket=int(raw["bucket"]),
                tokens=int(raw["tokens"]),
                created_ms=int(raw["created_ms"]),
                expires_ms=int(raw["expires_ms"]),
                requests=int(raw.get("requests", 1)),
                lease=bool(raw.get("lease", False)),
                settled={int(n) for n in raw.get("settled", ())},
            )
            self._reservations[reservation.reservation_id] = reservation
            owner = self._keys.get(reservation.key_id)
            if owner is None:
                owner = self._keys[reservation.key_id] = KeyState(
                    tpm_quota=self.config.default_tokens_per_minute,
                    rpm_quota=self.config.default_requests_per_minute,
                )
            owner.open_reservations += 1
        self.expire(now_ms)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """JSON (inspectable with ``nats kv get``) compressed: windows are repetitive."""
    body = {
        "version": SNAPSHOT_VERSION,
        "taken_ms": snapshot.taken_ms,
        "last_bucket": snapshot.last_bucket,
        "keys": snapshot.keys,
        "reservations": snapshot.reservations,
    }
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), level=6)


def decode_snapshot(data: bytes) -> Snapshot:
    body = json.loads(zlib.decompress(data))
    if body.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported limiter snapshot version {body.get('version')!r}")
    return Snapshot(
        taken_ms=int(body["taken_ms"]),
        last_bucket=int(body["last_bucket"]),
        keys=dict(body["keys"]),
        reservations=list(body["reservations"]),
    )
