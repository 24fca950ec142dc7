"""The priority scheduling policy on its own: a model worker whose pulls are answered at
once from in-memory queues, so every step is deterministic (no NATS, no clock)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping

import pytest
from sluice.topology import PriorityClass

from services.inference_worker.domain.scheduling import ClassScheduler, Poll

SYSTEM = PriorityClass.SYSTEM
INTERACTIVE = PriorityClass.INTERACTIVE
BATCH = PriorityClass.BATCH
SHARES = {INTERACTIVE: 0.1, BATCH: 0.1}


def scheduler(shares: Mapping[PriorityClass, float] = SHARES) -> ClassScheduler:
    return ClassScheduler(shares=shares, long_poll_seconds=5.0, short_poll_seconds=1.0)


class Model:
    """A worker with ``slots`` slots over three queues. A pull on a queue with a backlog
    gets a message at once; a probe of an empty queue comes back empty at once; a poll
    of an empty queue waits until ``publish`` or ``expire``."""

    def __init__(
        self,
        slots: int,
        backlog: Mapping[PriorityClass, int],
        shares: Mapping[PriorityClass, float] = SHARES,
    ) -> None:
        self.scheduler = scheduler(shares)
        self.slots = slots
        self.backlog = Counter(backlog)
        self.running: deque[PriorityClass] = deque()
        self.grants: list[PriorityClass] = []
        self.probes: Counter[PriorityClass] = Counter()
        self.pulls: Counter[PriorityClass] = Counter()
        self.waiting: dict[PriorityClass, Poll] = {}
        self.now = 0.0
        self.settle()

    def credits(self) -> int:
        return self.slots - len(self.running) - self.scheduler.open_count()

    def settle(self) -> None:
        while polls := self.scheduler.plan(self.credits(), self.now):
            for poll in polls:
                self._answer(poll)

    def _answer(self, poll: Poll) -> None:
        self.pulls[poll.cls] += 1
        if poll.probe:
            self.probes[poll.cls] += 1
        if self.backlog[poll.cls] > 0:
            # A pull brings up to its batch at once; a poll not filled keeps waiting.
            brought = min(poll.batch, self.backlog[poll.cls])
            for _ in range(brought):
                self.backlog[poll.cls] -= 1
                self.scheduler.answered(poll.cls, message=True, now=self.now)
                self.running.append(poll.cls)
                self.grants.append(poll.cls)
            if brought < poll.batch and not poll.probe:
                self.waiting[poll.cls] = poll._replace(batch=poll.batch - brought)
        elif poll.probe:
            self.scheduler.answered(poll.cls, message=False, now=self.now)
        else:
            self.waiting[poll.cls] = poll

    def finish(self, times: int = 1) -> None:
        """The oldest running item finishes, ``times`` times over."""
        for _ in range(times):
            self.running.popleft()
            self.scheduler.slot_freed()
            self.settle()

    def publish(self, cls: PriorityClass, count: int) -> None:
        self.backlog[cls] += count
        if (poll := self.waiting.pop(cls, None)) is not None:
            self._answer(poll)
            self.settle()

    def expire(self, cls: PriorityClass) -> None:
        del self.waiting[cls]
        self.scheduler.answered(cls, message=False, now=self.now)
        self.settle()


def runs(grants: list[PriorityClass], cls: PriorityClass) -> list[int]:
    """Lengths of the runs of consecutive ``cls`` grants."""
    lengths, current = [], 0
    for grant in grants:
        if grant == cls:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths + ([current] if current else [])


def test_with_slack_every_class_long_polls() -> None:
    s = scheduler()
    assert s.plan(credits=6, now=0) == [Poll(c, 5.0) for c in (SYSTEM, INTERACTIVE, BATCH)]
    assert s.plan(credits=3, now=0) == []  # one pull per class at most


def test_near_saturation_probes_walk_down_the_classes_one_answer_at_a_time() -> None:
    s = scheduler()
    # Three free slots, but batch is not asked before interactive has answered.
    assert s.plan(credits=3, now=0) == [Poll(SYSTEM, 0.0)]
    assert s.plan(credits=2, now=0) == []
    s.answered(SYSTEM, message=False, now=0)
    assert s.plan(credits=3, now=0) == [Poll(INTERACTIVE, 0.0)]
    s.answered(INTERACTIVE, message=True, now=0)
    # Interactive had a message: it is asked again before batch.
    assert s.plan(credits=2, now=0) == [Poll(INTERACTIVE, 0.0)]
    s.answered(INTERACTIVE, message=False, now=0)
    assert s.plan(credits=2, now=0) == [Poll(BATCH, 0.0)]


def test_a_free_slot_goes_to_the_highest_class_with_a_backlog() -> None:
    model = Model(slots=1, backlog={BATCH: 5, INTERACTIVE: 3, SYSTEM: 2})
    model.finish(times=6)
    assert model.grants[:7] == [SYSTEM, SYSTEM, INTERACTIVE, INTERACTIVE, INTERACTIVE, BATCH, BATCH]


def test_batch_gets_its_share_under_a_saturating_interactive_backlog() -> None:
    model = Model(slots=2, backlog={INTERACTIVE: 10_000, BATCH: 10_000})
    model.finish(times=300)
    grants = model.grants
    assert grants[:10] == [INTERACTIVE] * 10  # nothing owed yet
    # Then exactly one batch item in every ten, never two in a row: interactive waits at
    # most one extra slot for each batch turn.
    assert abs(grants.count(BATCH) - len(grants) / 10) <= 1
    assert set(runs(grants, BATCH)) == {1}
    assert set(runs(grants, INTERACTIVE)[1:-1]) == {9}


def test_strict_priority_would_starve_batch() -> None:
    # What the share prevents: with no share, batch never runs while interactive has work.
    model = Model(
        slots=2, backlog={INTERACTIVE: 10_000, BATCH: 10_000}, shares={INTERACTIVE: 0, BATCH: 0}
    )
    model.finish(times=300)
    assert BATCH not in model.grants


def test_every_class_progresses_under_a_system_flood() -> None:
    model = Model(slots=4, backlog={SYSTEM: 10_000, INTERACTIVE: 10_000, BATCH: 10_000})
    model.finish(times=1_000)
    count = Counter(model.grants)
    total = len(model.grants)
    assert count[SYSTEM] > 0.8 * total
    # About a share each (a little under when both are due at once: one waits a turn).
    for cls in (INTERACTIVE, BATCH):
        assert 0.085 * total <= count[cls] <= 0.1 * total, count
        assert set(runs(model.grants, cls)) == {1}


def test_an_idle_lower_class_costs_one_probe_per_turn() -> None:
    model = Model(slots=2, backlog={INTERACTIVE: 10_000})
    model.finish(times=200)
    assert set(model.grants) == {INTERACTIVE}
    # Batch is asked when its turn comes (every ten grants), finds nothing and is owed
    # nothing: it does not bank turns while idle.
    assert abs(model.probes[BATCH] - len(model.grants) / 10) <= 1
    assert model.scheduler.owed(BATCH) < 1


def test_no_turns_are_banked_while_the_higher_class_is_idle() -> None:
    model = Model(slots=2, backlog={BATCH: 10_000})
    model.finish(times=50)
    assert model.scheduler.owed(BATCH) == 0
    before = len(model.grants)
    model.publish(INTERACTIVE, 10_000)
    model.finish(times=30)
    after = model.grants[before:]
    assert after[:10] == [INTERACTIVE] * 10
    assert after[10] == BATCH


def test_an_interactive_arrival_takes_the_next_free_slot_under_batch_saturation() -> None:
    model = Model(slots=4, backlog={BATCH: 1_000})
    model.finish(times=20)
    # No slot is parked on the idle higher classes: every slot runs batch work.
    assert list(model.running) == [BATCH] * 4
    assert model.scheduler.open_count() == 0
    model.publish(INTERACTIVE, 1)
    before = len(model.grants)
    model.finish()
    assert model.grants[before:] == [INTERACTIVE]


def test_with_every_queue_empty_the_free_slots_rotate_short_polls() -> None:
    model = Model(slots=1, backlog={})
    # Probed once each since the last slot freed, all empty: now a short poll, which
    # yields its turn to the next class when it expires.
    assert model.probes == Counter({SYSTEM: 1, INTERACTIVE: 1, BATCH: 1})
    assert list(model.waiting) == [SYSTEM]
    polled = []
    for step in range(1, 7):
        model.now = float(step)
        (cls,) = model.waiting
        polled.append(cls)
        model.expire(cls)
    assert polled == [SYSTEM, INTERACTIVE, BATCH, SYSTEM, INTERACTIVE, BATCH]
    # A message on the class being polled is taken at once.
    (cls,) = model.waiting
    model.publish(cls, 1)
    assert model.grants == [cls]


def test_a_freed_slot_asks_every_class_again() -> None:
    model = Model(slots=1, backlog={})
    assert list(model.waiting) == [SYSTEM]
    # Batch answered empty since the last slot freed and is not being polled: its new
    # message waits for its turn...
    model.publish(BATCH, 1)
    assert model.grants == []
    model.publish(SYSTEM, 1)
    assert model.grants == [SYSTEM]
    # ...or for the next freed slot, which asks every class again.
    model.finish()
    assert model.grants == [SYSTEM, BATCH]


@pytest.mark.parametrize("share", [-0.1, 0.6])
def test_shares_are_bounded(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        scheduler({BATCH: share})


def test_with_slack_a_pull_brings_a_batch_and_holds_its_slots() -> None:
    s = ClassScheduler(shares=SHARES, long_poll_seconds=5.0, short_poll_seconds=1.0, max_batch=16)
    # 64 free slots: half of them split between the three classes, at most 16 each.
    assert s.plan(credits=64, now=0) == [Poll(c, 5.0, 10) for c in (SYSTEM, INTERACTIVE, BATCH)]
    assert s.open_count() == 30
    s.answered(BATCH, message=True, now=0)
    assert s.open_count() == 29 and s.is_open(BATCH)
    for _ in range(9):
        s.answered(BATCH, message=True, now=0)
    assert not s.is_open(BATCH)  # a full batch ends the pull
    s.answered(SYSTEM, message=False, now=1)  # expired: its slots come back
    assert s.open_count() == 10


def settled_model(
    slots: int, backlog: dict[PriorityClass, int], *, max_batch: int = 1, reserved: int = 0
) -> Model:
    """A model whose scheduler has the test's own batch size or reserve, settled."""
    model = Model(slots=slots, backlog=backlog)
    model.scheduler = ClassScheduler(
        shares=SHARES,
        long_poll_seconds=5.0,
        short_poll_seconds=1.0,
        max_batch=max_batch,
        reserved=reserved,
    )
    model.settle()
    return model


