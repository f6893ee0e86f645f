"""Process memory as a model server wants it: glibc keeps freed memory for reuse, and the models sit on 2 MiB pages.

Every decoding step allocates tensors of a few MB (a layer's activations, a batch's logits) and frees them. glibc
serves an allocation above its mmap threshold with a fresh `mmap` and unmaps it on free, and gives the top of its heap
back to the kernel past its trim threshold, so each step touches new pages: the kernel zeroes every one at its first
write, and that page-fault work ran longer than the copies themselves. On an Intel Xeon (AVX-512, 2 vCPUs) a batch of
32 GPT-2-124M rows ran 11% faster in fp32 and 12% faster in bfloat16 with the thresholds below (`python -m server
bench` and docs/performance.md give the figures). This is what the tcmalloc or jemalloc `LD_PRELOAD` recommended
by vLLM's and Intel's CPU guides achieves, here without a second allocator or a relaunch: `mallopt` changes the
running process. The price is that memory the models freed stays in the process for their next step instead of
going back to the system: the resident size stays at its peak.

A lone request reads every weight once per token, the whole model every step: on 4 KiB pages that is a TLB miss
every 4 KiB (124 M fp32 weights: 120,000 pages a step), which the hardware's prefetchers do not cross. `on_huge_pages`
moves the memory a model's load allocated (its weights, and the copies oneDNN and fbgemm pack them into, which torch's
own `THP_MEM_ALLOC_ENABLE` does not reach) onto 2 MiB pages with `madvise(MADV_COLLAPSE)` (Linux 6.1+): on an AMD EPYC
Zen 4 a one-row product got 3% to 12% faster by shape, and a lone 16-token request of GPT-2-124M went from about 415
to 345 ms in fp32 and from 160 to 136 ms in int8 (docs/performance.md). The system's own switch decides: with
transparent huge pages set to `never` the memory is left as it is. Collapsing copies the memory once (1 to 4 s for
GPT-2-124M in fp32) and adds none: the pages were resident.
"""

import ctypes
import errno
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


# madvise's advice numbers (linux/mman.h).
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE_PAGE = 2 * 2**20
COLLAPSE_TRIES = 3
THP_SWITCH = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SMAPS = Path("/proc/self/smaps")
Range = tuple[int, int]


@dataclass
class Pages:
    """What `on_huge_pages` did with the memory its block allocated, in one line (the log, `/`, the bench)."""

    summary: str = "not yet moved"


@contextmanager
def on_huge_pages() -> Iterator[Pages]:
    """Move the anonymous memory the block allocates onto 2 MiB pages when it ends (see the module's docstring).

    Memory is found by comparing the process's mappings before and after, so whatever allocated it (torch, oneDNN,
    fbgemm, glibc's heaps) is covered; other threads' allocations in the meantime are moved too, which costs them
    nothing. Never raises for want of huge pages: the summary says what happened."""
    pages = Pages()
    if platform.system() != "Linux":
        pages.summary = "left as they are (not Linux)"
        yield pages
        return
    before = anonymous_ranges(SMAPS.read_text())
    yield pages
    pages.summary = collapse(new_ranges(before, anonymous_ranges(SMAPS.read_text())))
    log.info("model memory: %s", pages.summary)


def anonymous_ranges(smaps: str) -> list[Range]:
    """The private writable anonymous mappings (heaps and `mmap`s; not files, not stacks) in `/proc/<pid>/smaps`,
    but those marked never to be on huge pages (`nh`: since Linux 6.7 thread stacks are)."""
    ranges = []
    candidate: Range | None = None
    for line in smaps.splitlines():
        fields = line.split(maxsplit=5)
        if fields[0] == "VmFlags:":
            if candidate and "nh" not in line.split():
                ranges.append(candidate)
            candidate = None
        elif not fields[0].endswith(":"):
            name = fields[5].strip() if len(fields) > 5 else ""
            private_anonymous = fields[1].startswith("rw") and fields[1].endswith("p") and fields[4] == "0"
            low, high = fields[0].split("-")
            candidate = (int(low, 16), int(high, 16)) if private_anonymous and name in ("", "[heap]") else None
    return ranges


def new_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """The parts of `after` that no range of `before` covered, trimmed inward to whole 2 MiB pages."""
    found, earlier = [], sorted(before)
    for low, high in after:
        start = low
        for old_low, old_high in earlier:
            if old_high <= start or old_low >= high:
                continue
            if old_low > start:
                found.append((start, old_low))
            start = max(start, old_high)
        if start < high:
            found.append((start, high))
    aligned = [(-(-low // HUGE_PAGE) * HUGE_PAGE, high // HUGE_PAGE * HUGE_PAGE) for low, high in found]
    return [(low, high) for low, high in aligned if high > low]


def collapse(ranges: list[Range], switch: Path = THP_SWITCH) -> str:
    """`MADV_HUGEPAGE` then `MADV_COLLAPSE` on every range; a line saying how much ended on 2 MiB pages."""
    total = sum(high - low for low, high in ranges)
    if not total:
        return "nothing to move (no new memory of 2 MiB or more)"
    if switch.exists() and "[never]" in switch.read_text():
        return f"left on 4 KiB pages ({total >> 20} MiB): transparent huge pages are off ({switch} is never)"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    started, moved, errors = time.perf_counter(), 0, set()
    for low, high in ranges:
        # The mark alone lets khugepaged move them later where the kernel predates MADV_COLLAPSE.
        libc.madvise(low, high - low, MADV_HUGEPAGE)
        if error := _collapse_one(libc, low, high):
            errors.add(os.strerror(error))
        else:
            moved += high - low
    seconds = time.perf_counter() - started
    summary = f"{moved >> 20} of {total >> 20} MiB moved to 2 MiB pages in {seconds:.1f} s (MADV_COLLAPSE)"
    if errors:
        summary += f"; the rest refused ({', '.join(sorted(errors))}), left to khugepaged where marked"
    return summary


def _collapse_one(libc: ctypes.CDLL, low: int, high: int) -> int:
    """0, or the error of the last try: EAGAIN (a page locked for now, a transient failure) is tried again."""
    for _ in range(COLLAPSE_TRIES):
        if libc.madvise(low, high - low, MADV_COLLAPSE) == 0:
            return 0
        if (error := ctypes.get_errno()) != errno.EAGAIN:
            return error
    return errno.EAGAIN
