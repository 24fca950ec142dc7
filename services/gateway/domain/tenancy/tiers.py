"""Tiers (``config/tiers.yaml``): the defaults of a team's limits and budgets, of each of
its end users', and the priority classes its requests may use. Read once at start; an
error names the file, the line and what is wrong, so a bad file stops the gateway
instead of serving with limits nobody meant."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import yaml
from sluice.settings import ConfigFileError
from sluice.topology import PriorityClass
from sluice.yamlfile import LineReader, compose

from services.gateway.domain.tenancy.limits import (
    BUDGET_FIELDS,
    LIMIT_FIELDS,
    Allowance,
    Budgets,
    Limits,
    check_limit,
    usd_to_nanos,
)


class TierFileError(ConfigFileError):
    """What is wrong with the tiers file, and where."""


class LimiterFailure(StrEnum):
    """What a team's requests get while the limiter does not answer."""

    # 503 limiter_unavailable: nothing is admitted that cannot be counted.
    FAIL_CLOSED = "fail_closed"
    # Each gateway admits within a conservative local allowance; the usage of what it
    # admitted is counted by the limiter from the usage stream when it is back.
    FAIL_OPEN = "fail_open"


@dataclass(frozen=True)
class Tier:
    name: str
    priorities: frozenset[PriorityClass] = frozenset(PriorityClass)
    team: Allowance = field(default_factory=Allowance)
    end_user: Allowance = field(default_factory=Allowance)
    limiter_failure: LimiterFailure = LimiterFailure.FAIL_CLOSED
    # The share of each limit batch work is admitted within (0: the limiter's setting).
    batch_share: float = 0.0


@dataclass(frozen=True)
class TierTable:
    tiers: dict[str, Tier] = field(default_factory=dict)
    default: str = ""

    def get(self, name: str) -> Tier | None:
        return self.tiers.get(name)

    def failing_open(self) -> list[str]:
        """The tiers whose teams are admitted while the limiter does not answer."""
        return sorted(
            n for n, t in self.tiers.items() if t.limiter_failure is LimiterFailure.FAIL_OPEN
        )

    @classmethod
    def load(cls, path: Path) -> TierTable:
        """The tiers of ``path``; none when there is no such file (a configuration folder
        made before tiers existed): teams then have only their own limits and budgets, and
        creating one needs a tier, so ``sluice teams create`` says the table is empty."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise TierFileError(f"{path}: cannot read it ({exc.strerror})") from None
        return parse_tiers(text, str(path))


def parse_tiers(text: str, source: str = "tiers.yaml") -> TierTable:
    root = compose(text, source, TierFileError)
    reader = _Reader(source)
    if root is None:
        raise TierFileError(f"{source}: empty, expected 'tiers:' with at least one tier")
    top = reader.mapping(root, "the file", {"tiers", "default_tier"})
    if "tiers" not in top:
        raise TierFileError(f"{reader.at(root)}: 'tiers:' is missing")
    tiers_node = top["tiers"][1]
    tiers: dict[str, Tier] = {}
    for name, (key_node, node) in reader.mapping(tiers_node, "tiers", None).items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise TierFileError(
                f"{reader.at(key_node)}: tier name {name!r} must be letters, digits, - or _"
            )
        tiers[name] = reader.tier(name, node)
    if not tiers:
        raise TierFileError(f"{reader.at(tiers_node)}: 'tiers:' names no tier")
    default = ""
    if "default_tier" in top:
        default_node = top["default_tier"][1]
        default = reader.scalar(default_node, "default_tier")
        if default not in tiers:
            raise TierFileError(
                f"{reader.at(default_node)}: default_tier {default!r} is not one of the tiers "
                f"({', '.join(sorted(tiers))})"
            )
    return TierTable(tiers, default)


class _Reader(LineReader):
    def __init__(self, source: str) -> None:
        super().__init__(source, TierFileError)

    def value(self, node: yaml.Node, what: str) -> object:
        self.scalar(node, what)
        return yaml.safe_load(yaml.serialize(node))

    def tier(self, name: str, node: yaml.Node) -> Tier:
        parts = self.mapping(
            node,
            f"tier {name!r}",
            {"priorities", "team", "end_user", "limiter_failure", "batch_share"},
        )
        priorities = frozenset(PriorityClass)
        if "priorities" in parts:
            p_node = parts["priorities"][1]
            if not isinstance(p_node, yaml.SequenceNode) or not p_node.value:
                raise TierFileError(
                    f"{self.at(p_node)}: priorities of tier {name!r} must be a non-empty list"
                )
            chosen = set()
            for item in p_node.value:
                text = self.scalar(item, "a priority class")
                try:
                    chosen.add(PriorityClass(text))
                except ValueError:
                    raise TierFileError(
                        f"{self.at(item)}: unknown priority class {text!r} "
                        f"(expected {', '.join(c.value for c in PriorityClass)})"
                    ) from None
            priorities = frozenset(chosen)
        team = self.allowance(parts["team"][1], f"{name}.team") if "team" in parts else Allowance()
        end_user = (
            self.allowance(parts["end_user"][1], f"{name}.end_user")
            if "end_user" in parts
            else Allowance()
        )
        failure = LimiterFailure.FAIL_CLOSED
        if "limiter_failure" in parts:
            f_node = parts["limiter_failure"][1]
            text = self.scalar(f_node, "limiter_failure")
            try:
                failure = LimiterFailure(text)
            except ValueError:
                raise TierFileError(
                    f"{self.at(f_node)}: limiter_failure of tier {name!r} must be "
                    f"{' or '.join(f.value for f in LimiterFailure)}, not {text!r}"
                ) from None
        batch_share = 0.0
        if "batch_share" in parts:
            b_node = parts["batch_share"][1]
            value = self.value(b_node, "batch_share")
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0 < value <= 1)
            ):
                raise TierFileError(
                    f"{self.at(b_node)}: batch_share of tier {name!r} must be a number "
                    f"above 0 and at most 1, not {value!r}"
                )
            batch_share = float(value)
        return Tier(name, priorities, team, end_user, failure, batch_share)

    def allowance(self, node: yaml.Node, what: str) -> Allowance:
        parts = self.mapping(node, what, {"limits", "budgets"})
        limits = Limits()
        budgets = Budgets()
        if "limits" in parts:
            values: dict[str, int] = {}
            for key, (_k, v_node) in self.mapping(
                parts["limits"][1], f"{what}.limits", set(LIMIT_FIELDS)
            ).items():
                try:
                    values[key] = check_limit(key, self.value(v_node, key))
                except ValueError as exc:
                    raise TierFileError(f"{self.at(v_node)}: {what}.limits: {exc}") from None
            limits = Limits(**values)
        if "budgets" in parts:
            nanos: dict[str, int] = {}
            for key, (_k, v_node) in self.mapping(
                parts["budgets"][1], f"{what}.budgets", set(BUDGET_FIELDS)
            ).items():
                try:
                    nanos[BUDGET_FIELDS[key]] = usd_to_nanos(self.value(v_node, key))
                except ValueError as exc:
                    raise TierFileError(f"{self.at(v_node)}: {what}.budgets.{key}: {exc}") from None
            budgets = Budgets(**nanos)
        return Allowance(limits, budgets)
