import random

from server.providers.base import BatchLimits
from server.services.offload.splitting import split


def test_batches_respect_both_the_count_and_the_byte_limit():
    rng = random.Random(7)
    sizes = [rng.randint(50, 900) for _ in range(1000)]
    limits = BatchLimits(max_requests=100, max_bytes=64 * 1024)
    result = split(sizes, limits)
    assert sorted(i for chunk in result.chunks for i in chunk) == list(range(1000)) and result.oversized == []
    for chunk in result.chunks:
        assert len(chunk) <= 100 and sum(sizes[i] for i in chunk) <= 64 * 1024
    # Greedy: every batch but the last was closed because the next request would not fit.
    for chunk, following in zip(result.chunks, result.chunks[1:], strict=False):
        assert len(chunk) == 100 or sum(sizes[i] for i in chunk) + sizes[following[0]] > 64 * 1024


def test_count_alone_or_bytes_alone_decide_when_the_other_is_loose():
    assert [len(c) for c in split([10] * 250, BatchLimits(100, 10**9)).chunks] == [100, 100, 50]
    assert [len(c) for c in split([400] * 10, BatchLimits(10**6, 1000)).chunks] == [2, 2, 2, 2, 2]


def test_a_request_larger_than_the_byte_limit_is_set_apart():
    result = split([10, 5000, 10], BatchLimits(100, 1000))
    assert result.chunks == [[0, 2]] and result.oversized == [1]
