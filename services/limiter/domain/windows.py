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

Levels. Beside the key's own quotas ("tpm", "rpm": the key record's tokens and requests
per minute, or the defaults), a request may carry the limits and budgets of up to three
levels (key, team, end user; ``Level``): requests, input tokens and output tokens per
minute (windows as above), concurrent requests (reservations open) and USD per UTC day
and month (nano-USD held per period). One reservation is charged to every level's state
at once and refused when any level set by the request has no room; the refusal names the
level and limit (``team.output_tokens_per_minute``, ``key.usd_per_day``). A budget admits
while what is spent and held in its period is below it: a request that then costs more
overshoots by at most its own reservation, and ``Decision.spend_ceiling_nanos`` says how
much it may cost before the tightest budget runs out. Batch-class work passes each check
only within ``share`` of the quota, so interactive work keeps the rest.

Everything here is synchronous, allocation-light and free of I/O: the NATS handlers call
it on the event loop. Time is passed in as wall-clock milliseconds so that snapshots
remain meaningful across restarts; a clock that steps back is clamped to the newest
sub-bucket already seen.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sluice.leases import Share, parse_share

TPM = "tpm"
RPM = "rpm"
# The refusal of a lease-only ask (``lease_only``): no room for a lease, nothing held.
LEASE = "lease"

# Units of a policy, as PolicyState.unit names them.
U_REQUESTS = "requests"
U_TOKENS = "tokens"
U_INPUT = "input_tokens"
U_OUTPUT = "output_tokens"
U_CONCURRENT = "concurrent_requests"
U_USD = "usd_nanos"

SNAPSHOT_VERSION = 2
DAY_MS = 86_400_000
# A refusal by concurrency frees when a request ends, which nobody can foretell.
CONCURRENCY_RETRY_MS = 1_000
# Weight of the newest actual output in a key's learned output estimate.
EWMA_ALPHA = 0.2

# Prices a reservation: (input tokens, output tokens) -> nano-USD.
Pricer = Callable[[int, int], int]


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


@dataclass(frozen=True, slots=True)
class LevelLimits:
    """What one level sets; 0 is "not set at this level"."""

    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0
    concurrent_requests: int = 0
    usd_nanos_per_day: int = 0
    usd_nanos_per_month: int = 0

    @property
    def any(self) -> bool:
        return bool(
            self.requests_per_minute
            or self.input_tokens_per_minute
            or self.output_tokens_per_minute
            or self.concurrent_requests
            or self.usd_nanos_per_day
            or self.usd_nanos_per_month
        )


@dataclass(frozen=True, slots=True)
class Level:
    """One level of a request: its name in refusals (key, team, end_user), the state it
    is counted in (``scope``) and what it sets."""

    name: str
    scope: str
    limits: LevelLimits


def team_scope(team_id: str) -> str:
    return f"team:{team_id}"


def end_user_scope(team_id: str, end_user: str) -> str:
    return f"user:{team_id}:{end_user}"


def day_of(now_ms: int) -> int:
    return now_ms // DAY_MS


def month_of(now_ms: int) -> int:
    at = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    return at.year * 12 + at.month - 1


def month_end_ms(month: int) -> int:
    year, index = divmod(month + 1, 12)
    return int(datetime(year, index + 1, 1, tzinfo=UTC).timestamp() * 1000)


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
    """The state of one scope: a key (under its key id), a team or an end user."""

    tokens: Window = field(default_factory=Window)
    requests: Window = field(default_factory=Window)
    input: Window = field(default_factory=Window)
    output: Window = field(default_factory=Window)
    # Last quotas asked for by this key (per-key overrides), reported by GetQuota.
    tpm_quota: int = 0
    rpm_quota: int = 0
    # Reservations open on this scope: its requests in flight.
    open_reservations: int = 0
    # Nano-USD spent and held, by UTC day and by month (only the current ones are kept).
    day_spend: dict[int, int] = field(default_factory=dict)
    month_spend: dict[int, int] = field(default_factory=dict)
    # Of a key: the moving average of its requests' actual output tokens (0: none yet).
    output_estimate: float = 0.0

    def idle(self) -> bool:
        return not (
            self.tokens.buckets
            or self.requests.buckets
            or self.input.buckets
            or self.output.buckets
            or self.open_reservations
            or any(self.day_spend.values())
            or any(self.month_spend.values())
        )


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
    # Requests still counted as in flight on every scope (concurrency): 1 for a plain
    # reservation; a lease's slots, less those settled or handed back.
    open_slots: int = 1
    # Of a lease's ``cost_nanos``, what is still held against the budgets: each settled
    # share and each close gives back its part.
    held_nanos: int = 0
    # The scopes beyond the key charged with this reservation (teams, end users).
    scopes: tuple[str, ...] = ()
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    day: int = 0
    month: int = 0


@dataclass(slots=True)
class PolicyView:
    """One policy after a decision: what the RateLimit headers need."""

    name: str
    quota: int
    remaining: int
    window_seconds: int
    reset_ms: int
    unit: str = ""


