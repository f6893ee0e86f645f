from server.services.cache.memory import MemoryStore
from tests.support.clock import Clock


async def test_entries_expire_after_the_ttl():
    clock = Clock()
    store = MemoryStore(max_items=10, ttl_s=60, clock=clock)
    await store.set("k", b"v")
    clock.now = 59.9
    assert await store.get_many(["k"]) == [b"v"]
    clock.now = 60.0
    assert await store.get_many(["k"]) == [None]
    assert len(store) == 0


async def test_least_recently_used_entries_go_first_at_the_bound():
    store = MemoryStore(max_items=2, ttl_s=60)
    await store.set("a", b"1")
    await store.set("b", b"2")
    assert await store.get_many(["a"]) == [b"1"]
    await store.set("c", b"3")
    assert await store.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    assert len(store) == 2
