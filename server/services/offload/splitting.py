"""Split a job's requests into provider batches that respect the provider's limits by count AND by bytes.

Splitting by count alone fails on large requests (a provider answers 413 for a file over its byte limit).
Requests keep their order; a new batch starts when the next request would pass either limit. A request
that alone exceeds the byte limit can never be submitted: it is returned apart, to be failed with a reason.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from server.providers.base import BatchLimits


@dataclass(frozen=True)
class Split:
    chunks: list[list[int]]
    oversized: list[int]


def split(sizes: Sequence[int], limits: BatchLimits) -> Split:
    """Indices of the requests whose encoded sizes are `sizes`, grouped into batches within `limits`."""
    chunks: list[list[int]] = []
    oversized: list[int] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes):
        if size > limits.max_bytes:
            oversized.append(index)
            continue
        if current and (len(current) == limits.max_requests or used + size > limits.max_bytes):
            chunks.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        chunks.append(current)
    return Split(chunks, oversized)
