from pathlib import Path

from server.ml.cpu import ASSUMED_CACHE_BYTES, largest_cache_bytes


def caches(root: Path, sizes: list[str]) -> Path:
    for index, size in enumerate(sizes):
        (root / f"index{index}").mkdir(parents=True)
        (root / f"index{index}" / "size").write_text(f"{size}\n")
    return root


def test_the_largest_cache_is_read_from_sysfs(tmp_path):
    assert largest_cache_bytes(caches(tmp_path / "a", ["48K", "32K", "2048K", "105M"])) == 105 << 20
    assert largest_cache_bytes(caches(tmp_path / "b", ["32K", "1024K", "32768K"])) == 32 << 20


def test_a_cpu_whose_caches_cannot_be_read_is_taken_to_have_the_assumed_size(tmp_path):
    assert largest_cache_bytes(tmp_path / "missing") == ASSUMED_CACHE_BYTES
    assert largest_cache_bytes(caches(tmp_path / "odd", ["unknown"])) == ASSUMED_CACHE_BYTES