@dataclass(slots=True)
class Decision:
    allowed: bool
    policies: tuple[PolicyView, ...]
    reservation_id: str = ""
    reserved_tokens: int = 0
    denied_by: str = ""
    retry_after_ms: int = 0
    # Granted beyond this request when a lease was asked for and every level has room.
    lease_tokens: int = 0
    lease_requests: int = 0
    lease_input_tokens: int = 0
    lease_output_tokens: int = 0
    budget_exceeded: bool = False
    # The most this request may cost before the tightest budget runs out (0: no budget).
    spend_ceiling_nanos: int = 0
    reserved_cost_nanos: int = 0
    reserved_output_tokens: int = 0


@dataclass(slots=True)
class Settlement:
    """A reservation replaced by actual usage. ``delta`` = actual - reserved."""

    reservation: Reservation
    actual_tokens: int
    delta: int


@dataclass(slots=True)
class QuotaView:
    key_id: str
    policies: tuple[PolicyView, ...]
    open_reservations: int


@dataclass(slots=True)
class Snapshot:
    """Plain copies of the limiter state, safe to encode off the event loop."""

    taken_ms: int
    last_bucket: int
    keys: dict[str, dict[str, Any]]
    reservations: list[dict[str, Any]]
    # Where the state stands in its sources (the service's journal and usage positions).
    marks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _LeaseRoom:
    """What a lease holds beyond the request that asked for it (all 0: no lease); also
    a lease as asked for, with the asking request's own input, output and cost."""

    tokens: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0


@dataclass(frozen=True, slots=True)
class _Used:
    """A settlement or a lease's close, per scope: actual minus reserved input, output
    and cost, and how many requests are no longer in flight."""

    input_delta: int
    output_delta: int
    cost_delta: int
    slots: int


@dataclass(slots=True)
class _Refusal:
    name: str
    retry_ms: int
    budget: bool = False


