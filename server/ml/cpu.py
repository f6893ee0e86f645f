"""What this CPU is, as /proc/cpuinfo says: what kernel timings (server/ml/kernels.py) and builds for this CPU
(server/ml/matvec.py) are keyed by."""

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
