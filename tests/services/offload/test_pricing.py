import json
import logging

import pytest

from server.services.offload.pricing import PriceTable


def test_batch_and_realtime_cost_from_the_shipped_table():
    prices = PriceTable.load()
    cost = prices.cost("openai", "gpt-4o-mini", 2_000_000, 1_000_000)
    assert cost.cost_usd == pytest.approx(2 * 0.075 + 0.30)
    assert cost.realtime_cost_usd == pytest.approx(2 * 0.15 + 0.60)
    assert cost.savings_usd == pytest.approx(0.45)


def test_a_dated_snapshot_takes_its_longest_listed_prefix():
    prices = PriceTable.load()
    assert prices.lookup("openai", "gpt-4o-mini-2024-07-18") == prices.lookup("openai", "gpt-4o-mini")
    assert prices.lookup("openai", "gpt-4o-2024-08-06") == prices.lookup("openai", "gpt-4o")


def test_an_unknown_model_costs_none_and_warns_once(caplog):
    prices = PriceTable.load()
    with caplog.at_level(logging.WARNING):
        first = prices.cost("anthropic", "claude-next", 10, 10)
        prices.cost("anthropic", "claude-next", 10, 10)
    assert first.cost_usd is None and first.realtime_cost_usd is None and first.savings_usd is None
    assert sum("claude-next" in record.message for record in caplog.records) == 1


def test_a_prices_file_overrides_and_extends(tmp_path):
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps(
            {
                "openai": {
                    "gpt-4o-mini": {"realtime": [1, 2], "batch": [0.5, 1]},
                    "house-model": {"realtime": [4, 4], "batch": [2, 2]},
                }
            }
        )
    )
    prices = PriceTable.load(override)
    assert prices.cost("openai", "gpt-4o-mini", 1_000_000, 0).cost_usd == pytest.approx(0.5)
    assert prices.cost("openai", "house-model", 0, 1_000_000).realtime_cost_usd == pytest.approx(4)
    assert prices.cost("openai", "gpt-4o", 1_000_000, 0).cost_usd == pytest.approx(1.25)


def test_a_malformed_prices_file_names_the_entry(tmp_path):
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"openai": {"bad": {"realtime": [1]}}}))
    with pytest.raises(ValueError, match="openai/bad"):
        PriceTable.load(override)


def test_local_work_costs_nothing_and_saves_the_reference_price():
    cost = PriceTable.load(local_reference="openai:gpt-4o-mini").cost("local", "gpt2", 1_000_000, 1_000_000)
    assert cost.cost_usd == 0 and cost.savings_usd == pytest.approx(0.75)
    assert PriceTable.load().cost("local", "gpt2", 10, 10).savings_usd is None
