from decimal import Decimal

import pytest
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.pricing import ModelPrice, PriceTable

from services.cost_tracker.domain.usage import (
    Dimension,
    InvalidQuery,
    InvalidUsageEvent,
    Pricer,
    ReportSpec,
    UsageAmounts,
    UsageGroup,
    UsageReport,
    nanos_to_usd,
    summarize,
    usd_to_nanos,
)
from tests.cost_tracker.harness import REPO_CONFIG, usage_event, write_prices


@pytest.fixture
def pricer(tmp_path) -> Pricer:
    return Pricer(PriceTable.load(write_prices(tmp_path)))


def test_prices_fresh_and_cached_input_separately(pricer: Pricer):
    # sim-fast: 0.10 input, 0.05 cached input, 0.40 output per million tokens.
    entry = pricer.price(usage_event("k", input_tokens=1000, cached=200, output_tokens=500))
    assert entry.input_cost_nanos == 800 * 100 + 200 * 50  # 0.00009 USD
    assert entry.output_cost_nanos == 500 * 400  # 0.0002 USD
    assert entry.total_cost_usd == Decimal("0.00029")
    assert entry.priced and not entry.cache_hit
    assert entry.price_version == pricer.table.version


def test_cached_tokens_above_input_are_capped(pricer: Pricer):
    entry = pricer.price(usage_event("k", input_tokens=100, cached=500, output_tokens=0))
    assert entry.input_cost_nanos == 100 * 50


def test_cache_hit_costs_nothing_but_keeps_tokens(pricer: Pricer):
    entry = pricer.price(usage_event("k", input_tokens=1000, output_tokens=500, cache_hit=True))
    assert entry.total_cost_nanos == 0
    assert entry.cache_hit and entry.priced
    assert (entry.input_tokens, entry.output_tokens) == (1000, 500)


def test_failed_request_bills_tokens_produced(pricer: Pricer):
    entry = pricer.price(usage_event("k", input_tokens=10, output_tokens=3, outcome="failed"))
    assert entry.outcome == "failed"
    assert entry.total_cost_nanos == 10 * 100 + 3 * 400


def test_unknown_model_is_zero_and_flagged_once(pricer: Pricer):
    entry = pricer.price(usage_event("k", model="mystery-9b"))
    assert entry.total_cost_nanos == 0
    assert not entry.priced
    assert entry.model == "mystery-9b"
    assert pricer.first_time_unpriced("mystery-9b") is True
    assert pricer.first_time_unpriced("mystery-9b") is False
    assert pricer.first_time_unpriced("other") is True


def test_requested_model_stands_in_when_none_served(pricer: Pricer):
    event = usage_event("k", input_tokens=10, output_tokens=0)
    event.model_served = ""
    entry = pricer.price(event)
    assert entry.model == "sim-fast"
    assert entry.total_cost_nanos == 1000


def test_large_prices_stay_exact(pricer: Pricer):
    # big-model: 3 USD in, 15 USD out per million: 1.7M tokens in, 0.9M out.
    entry = pricer.price(
        usage_event("k", model="big-model", input_tokens=1_700_000, output_tokens=900_000)
    )
    assert entry.total_cost_usd == Decimal("5.1") + Decimal("13.5")


def test_event_without_request_id_is_rejected(pricer: Pricer):
    event = usage_event("k")
    event.request_id = ""
    with pytest.raises(InvalidUsageEvent):
        pricer.price(event)


def test_nano_dollar_rounding_is_half_even():
    assert usd_to_nanos(Decimal("0.0000000005")) == 0
    assert usd_to_nanos(Decimal("0.0000000015")) == 2
    assert usd_to_nanos(Decimal("0.0000000025")) == 2
    assert usd_to_nanos(Decimal("1.25")) == 1_250_000_000
    assert nanos_to_usd(1_250_000_001) == Decimal("1.250000001")


def test_shipped_price_table_loads():
    table = PriceTable.load(REPO_CONFIG / "prices.yaml")
    assert table.prices, "config/prices.yaml prices no model"


@pytest.mark.parametrize(
    ("input_rate", "output_rate"),
    [("0.10", "0.40"), ("3", "15"), ("0.15", "0.6"), ("0.07", "0.333"), ("2.5", "0")],
)
def test_output_tokens_within_a_ceiling_is_what_pricing_each_count_says(
    input_rate: str, output_rate: str
):
    """The count a stream compares with instead of pricing every delta: the largest one
    whose price fits the ceiling, to the nano-dollar, against pricing each count."""
    price = ModelPrice(Decimal(input_rate), Decimal(output_rate), Decimal(input_rate))
    table = PriceTable({"m": price}, "test")
    prompt = 37

    def total(output_tokens: int) -> int:
        usage = chat_pb2.Usage(input_tokens=prompt, output_tokens=output_tokens)
        return table.price("m", usage).total_nanos

    ceilings = {
        total(0) - 1,
        total(0),
        *(total(n) + d for n in (1, 2, 7, 50, 333) for d in (-1, 0, 1)),
    }
    for ceiling in sorted(ceilings):
        most = table.output_tokens_within("m", prompt, ceiling)
        if total(0) > ceiling:
            assert most == -1
        elif Decimal(output_rate) == 0:
            assert most is None
        else:
            assert most is not None and most >= 0
            assert total(most) <= ceiling < total(most + 1), (ceiling, most)
    assert table.output_tokens_within("unpriced", prompt, 0) is None


@pytest.mark.parametrize(
    ("since", "until"),
    [(10, 10), (20, 10), (-1, 0), (0, -5)],
)
def test_invalid_time_ranges(since: int, until: int):
    with pytest.raises(InvalidQuery):
        ReportSpec.from_query(cost_pb2.UsageQuery(since_unix_nanos=since, until_unix_nanos=until))


def test_summary_totals_are_summed_exactly():
    rows = [
        UsageGroup(
            {Dimension.KEY: "a", Dimension.MODEL: "m1"},
            UsageAmounts(2, 10, 20, 0, 0, 1_000_000_001),
        ),
        UsageGroup({Dimension.KEY: "a", Dimension.MODEL: "m2"}, UsageAmounts(1, 1, 2, 0, 0, 2)),
    ]
    totals = UsageAmounts(3, 11, 22, 0, 0, 1_000_000_003)
    summary = summarize(UsageReport((Dimension.KEY, Dimension.MODEL), rows, totals))
    assert summary.requests == 3
    assert summary.total_cost_usd == pytest.approx(1.000000003)
    assert [(r.key_id, r.model, r.requests) for r in summary.rows] == [
        ("a", "m1", 2),
        ("a", "m2", 1),
    ]
    assert summary.rows[0].usage.output_tokens == 20
