"""What a key, a team or an end user may use (limits) and spend (budgets), and how the
levels combine: a value of 0 means "not set here", and the more specific level's own
value wins over the one it falls back to (key over team over tier)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation

from sluice.tenancy.v1 import tenancy_pb2

NANOS_PER_USD = Decimal(1_000_000_000)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0
    concurrent_requests: int = 0

    def over(self, fallback: Limits) -> Limits:
        """This level's values, and ``fallback``'s where this one sets none."""
        return Limits(
            **{f.name: getattr(self, f.name) or getattr(fallback, f.name) for f in fields(self)}
        )

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def to_proto(self) -> tenancy_pb2.Limits:
        return tenancy_pb2.Limits(
            requests_per_minute=self.requests_per_minute,
            input_tokens_per_minute=self.input_tokens_per_minute,
            output_tokens_per_minute=self.output_tokens_per_minute,
            concurrent_requests=self.concurrent_requests,
        )

    @classmethod
    def from_proto(cls, p: tenancy_pb2.Limits) -> Limits:
        return cls(
            p.requests_per_minute,
            p.input_tokens_per_minute,
            p.output_tokens_per_minute,
            p.concurrent_requests,
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMIT_FIELDS = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class Budgets:
    """Nano-USD (1e-9 USD), so that sums are exact; days and months are UTC."""

    usd_nanos_per_day: int = 0
    usd_nanos_per_month: int = 0

    def over(self, fallback: Budgets) -> Budgets:
        return Budgets(
            self.usd_nanos_per_day or fallback.usd_nanos_per_day,
            self.usd_nanos_per_month or fallback.usd_nanos_per_month,
        )

    @property
    def any(self) -> bool:
        return bool(self.usd_nanos_per_day or self.usd_nanos_per_month)

    def to_proto(self) -> tenancy_pb2.Budgets:
        return tenancy_pb2.Budgets(
            usd_nanos_per_day=self.usd_nanos_per_day, usd_nanos_per_month=self.usd_nanos_per_month
        )

    @classmethod
    def from_proto(cls, p: tenancy_pb2.Budgets) -> Budgets:
        return cls(p.usd_nanos_per_day, p.usd_nanos_per_month)

    def as_dict(self) -> dict[str, str]:
        """USD as decimal text (exact), the way people write budgets."""
        return {
            "usd_per_day": usd_text(self.usd_nanos_per_day),
            "usd_per_month": usd_text(self.usd_nanos_per_month),
        }


# Budgets are written in USD by people (YAML, the admin API, the CLI).
BUDGET_FIELDS = {"usd_per_day": "usd_nanos_per_day", "usd_per_month": "usd_nanos_per_month"}


def usd_to_nanos(value: object) -> int:
    """USD (a number or decimal text) as nano-USD; raises ``ValueError`` for anything
    that is not a number at or above 0 with at most 9 decimals."""
    if isinstance(value, bool):
        raise ValueError("a budget is an amount of USD, not true or false")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"a budget is an amount of USD, not {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"a budget cannot be below zero ({value})")
    nanos = amount * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise ValueError(f"a budget has at most 9 decimals ({value})")
    return int(nanos)


def usd_text(nanos: int) -> str:
    text = format(Decimal(nanos) / NANOS_PER_USD, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def check_limit(name: str, value: object) -> int:
    """A limit as an int at or above 0, or ``ValueError`` saying why not."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} cannot be below zero ({value})")
    return value


@dataclass(frozen=True)
class Allowance:
    """The limits and budgets of one level."""

    limits: Limits = field(default_factory=Limits)
    budgets: Budgets = field(default_factory=Budgets)

    def over(self, fallback: Allowance) -> Allowance:
        return Allowance(self.limits.over(fallback.limits), self.budgets.over(fallback.budgets))

    @property
    def any(self) -> bool:
        return self.limits.any or self.budgets.any