def test_a_burst_is_taken_in_few_round_trips() -> None:
    def burst(max_batch: int) -> Model:
        model = settled_model(64, {}, max_batch=max_batch)
        model.publish(INTERACTIVE, 40)
        return model

    one_by_one, batched = burst(1), burst(16)
    for model in (one_by_one, batched):
        assert model.grants.count(INTERACTIVE) == 40 and model.backlog[INTERACTIVE] == 0
    assert one_by_one.pulls[INTERACTIVE] >= 40
    assert batched.pulls[INTERACTIVE] * 2 < one_by_one.pulls[INTERACTIVE]


def test_batch_leaves_the_reserved_slots_to_higher_classes() -> None:
    def saturated(reserved: int) -> Model:
        model = settled_model(16, {}, reserved=reserved)
        model.publish(BATCH, 1000)
        # The higher classes' long polls expire with nothing to bring.
        model.expire(SYSTEM)
        model.expire(INTERACTIVE)
        return model

    plain, reserving = saturated(0), saturated(2)
    # Without a reserve batch takes the slots the expired polls held ...
    assert plain.running.count(BATCH) == 16
    # ... with one, at least two slots stay for the higher classes' polls (batch owes
    # nothing yet: no higher class has taken work).
    assert reserving.running.count(BATCH) <= 14
    # ... so an interactive arrival starts at once instead of after a batch item ends.
    reserving.publish(INTERACTIVE, 1)
    assert reserving.running[-1] == INTERACTIVE
    plain.publish(INTERACTIVE, 1)
    assert INTERACTIVE not in plain.running


def test_a_due_batch_turn_may_use_a_reserved_slot() -> None:
    model = settled_model(4, {INTERACTIVE: 10_000, BATCH: 10_000}, reserved=4)
    model.finish(times=200)
    assert 15 <= model.grants.count(BATCH) <= 25  # its share, reserve or not
