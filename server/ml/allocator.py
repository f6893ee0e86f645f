"""glibc's allocator told to keep freed memory for reuse, as a model server wants.

Every decoding step allocates tensors of a few MB (a layer's activations, a batch's logits) and frees them. glibc
serves an allocation above its mmap threshold with a fresh `mmap` and unmaps it on free, and gives the top of its heap
back to the kernel past its trim threshold, so each step touches new pages: the kernel zeroes every one at its first
write, and that page-fault work ran longer than the copies themselves. On an Intel Xeon (AVX-512, 2 vCPUs) a batch of
32 GPT-2-124M rows ran 11% faster in fp32 and 12% faster in bfloat16 with the thresholds below (`python -m server
bench` and docs/performance.md give the figures). This is what the tcmalloc or jemalloc `LD_PRELOAD` recommended
by vLLM's and Intel's CPU guides achieves, here without a second allocator or a relaunch: `mallopt` changes the
running process. The price is that memory the models freed stays in the process for their next step instead of
going back to the system: the resident size stays at its peak.
"""

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt's parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems: allocations up to 32 MiB come from its heaps.
MMAP_THRESHOLD = 32 * 2**20
# Freed memory at the top of a heap kept up to 1 GiB rather than returned to the kernel.
TRIM_THRESHOLD = 2**30
# The environment variables glibc reads at start for the same settings: a user who set one chose for themselves.
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds for this process (once is enough; again is harmless) and say what was
    done: nothing on another C library, or where the environment already sets glibc's allocator."""
    if platform.libc_ver()[0] != "glibc":
        return "left as it is (not glibc)"
    if chosen := [name for name in ENVIRONMENT if name in os.environ]:
        return f"left as the environment sets it ({', '.join(chosen)})"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.warning("glibc refused mallopt: its allocator keeps returning freed memory to the system")
        return "left as it is (mallopt refused)"
    return f"freed memory kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
