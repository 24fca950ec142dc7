"""Prices per model, loaded from a YAML file, and the one function that prices usage.

Prices are USD per million tokens. Cached input tokens are priced at their own rate
(defaulting to the input rate) and are not charged again as plain input. The table's
version is a hash of its content, recorded with every priced event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml

from sluice.common.v1 import chat_pb2

MILLION = Decimal(1_000_000)


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
