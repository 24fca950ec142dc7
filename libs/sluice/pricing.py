"""Prices per model, loaded from a YAML file, and the one function that prices usage.

Prices are USD per million tokens. Cached input tokens are priced at their own rate
(defaulting to the input rate) and are not charged again as plain input. The table's
version is a hash of its content, recorded with every priced event.

Money that is stored or summed is an integer number of **nano-USD** (1 USD = 10**9):
each component (input, output) of a priced request is rounded half to even once
(``usd_to_nanos``), and totals are integer sums of those, so the worker's cost of an
answer and the cost-tracker's ledger row agree to the nano-dollar.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import yaml

from sluice.common.v1 import chat_pb2

MILLION = Decimal(1_000_000)
NANOS_PER_USD = 1_000_000_000
_NANOS_PER_USD_DEC = Decimal(NANOS_PER_USD)


def usd_to_nanos(usd: Decimal) -> int:
    """Exact USD to integer nano-USD, rounded half to even."""
    return int((usd * _NANOS_PER_USD_DEC).to_integral_value(rounding=ROUND_HALF_EVEN))


def nanos_to_usd(nanos: int) -> Decimal:
    """Integer nano-USD to an exact ``Decimal`` USD amount."""
    return Decimal(nanos).scaleb(-9)


@dataclass(frozen=True)
class ModelPrice:
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal


@dataclass(frozen=True)
class PricedUsage:
    input_usd: Decimal
    output_usd: Decimal

    @property
    def total_usd(self) -> Decimal:
        return self.input_usd + self.output_usd

    @property
    def input_nanos(self) -> int:
        return usd_to_nanos(self.input_usd)

    @property
    def output_nanos(self) -> int:
        return usd_to_nanos(self.output_usd)

    @property
    def total_nanos(self) -> int:
        """What the ledger records: the sum of the two rounded components."""
        return self.input_nanos + self.output_nanos


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice], version: str) -> None:
        self.prices = prices
        self.version = version

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        raw = path.read_bytes()
        data = yaml.safe_load(raw) or {}
        prices: dict[str, ModelPrice] = {}
        for name, entry in (data.get("models") or {}).items():
            input_rate = Decimal(str(entry.get("input_per_mtok", 0)))
            prices[str(name)] = ModelPrice(
                input_per_mtok=input_rate,
                output_per_mtok=Decimal(str(entry.get("output_per_mtok", 0))),
                cached_input_per_mtok=Decimal(str(entry.get("cached_input_per_mtok", input_rate))),
            )
        version = hashlib.sha256(raw).hexdigest()[:12]
        return cls(prices, version)

    def price_for(self, model: str) -> ModelPrice | None:
        return self.prices.get(model)

    def price(self, model: str, usage: chat_pb2.Usage) -> PricedUsage:
        """Price ``usage`` of ``model``; an unpriced model costs zero (and is reported)."""
        rate = self.price_for(model)
        if rate is None:
            return PricedUsage(Decimal(0), Decimal(0))
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        fresh = usage.input_tokens - cached
        input_usd = (fresh * rate.input_per_mtok + cached * rate.cached_input_per_mtok) / MILLION
        output_usd = usage.output_tokens * rate.output_per_mtok / MILLION
        return PricedUsage(input_usd, output_usd)

    def output_tokens_within(self, model: str, input_tokens: int, ceiling_nanos: int) -> int | None:
        """The most output tokens that cost, with ``input_tokens`` of prompt, at most
        ``ceiling_nanos`` as ``price`` counts it: -1 when the prompt alone costs more,
        None when output is free (no count of it passes a ceiling the prompt fits).

        A stream checked against a spend ceiling compares its count with this after each
        delta, instead of pricing every delta (``price`` is monotonic in output tokens).
        """

        def total(output_tokens: int) -> int:
            usage = chat_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
            return self.price(model, usage).total_nanos

        if total(0) > ceiling_nanos:
            return -1
        rate = self.price_for(model)
        if rate is None or rate.output_per_mtok <= 0:
            return None
        # Each part is rounded to the nano-dollar on its own: start from the exact
        # quotient and step to the boundary (a step or two at most).
        nanos_per_token = rate.output_per_mtok * _NANOS_PER_USD_DEC / MILLION
        most = int((ceiling_nanos - total(0)) / nanos_per_token)
        while total(most + 1) <= ceiling_nanos:
            most += 1
        while most > 0 and total(most) > ceiling_nanos:
            most -= 1
        return most