class Limiter:
    """Per-scope sliding windows, concurrency and spend, with reservations."""

    def __init__(
        self, config: LimiterConfig, *, id_prefix: str = "", pricer: Pricer | None = None
    ) -> None:
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
        # Unique across restarts (fresh prefix per process) without a uuid per request;
        # ``id_prefix`` (a partition's) lets a caller route a reservation id back here.
        self._id_prefix = f"{id_prefix}{secrets.token_hex(6)}"
        self._ids: Iterator[int] = itertools.count(1)
        self.expired_total = 0
        self.pricer = pricer
        # Reservations settled or expired here, until their TTL: a late usage event of
        # one is not "unknown" (see ``forgotten``).
        self._done: dict[str, int] = {}

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
        levels: tuple[Level, ...] = (),
        share: float = 1.0,
        output_estimated: bool = False,
        price: Pricer | None = None,
        lease_only: bool = False,
    ) -> Decision:
        """Admit or refuse one request that may spend ``input + max_output`` tokens.

        ``levels`` are the request's key, team and end-user limits and budgets (see the
        module doc); ``share`` below 1 admits it only within that share of each quota
        (batch work). With ``output_estimated`` the output reserved is the key's learned
        estimate when it has one and it is lower. ``price`` gives its worst-case cost.

        With ``lease_tokens`` and ``lease_requests`` the caller also asks for a lease: a
        reservation of up to that much more, from which it admits the key's next
        requests itself (one round trip here per lease instead of per request). The
        lease counts from the moment it is granted, on the key and on every level the
        request carries: its requests in each requests-per-minute window and as that
        many requests in flight (concurrency), its input and output tokens in the
        levels' windows, and the most they may cost in the day's and month's spend. So
        every quota and budget holds across every holder. A lease takes at most
        1/``lease_divisor`` of what is left under the tightest of them, and when that is
        not room for even one more request like this one it is not granted (the caller
        comes back for each request, as without leases). See ``_lease_room``. With
        ``lease_only`` (a holder renewing ahead) the request is the lease's first share
        rather than a request of its own: without room for a lease nothing is reserved
        and the answer is a refusal by ``LEASE`` (no retry: the holder asks per request).
        """
        cfg = self.config
        tpm = tokens_per_minute if tokens_per_minute > 0 else cfg.default_tokens_per_minute
        rpm = requests_per_minute if requests_per_minute > 0 else cfg.default_requests_per_minute
        current = self._bucket(now_ms)
        state = self._state(key_id, current)
        state.tpm_quota, state.rpm_quota = tpm, rpm
        input_tokens = max(0, input_tokens)
        output_tokens = max(0, max_output_tokens)
        if output_estimated and state.output_estimate > 0:
            output_tokens = min(output_tokens, math.ceil(state.output_estimate))
        need = input_tokens + output_tokens
        pricing = price or self.pricer
        cost = pricing(input_tokens, output_tokens) if pricing is not None else 0
        day, month = day_of(now_ms), month_of(now_ms)
        levels = tuple(level for level in levels if level.limits.any)
        scoped = [(level, self._scope_state(level, key_id, state, current)) for level in levels]

        refusals: list[_Refusal] = []
        retry_tpm = self._retry_after(state.tokens, need, self._shared(tpm, share), now_ms)
        if retry_tpm:
            refusals.append(_Refusal(TPM, retry_tpm))
        retry_rpm = self._retry_after(state.requests, 1, self._shared(rpm, share), now_ms)
        if retry_rpm:
            refusals.append(_Refusal(RPM, retry_rpm))
        ceiling = 0
        for level, scope in scoped:
            ceiling = self._check_level(
                level,
                scope,
                input_tokens,
                output_tokens,
                share,
                now_ms,
                day,
                month,
                refusals,
                ceiling,
            )
        if refusals:
            worst = max(refusals, key=lambda r: r.retry_ms)
            return Decision(
                allowed=False,
                policies=self._views(state, now_ms, scoped, day, month),
                denied_by=worst.name,
                retry_after_ms=worst.retry_ms,
                budget_exceeded=worst.budget,
            )

        room = _LeaseRoom()
        if lease_tokens > 0 and lease_requests > 0:
            room = self._lease_room(
                state,
                scoped,
                _LeaseRoom(lease_tokens, lease_requests, input_tokens, output_tokens, cost),
                self._shared(tpm, share),
                self._shared(rpm, share),
                share,
                day,
                month,
                pricing,
            )
        leased = room.requests > 0
        if lease_only and not leased:
            return Decision(
                allowed=False,
                policies=self._views(state, now_ms, scoped, day, month),
                denied_by=LEASE,
            )
        state.tokens.add(current, need + room.tokens)
        state.requests.add(current, 1 + room.requests)
        reservation_id = f"{self._id_prefix}-{next(self._ids):x}"
        reservation = Reservation(
            reservation_id=reservation_id,
            key_id=key_id,
            request_id=request_id,
            bucket=current,
            tokens=need + room.tokens,
            created_ms=now_ms,
            expires_ms=now_ms + cfg.reservation_ttl_ms,
            requests=1 + room.requests,
            lease=leased,
            scopes=tuple(dict.fromkeys(level.scope for level in levels if level.scope != key_id)),
            input_tokens=input_tokens + room.input_tokens,
            output_tokens=output_tokens + room.output_tokens,
            cost_nanos=cost + room.cost_nanos,
            day=day,
            month=month,
            open_slots=1 + room.requests,
            held_nanos=cost + room.cost_nanos if leased else 0,
        )
        self._charge(reservation, current)
        self._reservations[reservation_id] = reservation
        if ceiling and room.cost_nanos:
            # What the lease holds for the key's next requests is spent by others as far
            # as this one (and each of them) is concerned.
            ceiling = max(1, ceiling - room.cost_nanos)
        return Decision(
            allowed=True,
            policies=self._views(state, now_ms, scoped, day, month),
            reservation_id=reservation_id,
            reserved_tokens=need,
            lease_tokens=room.tokens,
            lease_requests=room.requests,
            lease_input_tokens=room.input_tokens,
            lease_output_tokens=room.output_tokens,
            spend_ceiling_nanos=ceiling,
            reserved_cost_nanos=cost,
            reserved_output_tokens=output_tokens,
        )

    def _lease_room(  # noqa: PLR0917 - one call site, every argument a fact of the request
        self,
        state: KeyState,
        scoped: list[tuple[Level, KeyState]],
        asked: _LeaseRoom,
        tpm: int,
        rpm: int,
        share: float,
        day: int,
        month: int,
        pricing: Pricer | None,
    ) -> _LeaseRoom:
        """What a lease may hold beyond the request that asks for it: at most what was
        asked and 1/``lease_divisor`` of what is left under every quota and budget the
        request carries (after the request itself); nothing unless that is room for at
        least one more request like this one."""
        divisor = self.config.lease_divisor
        need = asked.input_tokens + asked.output_tokens
        tokens = min(asked.tokens, (tpm - state.tokens.total - need) // divisor)
        requests = min(asked.requests, (rpm - state.requests.total - 1) // divisor)
        inputs = outputs = tokens
        cost_room: int | None = None  # None: no budget applies
        for level, scope in scoped:
            limits = level.limits
            for quota, used, amount in (
                (limits.requests_per_minute, scope.requests.total, 1),
                (limits.concurrent_requests, scope.open_reservations, 1),
            ):
                if quota:
                    left = self._shared(quota, share) - used - amount
                    requests = min(requests, left // divisor)
            if limits.input_tokens_per_minute:
                left = self._shared(limits.input_tokens_per_minute, share) - scope.input.total
                inputs = min(inputs, (left - asked.input_tokens) // divisor)
            if limits.output_tokens_per_minute:
                left = self._shared(limits.output_tokens_per_minute, share) - scope.output.total
                outputs = min(outputs, (left - asked.output_tokens) // divisor)
            for quota, spent in (
                (limits.usd_nanos_per_day, scope.day_spend.get(day, 0)),
                (limits.usd_nanos_per_month, scope.month_spend.get(month, 0)),
            ):
                if quota:
                    left = (self._shared(quota, share) - spent - asked.cost_nanos) // divisor
                    cost_room = left if cost_room is None else min(cost_room, left)
        if cost_room is not None and cost_room <= 0:
            # A budget with no room beyond this request (or already past it): no lease.
            return _LeaseRoom()
        # The lease's most cost is held only where a budget would read it: held without
        # one, it would stand against a budget set later until the lease is closed.
        cost = 0
        if pricing is not None and cost_room is not None and inputs > 0 and outputs > 0:
            cost = pricing(inputs, outputs)
            if cost > cost_room:
                # Within the budgets: fewer tokens, in the same proportion.
                inputs = inputs * cost_room // cost
                outputs = outputs * cost_room // cost
                cost = pricing(inputs, outputs)
        fits_one = (
            requests >= 1
            and tokens >= max(1, need)
            and inputs >= asked.input_tokens
            and outputs >= asked.output_tokens
            and (cost_room is None or cost <= cost_room)
        )
        if not fits_one:
            return _LeaseRoom()
        return _LeaseRoom(tokens, requests, inputs, outputs, cost)

    @staticmethod
    def _shared(quota: int, share: float) -> int:
        return quota if share >= 1.0 else max(0, int(quota * share))

    def _scope_state(
        self, level: Level, key_id: str, key_state: KeyState, current: int
    ) -> KeyState:
        return key_state if level.scope == key_id else self._state(level.scope, current)

    def _check_level(  # noqa: PLR0917 - one call site, every argument a fact of the request
        self,
        level: Level,
        scope: KeyState,
        input_tokens: int,
        output_tokens: int,
        share: float,
        now_ms: int,
        day: int,
        month: int,
        refusals: list[_Refusal],
        ceiling: int,
    ) -> int:
        """Adds this level's refusals; returns the spend ceiling with its budgets in."""
        limits = level.limits
        name = level.name
        for quota, window, amount, limit in (
            (limits.requests_per_minute, scope.requests, 1, "requests_per_minute"),
            (limits.input_tokens_per_minute, scope.input, input_tokens, "input_tokens_per_minute"),
            (
                limits.output_tokens_per_minute,
                scope.output,
                output_tokens,
                "output_tokens_per_minute",
            ),
        ):
            if quota:
                retry = self._retry_after(window, amount, self._shared(quota, share), now_ms)
                if retry:
                    refusals.append(_Refusal(f"{name}.{limit}", retry))
        concurrent = limits.concurrent_requests
        if concurrent and scope.open_reservations + 1 > self._shared(concurrent, share):
            refusals.append(_Refusal(f"{name}.concurrent_requests", CONCURRENCY_RETRY_MS))
        for quota, spent, limit, ends in (
            (
                limits.usd_nanos_per_day,
                scope.day_spend.get(day, 0),
                "usd_per_day",
                (day + 1) * DAY_MS,
            ),
            (
                limits.usd_nanos_per_month,
                scope.month_spend.get(month, 0),
                "usd_per_month",
                month_end_ms(month),
            ),
        ):
            if not quota:
                continue
            room = self._shared(quota, share) - spent
            if room <= 0:
                refusals.append(_Refusal(f"{name}.{limit}", max(1, ends - now_ms), budget=True))
            else:
                ceiling = room if ceiling == 0 else min(ceiling, room)
        return ceiling

    def _charge(self, reservation: Reservation, current: int) -> None:
        """Counts a new reservation on the key's windows and in every scope's."""
        state = self._state(reservation.key_id, current)
        for scope_state in [state, *(self._state(s, current) for s in reservation.scopes)]:
            if scope_state is not state:
                scope_state.requests.add(current, reservation.requests)
            scope_state.input.add(current, reservation.input_tokens)
            scope_state.output.add(current, reservation.output_tokens)
            scope_state.open_reservations += reservation.open_slots
            if reservation.cost_nanos:
                self._spend(scope_state, reservation.day, reservation.month, reservation.cost_nanos)

    @staticmethod
    def _spend(state: KeyState, day: int, month: int, nanos: int) -> None:
        state.day_spend[day] = state.day_spend.get(day, 0) + nanos
        state.month_spend[month] = state.month_spend.get(month, 0) + nanos

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

    def settle(
        self,
        reservation_id: str,
        actual_tokens: int,
        now_ms: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cost_nanos: int = 0,
        learn: bool = False,
    ) -> Settlement | None:
        """Replace a reservation by what was really used; None if not open any more.

        ``actual_tokens`` is input plus output; ``input_tokens`` and ``output_tokens``
        split it for the levels' windows (absent: input first), ``cost_nanos`` is what it
        cost. With ``learn`` the actual output feeds the key's output estimate.

        Settling removes the reservation, so a redelivered usage event (or a commit after
        the usage event) finds nothing and changes nothing: each reservation settles once.
        When its sub-bucket is still in the window the difference goes there. When it has
        aged out, a refund has nothing left to refund, but usage above the reservation
        was spent just now and is charged to the current sub-bucket. Spend goes to the
        reservation's own day and month while they are kept.
        """
        actual = max(0, actual_tokens)
        share = parse_share(reservation_id)
        if share is not None:
            return self._settle_share(
                share, actual, now_ms, input_tokens, output_tokens, cost_nanos, learn=learn
            )
        reservation = self._reservations.get(reservation_id)
        if reservation is None or reservation.lease:
            return None
        del self._reservations[reservation_id]
        self._done[reservation_id] = reservation.expires_ms
        if input_tokens is None or output_tokens is None:
            input_tokens = min(actual, reservation.input_tokens)
            output_tokens = actual - input_tokens
        delta = actual - reservation.tokens
        state = self._apply_delta(reservation, delta, now_ms)
        self._reconcile_scopes(
            reservation,
            _Used(
                input_tokens - reservation.input_tokens,
                output_tokens - reservation.output_tokens,
                cost_nanos - reservation.cost_nanos,
                slots=1,
            ),
            now_ms,
        )
        if learn:
            self.learn_output(state, output_tokens)
        return Settlement(reservation=reservation, actual_tokens=actual, delta=delta)

    def _reconcile_scopes(self, reservation: Reservation, used: _Used, now_ms: int) -> None:
        """Differences of input, output and spend into every scope the reservation was
        counted in (its sub-bucket and its day and month), and ``used.slots`` of its
        requests no longer in flight."""
        current = self._bucket(now_ms)
        scopes = (reservation.key_id, *reservation.scopes)
        for scope_state in [self._state(s, current) for s in scopes]:
            self._adjust(scope_state.input, reservation.bucket, used.input_delta, current)
            self._adjust(scope_state.output, reservation.bucket, used.output_delta, current)
            self._adjust_spend(scope_state, reservation, used.cost_delta, now_ms)
            scope_state.open_reservations = max(0, scope_state.open_reservations - used.slots)

    @staticmethod
    def learn_output(state: KeyState, output_tokens: int) -> None:
        previous = state.output_estimate
        state.output_estimate = (
            float(output_tokens)
            if previous <= 0
            else previous + EWMA_ALPHA * (output_tokens - previous)
        )

    @staticmethod
    def _adjust(window: Window, bucket: int, delta: int, current: int) -> None:
        if delta and not window.adjust(bucket, delta) and delta > 0:
            window.add(current, delta)

    def _adjust_spend(
        self, state: KeyState, reservation: Reservation, delta: int, now_ms: int
    ) -> None:
        if not delta:
            return
        for spend, period, now_period in (
            (state.day_spend, reservation.day, day_of(now_ms)),
            (state.month_spend, reservation.month, month_of(now_ms)),
        ):
            if period in spend:
                spend[period] = max(0, spend[period] + delta)
            elif delta > 0:
                spend[now_period] = spend.get(now_period, 0) + delta

    def charge_unreserved(
        self,
        key_id: str,
        scopes: tuple[str, ...],
        *,
        input_tokens: int,
        output_tokens: int,
        cost_nanos: int,
        now_ms: int,
    ) -> None:
        """Usage of a request this state holds no reservation of (one a gateway admitted
        on its own while the limiter was down, or whose journal entry was lost with its
        owner): the request and what it used and cost, counted at ``now_ms``, so that
        nothing spent is forgotten."""
        current = self._bucket(now_ms)
        state = self._state(key_id, current)
        state.tokens.add(current, input_tokens + output_tokens)
        for scope_state in [state, *(self._state(s, current) for s in scopes)]:
            scope_state.requests.add(current, 1)
            scope_state.input.add(current, input_tokens)
            scope_state.output.add(current, output_tokens)
            if cost_nanos:
                self._spend(scope_state, day_of(now_ms), month_of(now_ms), cost_nanos)

    def _apply_delta(self, reservation: Reservation, delta: int, now_ms: int) -> KeyState:
        """Actual minus reserved tokens, into the reservation's sub-bucket while it is
        counted; once it has aged out, only an excess is charged, to the current one."""
        current = self._bucket(now_ms)
        state = self._state(reservation.key_id, current)
        self._adjust(state.tokens, reservation.bucket, delta, current)
        return state

    def _settle_share(  # noqa: PLR0917 - settle's own arguments, passed on
        self,
        share: Share,
        actual: int,
        now_ms: int,
        input_tokens: int | None,
        output_tokens: int | None,
        cost_nanos: int,
        *,
        learn: bool,
    ) -> Settlement | None:
        """One request admitted from a lease: its actual usage replaces its share, in the
        lease's sub-bucket (or, when that has aged out, any excess in the current one),
        on the key and on every level; its part of the lease's cost hold gives way to
        what it cost, and its slot is no longer in flight. Each share settles once; the
        lease itself stays open for its other requests."""
        lease = self._reservations.get(share.lease_id) or self._closed_leases.get(share.lease_id)
        if lease is None or not lease.lease or share.number in lease.settled:
            return None
        lease.settled.add(share.number)
        if input_tokens is None or output_tokens is None:
            input_tokens = min(actual, share.tokens)
            output_tokens = actual - input_tokens
        # A share id of the first format does not say its input: read it as what was used.
        reserved_input = share.input_tokens if share.input_tokens >= 0 else input_tokens
        reserved_input = min(reserved_input, share.tokens)
        delta = actual - share.tokens
        state = self._apply_delta(lease, delta, now_ms)
        slots = 1 if lease.open_slots > 0 else 0
        lease.open_slots -= slots
        self._reconcile_scopes(
            lease,
            _Used(
                input_tokens - reserved_input,
                output_tokens - (share.tokens - reserved_input),
                cost_nanos - self._release_hold(lease, share.tokens),
                slots,
            ),
            now_ms,
        )
        if share.lease_id in self._closed_leases:
            self._release_rest(lease, now_ms)
        if learn:
            self.learn_output(state, output_tokens)
        return Settlement(reservation=lease, actual_tokens=actual, delta=delta)

    def _release_rest(self, lease: Reservation, now_ms: int) -> None:
        """A closed lease whose every share has settled: what is left of its cost hold
        (the parts' rounding) goes, so that its spend is exactly what its shares cost."""
        if lease.open_slots > 0 or lease.held_nanos <= 0:
            return
        rest, lease.held_nanos = lease.held_nanos, 0
        self._reconcile_scopes(lease, _Used(0, 0, -rest, 0), now_ms)

    @staticmethod
    def _release_hold(lease: Reservation, tokens: int) -> int:
        """The part of a lease's cost hold that ``tokens`` of it stood for (shares and
        what is handed back share the hold by tokens; the last part takes what is left)."""
        if lease.tokens <= 0:
            return 0
        part = min(lease.held_nanos, lease.cost_nanos * max(0, tokens) // lease.tokens)
        lease.held_nanos -= part
        return part

    def close_lease(
        self,
        lease_id: str,
        unused_tokens: int,
        unused_requests: int,
        now_ms: int,
        *,
        unused_input_tokens: int = 0,
        unused_output_tokens: int = 0,
    ) -> bool:
        """The holder stopped admitting from a lease: what it never handed out goes
        back (into the lease's sub-bucket, if still counted) on the key and on every
        level: tokens, requests, input and output, their part of the cost hold, and
        their slots in flight. Shares already handed out stay counted until their usage
        settles them. False if unknown."""
        lease = self._reservations.get(lease_id)
        if lease is None or not lease.lease:
            return False
        del self._reservations[lease_id]
        current = self._bucket(now_ms)
        state = self._state(lease.key_id, current)
        tokens = min(max(0, unused_tokens), lease.tokens)
        requests = min(max(0, unused_requests), lease.requests)
        if tokens:
            state.tokens.adjust(lease.bucket, -tokens)
        if requests:
            for scope in (lease.key_id, *lease.scopes):
                self._state(scope, current).requests.adjust(lease.bucket, -requests)
        slots = min(requests, lease.open_slots)
        lease.open_slots -= slots
        self._reconcile_scopes(
            lease,
            _Used(
                -min(max(0, unused_input_tokens), lease.input_tokens),
                -min(max(0, unused_output_tokens), lease.output_tokens),
                -self._release_hold(lease, tokens),
                slots,
            ),
            now_ms,
        )
        self._closed_leases[lease_id] = lease
        self._release_rest(lease, now_ms)
        return True

    def holds(self, reservation_id: str) -> bool:
        """Whether a reservation (or the lease of a share) is open or was closed here."""
        share = parse_share(reservation_id)
        rid = share.lease_id if share is not None else reservation_id
        return rid in self._reservations or rid in self._closed_leases

    def tracks(self, key_id: str) -> bool:
        return key_id in self._keys

    def forgotten(self, reservation_id: str) -> bool:
        """Whether a reservation was settled or expired here (recently)."""
        return reservation_id in self._done

    def quota(self, key_id: str, now_ms: int) -> QuotaView:
        current = self._bucket(now_ms)
        state = self._keys.get(key_id)
        if state is None:
            state = KeyState()
        else:
            self._evict(state, current)
        return QuotaView(key_id, self._views(state, now_ms, (), 0, 0), state.open_reservations)

    def spent(self, scope: str, now_ms: int) -> tuple[int, int]:
        """Nano-USD spent and held by a scope today and this month."""
        state = self._keys.get(scope)
        if state is None:
            return 0, 0
        return state.day_spend.get(day_of(now_ms), 0), state.month_spend.get(month_of(now_ms), 0)

    def expire(self, now_ms: int) -> int:
        """Forget reservations past their TTL and scopes with nothing left to count.

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
            self._done[rid] = now_ms + self.config.reservation_ttl_ms
            expired += 1
            self._free_slots(reservation)
        self.expired_total += expired
        for lease_id in [i for i, r in self._closed_leases.items() if r.expires_ms <= now_ms]:
            self._free_slots(self._closed_leases.pop(lease_id))
        for rid in [i for i, until in self._done.items() if until <= now_ms]:
            del self._done[rid]

        current = self._bucket(now_ms)
        day, month = day_of(now_ms), month_of(now_ms)
        idle = []
        for key_id, state in self._keys.items():
            self._evict(state, current)
            for spend, keep in ((state.day_spend, day), (state.month_spend, month)):
                for period in [p for p in spend if p < keep]:
                    del spend[period]
            if state.idle() and not state.output_estimate:
                idle.append(key_id)
        for key_id in idle:
            del self._keys[key_id]
        return expired

    def _free_slots(self, reservation: Reservation) -> None:
        """An expired reservation's requests in flight (a lease's shares whose usage never
        came) stop counting; what it holds in windows and spend stays (see ``expire``)."""
        slots, reservation.open_slots = reservation.open_slots, 0
        for scope in (reservation.key_id, *reservation.scopes):
            state = self._keys.get(scope)
            if state is not None:
                state.open_reservations = max(0, state.open_reservations - slots)

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
        state.input.evict(oldest)
        state.output.evict(oldest)

    def _views(
        self,
        state: KeyState,
        now_ms: int,
        scoped: list[tuple[Level, KeyState]] | tuple[()],
        day: int,
        month: int,
    ) -> tuple[PolicyView, ...]:
        tpm = state.tpm_quota or self.config.default_tokens_per_minute
        rpm = state.rpm_quota or self.config.default_requests_per_minute
        views = [
            self._view(TPM, state.tokens, tpm, now_ms, U_TOKENS),
            self._view(RPM, state.requests, rpm, now_ms, U_REQUESTS),
        ]
        for level, scope in scoped:
            limits, name = level.limits, level.name
            for quota, window, limit, unit in (
                (limits.requests_per_minute, scope.requests, "requests_per_minute", U_REQUESTS),
                (limits.input_tokens_per_minute, scope.input, "input_tokens_per_minute", U_INPUT),
                (
                    limits.output_tokens_per_minute,
                    scope.output,
                    "output_tokens_per_minute",
                    U_OUTPUT,
                ),
            ):
                if quota:
                    views.append(self._view(f"{name}.{limit}", window, quota, now_ms, unit))
            if limits.concurrent_requests:
                views.append(
                    PolicyView(
                        f"{name}.concurrent_requests",
                        limits.concurrent_requests,
                        max(0, limits.concurrent_requests - scope.open_reservations),
                        0,
                        0,
                        U_CONCURRENT,
                    )
                )
            for quota, spent, limit, seconds, ends in (
                (
                    limits.usd_nanos_per_day,
                    scope.day_spend.get(day, 0),
                    "usd_per_day",
                    DAY_MS // 1000,
                    (day + 1) * DAY_MS,
                ),
                (
                    limits.usd_nanos_per_month,
                    scope.month_spend.get(month, 0),
                    "usd_per_month",
                    (month_end_ms(month) - month_end_ms(month - 1)) // 1000,
                    month_end_ms(month),
                ),
            ):
                if quota:
                    views.append(
                        PolicyView(
                            f"{name}.{limit}",
                            quota,
                            max(0, quota - spent),
                            seconds,
                            max(0, ends - now_ms),
                            U_USD,
                        )
                    )
        return tuple(views)

    def _view(self, name: str, window: Window, quota: int, now_ms: int, unit: str) -> PolicyView:
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
            unit=unit,
        )

    # --- snapshots ------------------------------------------------------------------

    def snapshot(self, now_ms: int, marks: dict[str, int] | None = None) -> Snapshot:
        """Copy the live state (cheap: integers only) for encoding elsewhere."""
        current = self._bucket(now_ms)
        keys: dict[str, dict[str, Any]] = {}
        for key_id, state in self._keys.items():
            self._evict(state, current)
            keys[key_id] = {
                "tokens": list(state.tokens.buckets.items()),
                "requests": list(state.requests.buckets.items()),
                "input": list(state.input.buckets.items()),
                "output": list(state.output.buckets.items()),
                "tpm_quota": state.tpm_quota,
                "rpm_quota": state.rpm_quota,
                "day_spend": list(state.day_spend.items()),
                "month_spend": list(state.month_spend.items()),
                "output_estimate": state.output_estimate,
            }
        reservations = [reservation_record(r) for r in self._reservations.values()]
        closed = [reservation_record(r) for r in self._closed_leases.values()]
        for record in closed:
            record["closed"] = True
        return Snapshot(now_ms, self._last_bucket, keys, reservations + closed, dict(marks or {}))

    def restore(self, snapshot: Snapshot, now_ms: int) -> None:
        """Replace the state by a snapshot, dropping what has aged out since it was taken."""
        self._keys.clear()
        self._reservations.clear()
        self._closed_leases.clear()
        self._last_bucket = max(self._last_bucket, snapshot.last_bucket)
        for key_id, data in snapshot.keys.items():
            state = KeyState(
                tpm_quota=int(data["tpm_quota"]),
                rpm_quota=int(data["rpm_quota"]),
                day_spend={int(p): int(n) for p, n in data.get("day_spend", ())},
                month_spend={int(p): int(n) for p, n in data.get("month_spend", ())},
                output_estimate=float(data.get("output_estimate", 0.0)),
            )
            for name in ("tokens", "requests", "input", "output"):
                window: Window = getattr(state, name)
                for idx, amount in sorted(data.get(name, ())):
                    window.add(int(idx), int(amount))
            self._keys[key_id] = state
        for raw in sorted(snapshot.reservations, key=lambda r: int(r["created_ms"])):
            reservation = reservation_from_record(raw)
            if raw.get("closed"):
                self._closed_leases[reservation.reservation_id] = reservation
                self._count_slots(reservation)
                continue
            self.adopt(reservation, charge=False)
        self.expire(now_ms)

    def adopt(self, reservation: Reservation, *, charge: bool) -> bool:
        """Take in a reservation made elsewhere (a journal entry of this state's previous
        owner); with ``charge`` its amounts are counted, as ``reserve`` counted them.
        False when it is already here."""
        rid = reservation.reservation_id
        if rid in self._reservations or rid in self._closed_leases:
            return False
        self._reservations[rid] = reservation
        self._last_bucket = max(self._last_bucket, reservation.bucket)
        current = self._last_bucket
        if charge:
            state = self._state(reservation.key_id, current)
            state.tokens.add(reservation.bucket, reservation.tokens)
            state.requests.add(reservation.bucket, reservation.requests)
            for scope_state in [state, *(self._state(s, current) for s in reservation.scopes)]:
                if scope_state is not state:
                    scope_state.requests.add(reservation.bucket, reservation.requests)
                scope_state.input.add(reservation.bucket, reservation.input_tokens)
                scope_state.output.add(reservation.bucket, reservation.output_tokens)
                scope_state.open_reservations += reservation.open_slots
                if reservation.cost_nanos:
                    self._spend(
                        scope_state, reservation.day, reservation.month, reservation.cost_nanos
                    )
            # Sub-buckets are kept in age order: re-sort what an older entry landed in.
            for scope in (reservation.key_id, *reservation.scopes):
                self._sort_windows(self._keys[scope])
        else:
            self._count_slots(reservation)
        return True

    def _count_slots(self, reservation: Reservation) -> None:
        """A restored reservation's requests in flight, on every scope it counts in (the
        windows and spend come with the scopes' own state)."""
        for scope in (reservation.key_id, *reservation.scopes):
            owner = self._keys.get(scope)
            if owner is None:
                owner = self._keys[scope] = KeyState(
                    tpm_quota=self.config.default_tokens_per_minute,
                    rpm_quota=self.config.default_requests_per_minute,
                )
            owner.open_reservations += reservation.open_slots

    @staticmethod
    def _sort_windows(state: KeyState) -> None:
        for window in (state.tokens, state.requests, state.input, state.output):
            if list(window.buckets) != sorted(window.buckets):
                window.buckets = dict(sorted(window.buckets.items()))

    def reservation(self, reservation_id: str) -> Reservation | None:
        return self._reservations.get(reservation_id)


def reservation_record(r: Reservation) -> dict[str, Any]:
    return {
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
        "scopes": list(r.scopes),
        "input": r.input_tokens,
        "output": r.output_tokens,
        "cost": r.cost_nanos,
        "day": r.day,
        "month": r.month,
        "slots": r.open_slots,
        "held": r.held_nanos,
    }


def reservation_from_record(raw: dict[str, Any]) -> Reservation:
    return Reservation(
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
        scopes=tuple(str(s) for s in raw.get("scopes", ())),
        input_tokens=int(raw.get("input", raw["tokens"])),
        output_tokens=int(raw.get("output", 0)),
        cost_nanos=int(raw.get("cost", 0)),
        day=int(raw.get("day", 0)),
        month=int(raw.get("month", 0)),
        open_slots=int(raw.get("slots", 1)),
        held_nanos=int(raw.get("held", 0)),
    )


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """JSON (inspectable with ``nats kv get``) compressed: windows are repetitive."""
    body = {
        "version": SNAPSHOT_VERSION,
        "taken_ms": snapshot.taken_ms,
        "last_bucket": snapshot.last_bucket,
        "keys": snapshot.keys,
        "reservations": snapshot.reservations,
        "marks": snapshot.marks,
    }
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), level=6)


def decode_snapshot(data: bytes) -> Snapshot:
    body = json.loads(zlib.decompress(data))
    if body.get("version") not in (1, SNAPSHOT_VERSION):
        raise ValueError(f"unsupported limiter snapshot version {body.get('version')!r}")
    return Snapshot(
        taken_ms=int(body["taken_ms"]),
        last_bucket=int(body["last_bucket"]),
        keys=dict(body["keys"]),
        reservations=list(body["reservations"]),
        marks={str(k): int(v) for k, v in dict(body.get("marks", {})).items()},
    )
