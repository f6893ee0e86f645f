"""In-process cache store: a bounded LRU whose entries expire after a TTL (the default backend)."""

import fnmatch
import time
from collections import OrderedDict


class MemoryStore:
    name = "memory"

    def __init__(self, max_items: int, ttl_s: float, clock=time.monotonic):
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        now = self.clock()
        values: list[bytes | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= now:
                self._entries.pop(key, None)
                values.append(None)
                continue
            self._entries.move_to_end(key)
            values.append(entry[1])
        return values

    async def set(self, key: str, value: bytes) -> None:
        self._entries[key] = (self.clock() + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)

    async def count(self, pattern: str) -> int:
        """Live entries whose key matches the glob `pattern`."""
        now = self.clock()
        return sum(
            1 for key, (expires, _) in self._entries.items() if expires > now and fnmatch.fnmatchcase(key, pattern)
        )

    async def delete_matching(self, pattern: str) -> int:
        """Remove the live entries whose key matches `pattern`; how many were removed (expired ones go too)."""
        now = self.clock()
        doomed = [key for key in self._entries if fnmatch.fnmatchcase(key, pattern)]
        removed = 0
        for key in doomed:
            expires, _ = self._entries.pop(key)
            removed += expires > now
        return removed
