"""What batch work cost, and what the same usage would have cost at the real-time price.

Prices are USD per 1M input and output tokens, per provider and model, shipped in `prices.json` and
overridden or extended by `BATCH_PRICES_FILE` (same shape). A dated snapshot name (`gpt-4o-mini-2024-07-18`)
takes the price of its longest listed prefix. An unknown model costs `None` (logged once per model), never
an error: cost tracking must not stop a job. The `local` provider costs nothing; its savings are measured
against the real-time price of a reference model (`BATCH_LOCAL_REFERENCE_PRICE`, `provider:model`).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from server.core.provider_names import LOCAL

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).with_name("prices.json")
MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    input_per_m: float
    output_per_m: float

    def of(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_m + output_tokens * self.output_per_m) / MILLION


@dataclass(frozen=True)
class ModelPrices:
    realtime: Price
    batch: Price


@dataclass(frozen=True)
class Cost:
    """`cost_usd` at the price paid, `realtime_cost_usd` at the real-time price; None when unknown."""

    cost_usd: float | None
    realtime_cost_usd: float | None

    @property
    def savings_usd(self) -> float | None:
        if self.cost_usd is None or self.realtime_cost_usd is None:
            return None
        return self.realtime_cost_usd - self.cost_usd


def _read(path: Path) -> dict[str, dict[str, ModelPrices]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    table: dict[str, dict[str, ModelPrices]] = {}
    for provider, models in data.items():
        if provider.startswith("_"):
            continue
        for model, entry in models.items():
            try:
                prices = ModelPrices(Price(*map(float, entry["realtime"])), Price(*map(float, entry["batch"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f'{path}: {provider}/{model}: expected {{"realtime": [in, out], "batch": '
                    f"[in, out]}} in USD per 1M tokens ({exc})"
                ) from None
            table.setdefault(provider, {})[model] = prices
    return table


class PriceTable:
    def __init__(self, table: dict[str, dict[str, ModelPrices]], local_reference: str | None = None):
        self.table = table
        self.local_reference = local_reference
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def load(cls, override: Path | None = None, local_reference: str | None = None) -> "PriceTable":
        table = _read(SHIPPED)
        if override is not None:
            for provider, models in _read(override).items():
                table.setdefault(provider, {}).update(models)
        return cls(table, local_reference)

    def lookup(self, provider: str, model: str) -> ModelPrices | None:
        models = self.table.get(provider, {})
        if model in models:
            return models[model]
        prefixes = [name for name in models if model.startswith(name + "-")]
        return models[max(prefixes, key=len)] if prefixes else None

    def _unknown(self, provider: str, model: str) -> None:
        if (provider, model) not in self._warned:
            self._warned.add((provider, model))
            log.warning(
                "no price for %s model %r: its cost is recorded as unknown (add it to BATCH_PRICES_FILE)",
                provider,
                model,
            )

    def cost(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> Cost:
        if provider == LOCAL:
            reference = self._reference()
            return Cost(0.0, reference.realtime.of(input_tokens, output_tokens) if reference else None)
        prices = self.lookup(provider, model)
        if prices is None:
            self._unknown(provider, model)
            return Cost(None, None)
        return Cost(prices.batch.of(input_tokens, output_tokens), prices.realtime.of(input_tokens, output_tokens))

    def _reference(self) -> ModelPrices | None:
        if not self.local_reference:
            return None
        provider, _, model = self.local_reference.partition(":")
        prices = self.lookup(provider, model)
        if prices is None:
            self._unknown(provider, model)
        return prices
