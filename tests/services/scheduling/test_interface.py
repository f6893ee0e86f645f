"""Model labels are unique per test: the batch-size histogram lives in the process-wide Prometheus registry."""

import inspect
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY
from typing_extensions import get_protocol_members

from server.services.scheduling.continuous import ContinuousBatcher
from server.services.scheduling.interface import Batcher, BatchSizes
from server.services.scheduling.static import MicroBatcher


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def histogram(sample: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(f"model_batch_size_{sample}", {"model": model})


def test_batch_sizes_count_batches_and_items_and_observe_the_histogram():
    model = unique("generator")
    sizes = BatchSizes(model)
    for size in (4, 1, 7):
        sizes.record(size)
    assert (sizes.batches, sizes.items) == (3, 12)
    assert histogram("sum", model) == 12
    assert histogram("count", model) == 3
    # Sizes 1 and 4 fall in the `le=4` bucket, 7 does not.
    assert REGISTRY.get_sample_value("model_batch_size_bucket", {"model": model, "le": "4.0"}) == 2


def test_each_model_observes_its_own_batch_sizes():
    first, second = unique("generator"), unique("classifier")
    BatchSizes(first).record(5)
    other = BatchSizes(second)
    other.record(2)
    other.record(3)
    assert histogram("sum", first) == 5 and histogram("count", first) == 1
    assert histogram("sum", second) == 5 and histogram("count", second) == 2


PLACEHOLDER_MODEL = object()


@pytest.fixture
async def batchers():
    """One batcher of each scheduler, never started: the contract is about their shape, so no model runs."""
    executor = ThreadPoolExecutor(1)
    made = [
        MicroBatcher(
            unique("static"), lambda items, abandoned: items, executor, max_batch_size=2, max_wait_s=0.01, queue_limit=4
        ),
        ContinuousBatcher(
            unique("continuous"), PLACEHOLDER_MODEL, executor, max_batch_size=2, max_wait_s=0.01, queue_limit=4
        ),
    ]
    yield made
    executor.shutdown()


MEMBERS = sorted(get_protocol_members(Batcher))


def test_the_contract_is_introspected_whole():
    """Members found here are what the parametrized check below covers: its attributes and its methods."""
    assert set(Batcher.__annotations__) < set(MEMBERS)
    assert "submit" in MEMBERS


@pytest.mark.parametrize("member", MEMBERS)
async def test_both_schedulers_keep_every_member_of_the_contract(batchers, member):
    declared = inspect.getattr_static(Batcher, member, None)
    annotation = Batcher.__annotations__.get(member)
    for batcher in batchers:
        where = f"{type(batcher).__name__}.{member}"
        assert hasattr(batcher, member), f"{where} is missing"
        implemented = inspect.getattr_static(type(batcher), member, None)
        if isinstance(declared, property):
            assert isinstance(implemented, property), f"{where} is not a property"
        elif annotation is not None:
            assert isinstance(getattr(batcher, member), annotation), f"{where} is not a {annotation.__name__}"
        else:
            assert callable(implemented), f"{where} is not a method"
            assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(declared), (
                f"{where} is {'not ' if inspect.iscoroutinefunction(declared) else ''}a coroutine function"
            )
            assert keywords(implemented) == keywords(declared), f"{where} takes other keyword-only arguments"


def keywords(function) -> dict[str, object]:
    """Keyword-only parameters and their defaults: what callers pass by name."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
