"""Which priority class a free worker slot asks for work next.

A pure policy, no I/O and no clock of its own, so that it can be driven step by step in
tests: ``WorkConsumer`` (``handlers/nats.py``) asks it for a plan, turns the plan into
JetStream pull requests and reports back what each pull brought and when a slot frees.

Rules, with ``credits`` = free slots not already held by an open pull:

1. **Slack** (free slots for every class twice over): every class without an open pull
   long-polls, for a batch of up to ``max_batch`` messages (half the free slots, split
   between the classes; each message the pull may still bring holds a slot). Pickup
   latency is one server delivery, and a burst of arrivals is taken in one round trip
   per class rather than one per message, which matters when the worker's event loop
   is busy relaying tokens.
2. **Near saturation**, a free slot walks the classes in priority order (system,
   interactive, batch) with *probes*: pulls that the server answers at once (``no_wait``:
   a message, or "no messages"). A class that answered empty is not asked again until
   a slot frees (an *epoch*), and while a probe of a class is in flight the classes
   below it wait for its answer (one round trip). So a free slot goes to the highest
   class with a backlog, and an empty higher class costs a round trip per freed slot
   instead of a slot parked on it: an interactive request that arrives while batch
   saturates the worker starts on the next slot that frees.
3. **Minimum shares**: strict priority would starve a lower class for as long as a
   higher one keeps the worker busy. Each grant (message taken) to a higher class adds
   the lower class's ``share`` (``WorkerSettings.batch_share``, ``interactive_share``;
   0.1 = one slot in ten) to what it is *owed*, capped at one turn; a grant to the class
   itself pays one turn back. A class owed a whole turn is *due*: the next free slot
   probes it before any other class. A due class that turns out empty is owed nothing
   (no credit banked while idle, so a burst after a quiet spell does not jump the
   queue), so an idle lower class costs one extra round trip every ``1/share`` grants.

   Why a share and not ageing (promote batch work older than N seconds): the worker can
   only see how old a message is after pulling it, and counting grants needs no clock,
   so the policy is deterministic and its cost is bounded. The cost to the higher class:
   a due turn takes exactly one freed slot, and a class cannot be due twice in a row
   (``share`` ≤ 0.5), so an interactive request waits at most one extra slot release (at
   most one generation) per lower-class turn, and such turns come at most once every
   ``1/share`` grants. With interactive and batch backlogs, batch gets ``share`` of the
   grants and interactive the rest; when system floods the worker too, interactive and
   batch get a little under their shares (when both are due, one waits a turn).
4. When every class without an open pull has answered empty since the last freed slot,
   the remaining slots short-poll, rotating: a class whose short poll just expired
   yields its turn, so few free slots are not parked on one idle class.

5. **Reserved slots**: the worker never holds more messages than it can start (an open
   pull counts as a taken slot), so with every slot busy a new interactive request
   would wait for the next slot to free (at concurrency C and generation time T, about
   T/C). The lowest class may not take the last ``reserved`` free slots
   (``WorkerSettings.reserved_slots``; default C/16) unless its share is due, so the
   higher classes find a slot at once, at the price of that much idle capacity while
   only batch work waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sluice.topology import PriorityClass

PRIORITY_ORDER: tuple[PriorityClass, ...] = (
    PriorityClass.SYSTEM,
    PriorityClass.INTERACTIVE,
    PriorityClass.BATCH,
)
# Float sums of shares (0.1 ten times) land just under 1.
_EPSILON = 1e-9


class Poll(NamedTuple):
    """One pull request to open: ``expires`` is how long the server may hold it (0: a
    probe, answered at once); ``batch`` how many messages it may bring."""

    cls: PriorityClass
    expires: float
    batch: int = 1

    @property
    def probe(self) -> bool:
        return self.expires == 0


@dataclass
class _ClassState:
    open: Poll | None = None
    # The epoch in which the class last answered without a message.
    empty_epoch: int = -1
    # When a (short or long) poll of the class last expired without a message.
    expired_at: float = -1e9
    # Turns owed under the class's minimum share (0..1).
    owed: float = 0.0
    # Messages the open poll may still bring (each holds a slot until it arrives).
    outstanding: int = 0


class ClassScheduler:
    def __init__(
        self,
        *,
        shares: Mapping[PriorityClass, float],
        long_poll_seconds: float,
        short_poll_seconds: float,
        order: Sequence[PriorityClass] = PRIORITY_ORDER,
        max_batch: int = 1,
        reserved: int = 0,
    ) -> None:
        for cls, share in shares.items():
            if not 0.0 <= share <= 0.5:
                raise ValueError(f"share of {cls} must be within 0..0.5, not {share}")
        self.order = tuple(order)
        # The top class needs no share: nothing is above it.
        self.shares = {cls: shares.get(cls, 0.0) for cls in self.order[1:]}
        self.long_poll_seconds = long_poll_seconds
        self.max_batch = max(1, max_batch)
        # Free slots the lowest class may not take (unless its share is due).
        self.reserved = max(0, reserved)
        self.short_poll_seconds = short_poll_seconds
        self.epoch = 0
        self._state = {cls: _ClassState() for cls in self.order}

    # --- queries ----------------------------------------------------------------------

    def is_open(self, cls: PriorityClass) -> bool:
        return self._state[cls].open is not None

    def open_count(self) -> int:
        """Slots held by open polls: one per message each may still bring."""
        return sum(s.outstanding for s in self._state.values() if s.open is not None)

    def owed(self, cls: PriorityClass) -> float:
        return self._state[cls].owed

    def due(self, cls: PriorityClass) -> bool:
        share = self.shares.get(cls, 0.0)
        return share > 0 and self._state[cls].owed >= 1.0 - _EPSILON

    # --- the plan ---------------------------------------------------------------------

    def plan(self, credits: int, now: float) -> list[Poll]:
        """The pulls to open with ``credits`` free slots; they count as open from here."""
        idle = [cls for cls in self.order if self._state[cls].open is None]
        if credits <= 0 or not idle:
            return []
        if credits - len(idle) >= len(self.order):
            # Half the free slots, split between the idle classes: a burst is taken
            # in one round trip per class instead of one per message.
            batch = max(1, min(self.max_batch, credits // (2 * len(self.order))))
            polls = [Poll(cls, self.long_poll_seconds, batch) for cls in idle]
        else:
            polls = self._near_saturation(credits, now)
        polls = self._within_reserve(polls, credits)
        for poll in polls:
            state = self._state[poll.cls]
            state.open, state.outstanding = poll, poll.batch
        return polls

    def _reserved_from(self, cls: PriorityClass, free: int) -> bool:
        """Whether ``free`` slots are all kept from ``cls`` by the reserve."""
        return (
            self.reserved > 0
            and cls == self.order[-1]
            and not self.due(cls)
            and free <= self.reserved
        )

    def _within_reserve(self, polls: list[Poll], credits: int) -> list[Poll]:
        """Drop (or shrink) the lowest class's poll where it would take one of the last
        ``reserved`` free slots, counting the slots the polls before it hold."""
        if not self.reserved:
            return polls
        lowest = self.order[-1]
        kept: list[Poll] = []
        left = credits
        for poll in polls:
            allowed = poll
            if poll.cls == lowest and not self.due(lowest):
                if self._reserved_from(lowest, left):
                    continue
                allowed = poll._replace(batch=min(poll.batch, left - self.reserved))
            kept.append(allowed)
            left -= allowed.batch
        return kept

    def _near_saturation(self, credits: int, now: float) -> list[Poll]:
        polls: list[Poll] = []
        due = [cls for cls in self.order if self.due(cls)]
        walk = due + [cls for cls in self.order if cls not in due]
        for cls in walk:
            if len(polls) == credits:
                return polls
            state = self._state[cls]
            if state.open is not None:
                if state.open.probe and cls not in due:
                    return polls  # the classes below wait for its answer
                continue  # a poll is already waiting for this class
            if state.empty_epoch == self.epoch or self._reserved_from(cls, credits - len(polls)):
                continue
            polls.append(Poll(cls, 0.0))
            if cls not in due:
                return polls
        # Every class is open or answered empty since the last slot freed: short polls.
        window = 2 * self.short_poll_seconds
        asked = {p.cls for p in polls}
        left = credits - len(polls)
        rest = [
            cls
            for cls in self.order
            if self._state[cls].open is None
            and cls not in asked
            and not self._reserved_from(cls, left)
        ]
        ranked = sorted(rest, key=lambda c: now - self._state[c].expired_at < window)
        polls += [Poll(cls, self.short_poll_seconds) for cls in ranked[: credits - len(polls)]]
        return polls

    # --- what happened ----------------------------------------------------------------

    def answered(self, cls: PriorityClass, *, message: bool, now: float) -> None:
        """The open pull of ``cls`` ended: with a message (taken: a grant) or without."""
        state = self._state[cls]
        poll = state.open
        if message:
            state.outstanding -= 1
            if state.outstanding <= 0:
                state.open = None  # the server ends a pull whose batch is full
            state.empty_epoch = -1
            self._granted(cls)
            return
        state.open, state.outstanding = None, 0
        state.empty_epoch = self.epoch
        state.owed = 0.0
        if poll is not None and not poll.probe:
            state.expired_at = now

    def lost(self, cls: PriorityClass) -> None:
        """The open pull of ``cls`` will never be answered (not sent, or forgotten)."""
        state = self._state[cls]
        state.open, state.outstanding = None, 0

    def slot_freed(self) -> None:
        """A work item finished: every class is worth asking again."""
        self.epoch += 1

    def _granted(self, cls: PriorityClass) -> None:
        rank = self.order.index(cls)
        for other in self.order[rank + 1 :]:  # passed over
            state = self._state[other]
            state.owed = min(1.0, state.owed + self.shares[other])
        if cls in self.shares:
            state = self._state[cls]
            state.owed = max(0.0, state.owed + self.shares[cls] - 1.0)
