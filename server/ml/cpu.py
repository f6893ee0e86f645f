"""What this CPU is, as /proc/cpuinfo says: what kernel timings (server/ml/kernels.py) and builds for this CPU
(server/ml/matvec.py) are keyed by; and its largest cache, which the kernel timings read past."""

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and every flag /proc/cpuinfo lists for it (elsewhere: the platform's name, no flags)."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


# What a CPU whose caches cannot be read is taken to have: a large server part's share.
ASSUMED_CACHE_BYTES = 32 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@cache
def largest_cache_bytes(caches: Path = CACHES) -> int:
    """The size of the CPU's largest cache (its last level, as sysfs gives it for CPU 0), else `ASSUMED_CACHE_BYTES`."""
    sizes = []
    for entry in caches.glob("index*"):
        try:
            size = (entry / "size").read_text().strip()
            sizes.append(int(size[:-1]) * _UNITS[size[-1]] if size[-1] in _UNITS else int(size))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=ASSUMED_CACHE_BYTES)
